"""Token files: the preference pairs tokenized for training, without reference log-probs.

A loss with no term that reads the reference (`sft`, `simpo`, `orpo`: `cfg.train.needs_reference` is False) needs
no reference cache. Training then reads token files, written here by Ray tasks, one per source shard, exactly as
stage 1 tokenizes (the same resolution of tokenizer and chat template, `resolve_inputs`; the same shard plan; the
same `shards.tokenize_shard`; duplicate ids dropped alike, `shards.finish`), so that the pairs, their order and the
data lanes are those a reference cache of the same inputs would give. The driver holds counts, never rows.

Layout under `cache_dir/tokens-<key>/` (the key hashes only what decides the tokens: tokenizer, chat template,
data, truncation, tokenization version; not the model's weights, so every model sharing the tokenizer reuses them):

    manifest.json            written last: its presence means the token files are complete
    data/part-NNNNN.parquet  one file per source shard: `id` and the token id columns (README "Cache schema")
    rejects.jsonl            unusable rows with their reason (never fatal)
    .work/                   while in progress: the shard plan, a marker + rejects per finished shard

Resumable as the cache is: a finished shard (its marker, its file unchanged) is not redone. The files are checked
against the manifest's sha256s when reused; damaged token files are tokenized again. A complete, intact reference
cache of the same inputs holds the same pairs (and more columns): when there is one it is used instead.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import ray

from pipeline.caches import shards
from pipeline.caches.layout import (
    MANIFEST,
    CacheInputs,
    CacheRef,
    CacheSpec,
    damaged_files,
    find_cache,
    keyed_inputs,
    pending_shards,
    resolve_inputs,
)
from pipeline.config import DataConfig
from pipeline.data.models import load_tokenizer
from pipeline.data.sources import SourcePlan
from pipeline.errors import UserError
from pipeline.runtime.console import progress_bar
from pipeline.store.fingerprint import SCHEMA_VERSION, cache_key
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store

TOKENS_SCHEMA = pa.schema([shards.PAIR.field(n) for n in ("id", *shards.TOKEN_COLUMNS)])


def token_inputs(prep: CacheInputs) -> dict[str, Any]:
    """What decides the tokens of a split: its cache inputs (tokenizer, chat template, data, truncation,
    tokenization version) without the model and its dtype."""
    return {k: v for k, v in prep.inputs.items() if k not in ("model", "dtype")}


def token_key(prep: CacheInputs) -> str:
    """The key of `token_inputs`, paths left out (as for the cache: moving a file must not invalidate it)."""
    keyed = {k: v for k, v in keyed_inputs(prep.inputs).items() if k not in ("model", "dtype")}
    return "tokens-" + cache_key({"kind": "tokens", **keyed})


def token_store(layout: RunLayout, prep: CacheInputs) -> Store:
    """`cache_dir/tokens-<key>/`."""
    return layout.cache(token_key(prep))


def intact_manifest(store: Store) -> dict[str, Any] | None:
    """The manifest of a complete directory of shards (a cache or token files) whose files match it, else None."""
    if not store.exists(MANIFEST):
        return None
    manifest = store.read_json(MANIFEST)
    return None if damaged_files(store, manifest) else manifest


def training_pairs(spec: CacheSpec, needs_reference: bool, split: str, join_ray: Callable[[], None],
                   progress_factory=None) -> CacheRef:
    """The pairs training reads for `split`: with a loss that reads the reference, the split's reference cache
    (`find_cache`, which refuses a missing or damaged one); with a reference-free loss, an intact reference cache of
    these inputs if there is one (or `train.cache_path`), else the token files, written here when missing. The
    result's `key` is the inputs' cache key either way (it keys the training run, `stages/train.train_key`).
    `needs_reference`: the loss's (`train.needs_reference`); `join_ray` is called before tokenizing."""
    if needs_reference or (split == "train" and spec.cache_path):
        return find_cache(spec, split)
    prep = resolve_inputs(spec, split)
    cache = spec.layout.cache(prep.key)
    manifest = intact_manifest(cache)
    if manifest is None:
        cache = token_store(spec.layout, prep)
        manifest = intact_manifest(cache) or write_tokens(spec, prep, join_ray, progress_factory)
    return CacheRef(split, prep.key, cache.uri, [f"{cache.uri}/{f['path']}" for f in manifest["files"]],
                    manifest["counts"]["pairs"], prep.model_dir, prep.tokenizer_dir, prep.chat_template,
                    [f["rows"] for f in manifest["files"]])


