"""Integration tier: the cache stage's files are written by Ray workers, shard by shard; the driver receives only
each shard's stats (counts, sha256, bytes), never scored rows or rejects."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
import ray.data

from pipeline.caches import shards
from pipeline.caches.layout import CacheSpec, resolve_inputs
from pipeline.store.fingerprint import sha256_file
from pipeline.store.storage import Store
from stages import cache
from tests.conftest import DATA, make_config, read_cache


@pytest.fixture
def mostly_rejects(tmp_path) -> Path:
    """40 rows: every 4th usable, the others rejected (chosen == rejected), each rejected row ~2 KB."""
    rows = [json.loads(line) for line in (DATA / "standard.jsonl").read_text().splitlines()]
    path = tmp_path / "mostly_rejects.jsonl"
    with open(path, "w") as f:
        for i in range(40):
            row = rows[i % len(rows)]
            if i % 4:
                row = {"prompt": row["prompt"], "chosen": "same " * 400, "rejected": "same " * 400}
            f.write(json.dumps({"id": f"r{i}", **row}) + "\n")
    return path


def test_a_tokenize_task_writes_its_shards_rejects_and_passes_on_only_pairs(tiny_model, tmp_path, mostly_rejects):
    cfg = make_config(tiny_model, tmp_path, "scoring.shard_size=8", data=mostly_rejects)
    prep = resolve_inputs(CacheSpec.of(cfg), "train", cfg.data.train)
    store = Store(cfg.cache_dir).child(prep.key)
    out = cache._tokenize_shards(pa.table({"job": [0], "shard": [2]}),
                                 jobs=[{"plan": prep.plan.to_dict(), "fmt": prep.fmt, "uri": store.uri}],
                                 tokenizer_dir=prep.tokenizer_dir, chat_template=None, max_length=128,
                                 max_prompt_length=64, marker=cfg.data.implicit_prompt_marker)
    # Shard 2 = rows 16..23: rows 16 and 20 are usable; its six rejects are in its file, in source order.
    lines = [json.loads(x) for x in store.read_bytes(shards.rejects_file(2)).splitlines()]
    assert [x["index"] for x in lines] == [17, 18, 19, 21, 22, 23]
    assert {x["reason"] for x in lines} == {"chosen_equals_rejected"} and lines[0]["row"]["chosen"] == "same " * 400
    assert store.listdir(".work") == ["rejects-00002.jsonl"]  # no other shard's
    (head,) = out.drop_columns(["pairs"]).to_pylist()
    assert head == {"_job": 0, "_shard": 2, "rows": 8, "rejected": 6, "reasons": '{"chosen_equals_rejected": 6}',
                    "error": None}
    pairs = shards.unpack(out.column("pairs")[0])
    assert pairs.column("_index").to_pylist() == [16, 20] and pairs.column("id").to_pylist() == ["r16", "r20"]
    assert out.nbytes < 2_000  # the rejected rows' text (~12 KB) stayed behind


@pytest.mark.ray
def test_the_driver_receives_only_shard_stats_and_never_reads_rejects_whole(tiny_model, tmp_path, mostly_rejects,
                                                                             ray_local, monkeypatch):
    received: list[pa.Table] = []
    iter_batches = ray.data.Dataset.iter_batches

    def recording(self, *args, **kwargs):
        for batch in iter_batches(self, *args, **kwargs):
            received.append(batch)
            yield batch

    def read_bytes(self, rel):
        assert "rejects" not in rel, f"the driver read {rel} whole"
        return real_read_bytes(self, rel)

    real_read_bytes = Store.read_bytes
    monkeypatch.setattr(ray.data.Dataset, "iter_batches", recording)
    monkeypatch.setattr(Store, "read_bytes", read_bytes)
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf", "scoring.shard_size=8", "scoring.batch_size=2",
                      data=mostly_rejects)
    (result,) = cache.run(cfg)

    assert received and all(b.schema == shards.STATS for b in received)  # no token ids, log-probs or rejects
    stats = sorted((row for b in received for row in b.to_pylist()), key=lambda s: s["_shard"])
    assert [(s["_shard"], s["rows"], s["pairs"], s["rejected"]) for s in stats] == [(i, 8, 2, 6) for i in range(5)]
    manifest = json.loads(Path(result.uri, "manifest.json").read_text())
    for s, f in zip(stats, manifest["files"]):  # the writers' hashes and sizes are the files' own
        path = Path(result.uri, f["path"])
        assert f["sha256"] == s["sha256"] == sha256_file(path) and f["bytes"] == s["bytes"] == path.stat().st_size
    rejects = [json.loads(x) for x in Path(result.rejects_uri).read_text().splitlines()]
    assert [x["index"] for x in rejects] == [i for i in range(40) if i % 4]
    assert manifest["rejects"]["sha256"] == sha256_file(Path(result.rejects_uri))
    assert read_cache(result).column("id").to_pylist() == [f"r{i}" for i in range(0, 40, 4)]
