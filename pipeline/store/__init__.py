"""Storage and content addressing: local/URI file access, fingerprints and cache keys, the reference-cache layout
(finding and checking a cache) and the checkpoint layout (listing and exporting Hugging Face checkpoints)."""
