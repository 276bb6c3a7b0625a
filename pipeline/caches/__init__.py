"""What is on disk under cache_dir: the reference cache's layout and lookup (`layout`), its shard files and markers
(`shards`), and the token files of reference-free training (`tokens`)."""
