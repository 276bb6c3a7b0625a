"""Integration tier: the cache stage on Ray, with the vLLM and hf engines, on the tiny model.

The reference values are checked against an independent computation written here: a plain transformers fp32
forward with a full log-softmax, nothing shared with the pipeline's code.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline import orchestrate
from pipeline.caches import layout as cache_layout
from pipeline.caches import shards
from pipeline.caches.layout import CacheSpec
from pipeline.data import sources
from pipeline.errors import UserError
from pipeline.evaluation.inputs import PromptSource, load_prompts
from pipeline.runtime.session import connect
from pipeline.store.fingerprint import sha256_file
from pipeline.store.storage import Store
from stages import cache
from tests.conftest import DATA, copy_cache, make_config, read_cache

pytestmark = pytest.mark.ray
TOL = 1e-4


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    return AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()


def independent_token_logps(model, prompt: list[int], response: list[int]) -> np.ndarray:
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    return logp[len(prompt) - 1:-1].gather(-1, ids[0, len(prompt):, None])[:, 0].numpy()


def assert_matches_transformers(table: pa.Table, model) -> None:
    rows = table.to_pylist()
    assert rows
    for row in rows:
        for side in ("chosen", "rejected"):
            expected = independent_token_logps(model, row["prompt_input_ids"], row[f"{side}_input_ids"])
            tokens = np.asarray(row[f"ref_{side}_token_logps"])
            assert len(tokens) == len(row[f"{side}_input_ids"])
            np.testing.assert_allclose(tokens, expected, atol=TOL)
            assert abs(row[f"ref_{side}_logps"] - expected.astype(np.float64).sum()) < TOL
            assert abs(row[f"ref_{side}_logps"] - tokens.astype(np.float64).sum()) < 1e-6


@pytest.fixture(scope="module")
def vllm_run(tiny_model, tmp_path_factory, ray_local):
    """One vLLM engine for the module, its engine core in a process of its own as users run it (eager, as the
    CPU configs run it: configs/tiny.yaml, sentiment.yaml; torch.compile's C++ build takes ~70 s here): train =
    standard, eval = conversational."""
    tmp = tmp_path_factory.mktemp("vllm")
    cfg = make_config(tiny_model, tmp, "scoring.engine=vllm", f"data.eval.path={DATA / 'conversational.jsonl'}",
                      "scoring.engine_kwargs={enforce_eager: true}")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")
        return cfg, {r.split: r for r in cache.run(cfg)}


@pytest.mark.vllm
def test_vllm_cache_equals_transformers_fp32(vllm_run, hf_model):
    _, results = vllm_run
    for split in ("train", "eval"):
        assert not results[split].reused and results[split].shards_computed == results[split].shards_total
        assert_matches_transformers(read_cache(results[split]), hf_model)


@pytest.mark.vllm
def test_hf_engine_equals_vllm_engine(vllm_run, tmp_path, standard_cache):
    """The session's cache (the hf engine, the same rows and settings) holds the vLLM engine's values."""
    cfg, vllm_results = vllm_run
    cfg_hf = cfg.model_copy(update={"cache_dir": str(copy_cache(standard_cache, tmp_path)),
                                    "run_dir": str(tmp_path / "run")})
    cfg_hf.scoring.engine = "hf"
    for r in cache.run(cfg_hf):
        v = read_cache(vllm_results[r.split])
        h = read_cache(r)
        assert r.key == vllm_results[r.split].key and r.reused  # the engine is not part of the key
        assert json.loads(Path(r.uri, "manifest.json").read_text())["engine"] == "hf"
        assert h.column("id").to_pylist() == v.column("id").to_pylist()
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(h.column(f"ref_{side}_logps").to_numpy(),
                                       v.column(f"ref_{side}_logps").to_numpy(), atol=TOL)


@pytest.mark.vllm
def test_schema_manifest_and_checksums(vllm_run):
    _, results = vllm_run
    r = results["train"]
    table = read_cache(r)
    assert table.schema.names == ["id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids",
                                  "ref_chosen_logps", "ref_rejected_logps", "ref_chosen_token_logps",
                                  "ref_rejected_token_logps"]
    types = {f.name: f.type for f in table.schema}
    assert types["id"] == pa.string()
    for c in ("prompt", "chosen", "rejected"):
        assert types[f"{c}_input_ids"] == pa.list_(pa.int32())
    for s in ("chosen", "rejected"):
        assert types[f"ref_{s}_logps"] == pa.float64()
        assert types[f"ref_{s}_token_logps"] == pa.list_(pa.float32())
    manifest = json.loads(open(f"{r.uri}/manifest.json").read())
    assert manifest["key"] == r.key and manifest["engine"] == "vllm"
    assert manifest["counts"]["pairs"] == table.num_rows == 24
    assert manifest["counts"]["rows"] == manifest["counts"]["pairs"] + manifest["counts"]["rejected"]
    for f in manifest["files"] + [manifest["rejects"]]:
        assert sha256_file(f"{r.uri}/{f['path']}") == f["sha256"]
    assert {"torch", "transformers", "ray", "pyarrow"} <= set(manifest["versions"])
    assert not any(p.name.startswith(".") for p in Path(r.uri).rglob("*"))  # no work or temp files left


@pytest.mark.vllm
def test_second_run_computes_nothing(vllm_run):
    cfg, first = vllm_run
    files = {p: p.stat().st_mtime_ns for r in first.values()
             for p in Path(r.uri).rglob("*") if p.is_file()}
    again = {r.split: r for r in cache.run(cfg)}
    for split, r in again.items():
        assert r.reused and r.shards_computed == 0 and r.key == first[split].key
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten


@pytest.fixture(scope="module")
def format_caches(tiny_model, tmp_path_factory, standard_cache):
    """Each data format's cache (hf engine): standard is the session's train cache, found again by a cache run;
    conversational and implicit (whole conversations as prompts: a longer prompt limit) are built here, in one run
    as its train and eval splits."""
    root = tmp_path_factory.mktemp("formats")
    copy_cache(standard_cache, root / "session")
    (standard,) = cache.run(make_config(tiny_model, root / "session", "scoring.engine=hf"))
    assert standard.reused
    built = {r.split: r for r in cache.run(make_config(
        tiny_model, root / "built", "scoring.engine=hf", "data.max_prompt_length=100",
        f"data.eval.path={DATA / 'implicit.jsonl'}", data=DATA / "conversational.jsonl"))}
    return {"standard": standard, "conversational": built["train"], "implicit": built["eval"]}


@pytest.mark.parametrize("name", ["standard", "conversational", "implicit"])
def test_each_format_hf_engine(name, format_caches, hf_model, tokenizer):
    r = format_caches[name]
    table = read_cache(r)
    assert r.counts["pairs"] == table.num_rows == 24 and r.counts["rejected"] == 0
    assert_matches_transformers(table, hf_model)
    rows = [json.loads(line) for line in open(DATA / f"{name}.jsonl")]
    for row, got in zip(rows, table.to_pylist()):
        prompt = tokenizer.decode(got["prompt_input_ids"])
        if name == "standard":
            assert prompt == "<|bos|>" + row["prompt"]
        elif name == "implicit":
            assert prompt.startswith("<|bos|>") and prompt.endswith("\n\nAssistant:")
        else:
            assert prompt.startswith("<|bos|>") and prompt.endswith("<|assistant|>")
        for side in ("chosen", "rejected"):
            assert tokenizer.decode(got[f"{side}_input_ids"]).endswith("<|endoftext|>")


def session_train_cache(tiny_model, root: Path, standard_cache: Path):
    """The session's cache of standard.jsonl (hf engine, `make_config`'s settings), copied under `root`."""
    copy_cache(standard_cache, root)
    (r,) = cache.run(make_config(tiny_model, root, "scoring.engine=hf"))
    assert r.reused
    return r


def test_parquet_source_gives_same_cache_values(tiny_model, tmp_path, standard_cache):
    rows = [json.loads(line) for line in open(DATA / "standard.jsonl")]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "standard.parquet", row_group_size=5)
    from_jsonl = session_train_cache(tiny_model, tmp_path / "a", standard_cache)
    (from_parquet,) = cache.run(make_config(tiny_model, tmp_path / "b", "scoring.engine=hf",
                                            data=tmp_path / "standard.parquet"))
    assert from_jsonl.key != from_parquet.key  # different data bytes
    a, b = read_cache(from_jsonl), read_cache(from_parquet)
    assert a.select(["id", "prompt_input_ids", "chosen_input_ids"]) == b.select(["id", "prompt_input_ids",
                                                                                 "chosen_input_ids"])
    np.testing.assert_allclose(a.column("ref_chosen_logps").to_numpy(), b.column("ref_chosen_logps").to_numpy(),
                               atol=1e-6)


def _date_back(root: Path) -> None:
    """Files written a minute ago, as a later run finds them (one written just now is read again: `plan_source`)."""
    old = time.time_ns() - 60_000_000_000
    for p in [root, *root.rglob("*")] if root.is_dir() else [root]:
        os.utime(p, ns=(old, old))


def test_one_run_reads_the_source_once_and_checks_the_cache_once(tiny_model, tmp_path, ray_local, tokenizer,
                                                                  monkeypatch):
    """The driver work of `run` (plan, the cache stage, training's lookup, evaluation's prompts) plans the source
    (its one full read) once; the cache it wrote is not read back; a later process reads each cache file once."""
    planned, hashed = Counter(), Counter()
    real_plan, real_hash = sources._plan_jsonl, cache_layout.sha256_files
    monkeypatch.setattr(sources, "_plan_jsonl", lambda file, *a: planned.update([file.uri]) or real_plan(file, *a))
    monkeypatch.setattr(cache_layout, "sha256_files",
                        lambda store, rels, size: hashed.update(rels) or real_hash(store, rels, size))
    monkeypatch.setattr(sources, "_PLANS", {})
    monkeypatch.setattr(cache_layout, "_VERIFIED", {})
    data = tmp_path / "pairs.jsonl"
    shutil.copy(DATA / "standard.jsonl", data)
    _date_back(data)
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf", "eval.num_prompts=4", data=data)
    orchestrate.plan(cfg, evaluate=False)
    (r,) = cache.run(cfg)
    assert cache_layout.find_cache(CacheSpec.of(cfg), "train").pairs == r.counts["pairs"]
    assert load_prompts(PromptSource.of(cfg), tokenizer, Store(cfg.run_dir).child("eval"), {"tokenizer": "tiny"},
                        join_ray=lambda: connect(cfg.ray, cfg.run_dir, cfg.shared_paths())).count == 4
    assert planned == {str(data): 1} and not hashed

    monkeypatch.setattr(sources, "_PLANS", {})  # a later process: the plan is remembered under cache_dir
    monkeypatch.setattr(cache_layout, "_VERIFIED", {})
    _date_back(Path(r.uri))
    manifest = json.loads(Path(r.uri, "manifest.json").read_text())
    files = [f["path"] for f in manifest["files"]] + ["rejects.jsonl"]
    for _ in range(2):  # the stage's reuse check, then training's lookup: each file read once
        (again,) = cache.run(cfg)
        assert again.reused
        cache_layout.find_cache(CacheSpec.of(cfg), "train")
    assert planned == {str(data): 1} and hashed == Counter(files)
    (Path(r.uri) / files[0]).write_bytes(b"damaged")  # rewritten: read again, and refused
    with pytest.raises(UserError, match="is damaged"):
        cache_layout.find_cache(CacheSpec.of(cfg), "train")
    assert hashed[files[0]] == 2


def test_cache_checks_in_ray_tasks(tiny_model, tmp_path, standard_cache, monkeypatch):
    """Over `RAY_MIN_BYTES` to check, a joined process hashes cache files in Ray tasks: same verdicts."""
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf")
    copy_cache(standard_cache, tmp_path)
    (r,) = cache.run(cfg)
    assert r.reused  # the session's cache, copied
    monkeypatch.setattr(cache_layout, "RAY_MIN_BYTES", 0)
    store = Store(r.uri)
    manifest = store.read_json("manifest.json")
    rels = [f["path"] for f in manifest["files"]]
    assert cache_layout.sha256_files(store, rels + ["data/missing.parquet"], 1) == \
        [f["sha256"] for f in manifest["files"]] + [None]


def test_sources_and_cache_on_s3_give_the_local_values(standard_cache, s3_ray, tiny_model, tmp_path):
    """The train split at an s3:// URI, the eval split a `datasets` directory exported into an s3:// cache_dir: both
    cache the values of the local JSONL file."""
    rows = [json.loads(line) for line in open(DATA / "standard.jsonl")]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    Store(s3_ray).write_bytes("data/standard.jsonl", (DATA / "standard.jsonl").read_bytes())
    local = session_train_cache(tiny_model, tmp_path / "local", standard_cache)
    remote = {r.split: r for r in cache.run(make_config(
        tiny_model, tmp_path / "remote", "scoring.engine=hf", f"cache_dir={s3_ray}/cache",
        f"data.eval.path={tmp_path / 'ds'}", data=f"{s3_ray}/data/standard.jsonl"))}
    assert remote["train"].key == local.key and remote["train"].uri == f"{s3_ray}/cache/{local.key}"
    assert [n for n in Store(f"{s3_ray}/cache/sources").listdir() if n.endswith(".parquet")]  # the export
    want = read_cache(local)
    for r in remote.values():
        # Written by the workers into the bucket, as a local cache is: one file per shard, checksums that match,
        # no work files left.
        store = Store(r.uri)
        manifest = store.read_json("manifest.json")
        assert [f["path"] for f in manifest["files"]] == [shards.data_file(i) for i in range(3)]
        assert all(store.sha256(f["path"]) == f["sha256"] for f in manifest["files"] + [manifest["rejects"]])
        assert not store.exists(".work") and manifest["counts"]["pairs"] == 24
        got = pa.concat_tables(store.read_parquet(f["path"]) for f in manifest["files"])
        assert got.select(["id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]) == \
            want.select(["id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
        for side in ("chosen", "rejected"):
            np.testing.assert_allclose(got.column(f"ref_{side}_logps").to_numpy(),
                                       want.column(f"ref_{side}_logps").to_numpy(), atol=TOL)


@pytest.mark.vllm
def test_the_readme_recipes_read_the_cache(vllm_run):
    """The README's pandas and `datasets` recipes, run as written, give the cache's rows."""
    import re

    _, results = vllm_run
    r = results["train"]
    blocks = re.findall(r"```python\n(.*?)```", (Path(__file__).resolve().parents[1] / "README.md").read_text(), re.S)
    pandas_block = next(b for b in blocks if "pd.read_parquet" in b)
    datasets_block = next(b for b in blocks if "load_dataset(\"parquet\"" in b)
    scope: dict = {}
    exec(pandas_block.replace('"cache/<key>"', repr(r.uri)), scope)  # noqa: S102 (the README's own code)
    exec(datasets_block, scope)  # noqa: S102
    want = read_cache(r)
    df, ds = scope["df"], scope["ds"]
    assert df["id"].tolist() == ds["id"] == want.column("id").to_pylist()
    np.testing.assert_array_equal(df["ref_chosen_logps"].to_numpy(), want.column("ref_chosen_logps").to_numpy())
    assert ds["rejected_input_ids"] == want.column("rejected_input_ids").to_pylist()
