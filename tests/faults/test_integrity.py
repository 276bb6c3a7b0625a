"""Case 6: integrity. The manifest's sha256s are checked whenever a cache is read: a corrupted, truncated or
missing file is refused by training and evaluation with one line, and `dpo-pipeline cache` recomputes only its
shard; a cache built for other inputs is never used."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from pipeline.caches import layout as cache_layout
from pipeline.caches.layout import CacheSpec
from pipeline.errors import UserError
from stages import cache
from tests.conftest import copy_cache, make_config, read_cache

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def built(tiny_model, tmp_path_factory, standard_cache):
    """A complete cache of 3 shards, kept pristine: each test works on a copy."""
    root = tmp_path_factory.mktemp("integrity")
    copy_cache(standard_cache, root)
    cfg = make_config(tiny_model, root, "scoring.engine=hf")
    (r,) = cache.run(cfg)
    assert r.shards_total == 3
    return cfg, r, read_cache(r)


@pytest.fixture
def copy(built, tmp_path):
    """The built cache copied under tmp_path, and a config that finds it there."""
    cfg, r, table = built
    shutil.copytree(Path(cfg.cache_dir), tmp_path / "cache")
    cfg = cfg.model_copy(update={"cache_dir": str(tmp_path / "cache"), "run_dir": str(tmp_path / "run")})
    return cfg, Path(tmp_path / "cache" / r.key), table


def corrupt(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "flip":  # one byte in the middle: still a readable Parquet file, maybe, but other values
        path.write_bytes(data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0xFF]) + data[len(data) // 2 + 1:])
    elif how == "truncate":
        path.write_bytes(data[:len(data) // 3])
    else:
        path.unlink()


def assert_same(a, b) -> None:
    assert a.column("id") == b.column("id") and a.column("chosen_input_ids") == b.column("chosen_input_ids")
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(a.column(f"ref_{side}_logps").to_numpy(), b.column(f"ref_{side}_logps").to_numpy(),
                                   atol=1e-6)


def test_damaged_files_are_refused_then_only_their_shards_are_recomputed(copy):
    """Two of the three shards' files damaged two ways (a byte flipped: the same size; deleted); a truncated one,
    the third way, is the resume test below."""
    cfg, key_dir, table = copy
    corrupt(key_dir / "data/part-00000.parquet", "flip")
    corrupt(key_dir / "data/part-00002.parquet", "delete")
    with pytest.raises(UserError, match=r"is damaged: data/part-00000.parquet, data/part-00002.parquet no longer "
                                        r"match\(es\) the manifest's sha256; run `dpo-pipeline cache CONFIG`") as e:
        cache_layout.find_cache(CacheSpec.of(cfg), "train")
    assert "\n" not in str(e.value)
    (r,) = cache.run(cfg)
    assert r.repaired == ["data/part-00000.parquet", "data/part-00002.parquet"]
    assert r.shards_computed == 2 and r.shards_total == 3  # part-00001 is kept
    assert_same(read_cache(r), table)
    assert cache_layout.find_cache(CacheSpec.of(cfg), "train").pairs == table.num_rows  # whole again
    assert not (key_dir / ".work").exists()


def test_damaged_rejects_file_recomputes_every_shard(copy):
    cfg, key_dir, table = copy
    before = (key_dir / "rejects.jsonl").read_bytes()
    (key_dir / "rejects.jsonl").write_bytes(b'{"index": 0, "reason": "forged"}\n')
    (r,) = cache.run(cfg)
    assert r.repaired == ["rejects.jsonl"] and r.shards_computed == 3
    assert (key_dir / "rejects.jsonl").read_bytes() == before
    assert_same(read_cache(r), table)


def test_a_damaged_shard_is_recomputed_when_resuming(copy):
    cfg, key_dir, table = copy
    prep = cache_layout.resolve_inputs(CacheSpec.of(cfg), "train", cfg.data.train)
    manifest = json.loads((key_dir / "manifest.json").read_text())
    cache._reopen(cache.Store(str(key_dir)), prep, manifest, damaged=[])  # an interrupted run, all shards done
    corrupt(key_dir / "data/part-00002.parquet", "truncate")  # then a file is damaged before the rerun
    (r,) = cache.run(cfg)
    assert r.shards_computed == 1 and not r.repaired
    assert_same(read_cache(r), table)


def test_a_cache_built_for_other_inputs_is_never_used(copy, tmp_path):
    cfg, key_dir, _ = copy
    other = cfg.model_copy(update={"data": cfg.data.model_copy(update={"max_length": 100})})
    with pytest.raises(UserError, match="no complete reference cache for the train split"):
        cache_layout.find_cache(CacheSpec.of(other), "train")
    # Pointed at it explicitly (train.cache_path): refused, naming what differs.
    other.train.cache_path = str(key_dir)
    with pytest.raises(UserError, match="was built for a different truncation"):
        cache_layout.find_cache(CacheSpec.of(other), "train")
    # Its manifest edited to claim other inputs: the key no longer matches, refused the same way.
    manifest = json.loads((key_dir / "manifest.json").read_text())
    manifest["inputs"]["data"]["sha256"] = "0" * 64
    (key_dir / "manifest.json").write_text(json.dumps(manifest))
    cfg.train.cache_path = str(key_dir)
    with pytest.raises(UserError, match="was built for a different data"):
        cache_layout.find_cache(CacheSpec.of(cfg), "train")