# ---------------------------------------------------------------- writing


def _tokenize_shard(uri: str, plan: dict[str, Any], sid: int, fmt: str, tokenizer_dir: str,
                    chat_template: str | None, max_length: int, max_prompt_length: int, marker: str) -> dict:
    """Ray task: one shard read and tokenized; its rejects file, its data file, then its marker (the shard is
    finished). Returns its row count and a storage failure's line (`error`), nothing else."""
    store, source = Store(uri), SourcePlan.from_dict(plan)
    shard = source.shards[sid]
    tok = load_tokenizer(tokenizer_dir, chat_template)
    pairs, rejects = shards.tokenize_shard(source, shard, tok, fmt, max_length, max_prompt_length, marker)
    rows = shard.stop - shard.start
    try:
        shards.write_rejects(store, sid, rejects)
        digest, size = shards.write_data(store, sid, pairs, TOKENS_SCHEMA)
        shards.write_marker(store, sid, pairs, digest, size, rows, len(rejects),
                            json.loads(shards.reasons_json(rejects)), [ray.get_runtime_context().get_node_id()])
    except UserError as e:
        return {"rows": rows, "error": str(e)}
    return {"rows": rows, "error": None}


_tokenize_task = ray.remote(num_cpus=1)(_tokenize_shard)


def _run_tasks(data: DataConfig, prep: CacheInputs, store: Store, plan: SourcePlan, todo: list,
               progress_factory) -> None:
    """One Ray task per unfinished shard; the bar counts source rows as the shards finish."""
    refs = [_tokenize_task.remote(store.uri, plan.to_dict(), s.index, prep.fmt, prep.tokenizer_dir,
                                  prep.chat_template, data.max_length, data.max_prompt_length,
                                  data.implicit_prompt_marker) for s in todo]
    with (progress_factory or progress_bar)(total=sum(s.stop - s.start for s in todo),
                                            desc=f"tokenizing {prep.split}") as bar:
        while refs:
            done, refs = ray.wait(refs, num_returns=1)
            (result,) = shards.get(done)
            if result["error"]:
                raise UserError(result["error"])
            bar.update(result["rows"])


def write_tokens(spec: CacheSpec, prep: CacheInputs, join_ray: Callable[[], None],
                 progress_factory=None) -> dict[str, Any]:
    """Tokenize the split's unfinished shards into its token directory (Ray tasks, after `join_ray()`), finish it
    (duplicate ids, rejects, counts) and write its manifest last; returns the manifest."""
    store = token_store(spec.layout, prep)
    if store.exists(MANIFEST):  # damaged (else it would have been used): tokenized again
        store.delete(MANIFEST)
    join_ray()
    plan, todo = pending_shards(store, prep)
    if todo:
        _run_tasks(spec.data, prep, store, plan, todo, progress_factory)
    finished = shards.finish(store, plan, TOKENS_SCHEMA)
    manifest = {
        "schema_version": SCHEMA_VERSION, "kind": "tokens", "key": token_key(prep), "split": prep.split,
        "inputs": token_inputs(prep), "counts": finished.counts,
        "files": [{"path": m["file"], "rows": m["pairs"], "sha256": m["sha256"], "bytes": m["bytes"]}
                  for m in finished.markers],
        "rejects": {"path": "rejects.jsonl", "rows": finished.counts["rejected"], "sha256": finished.rejects_sha256},
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shards.commit(store, manifest, finished)
    c = finished.counts
    reasons = ", ".join(f"{k}: {v}" for k, v in c["reasons"].items()) or "none"
    print(f"[{prep.split}] tokenized: rows {c['rows']}, pairs {c['pairs']}, rejected {c['rejected']} ({reasons})"
          + (f"; rejects in {store.uri}/rejects.jsonl" if c["rejected"] else ""))
    return manifest
