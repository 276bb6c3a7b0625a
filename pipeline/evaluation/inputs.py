"""Stage 3's inputs: the prompts to sample (`eval.prompts`, tokenized like the cache) and the held-out cached pairs
that preference accuracy is measured on."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import ray

from pipeline.caches.layout import CacheRef
from pipeline.config import Config, DataSource
from pipeline.data.rows import tokenize_prompts
from pipeline.data.sources import Shard, SourcePlan, plan_source, read_shard
from pipeline.engines.chunks import PROMPTS, PromptChunk, PromptFile, prompt_rows, read_table, split_uri, write_table
from pipeline.errors import UserError
from pipeline.store.fingerprint import sha256_json
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store

PROMPTS_LAYOUT = 3  # bump when the prompt files change form: older ones are written again


@dataclass
class Prompts:
    """The evaluation prompts, tokenized into `<eval_dir>/prompts/*.parquet` by Ray tasks (`chunks.PROMPTS`
    rows): the files in order, the number of prompts, a key of their content, and the unusable rows."""

    files: list[PromptFile]
    count: int
    sha256: str
    rejected: int

    def chunks(self, lo: int = 0, hi: int | None = None) -> list[PromptChunk]:
        """One sampling call per file (files hold up to `eval.batch_prompts` prompts), for the prompts with global
        indices [lo, hi) (default: all)."""
        hi = self.count if hi is None else hi
        return [PromptChunk(f.uri, max(lo, f.first) - f.first, min(hi, f.first + f.rows) - f.first, max(lo, f.first))
                for f in self.files if f.rows and f.first < hi and lo < f.first + f.rows]

    def to_dict(self) -> dict[str, Any]:
        return {"files": [asdict(f) for f in self.files], "count": self.count, "sha256": self.sha256,
                "rejected": self.rejected}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Prompts:
        return cls([PromptFile(**f) for f in d["files"]], d["count"], d["sha256"], d["rejected"])


@dataclass(frozen=True)
class PromptSettings:
    """How a source's rows become prompts (as in the cache)."""

    format: str
    max_length: int
    max_prompt_length: int
    marker: str | None


@dataclass(frozen=True)
class PromptSource:
    """Where evaluation's prompts come from and how they are read: `eval.prompts` (default: the eval split, else
    train), tokenized like the cache (`settings`), planned in the cache's shards (`shard_size`, the plan kept in
    `sources`: a data split's plan is then the one the cache stage made), at most `num_prompts` (all when 0),
    written as files of up to `batch_prompts`."""

    source: DataSource
    settings: PromptSettings
    num_prompts: int
    batch_prompts: int
    shard_size: int
    sources: Store

    @classmethod
    def of(cls, cfg: Config) -> PromptSource:
        src, data = cfg.eval.prompts or cfg.data.eval or cfg.data.train, cfg.data
        return cls(src, PromptSettings(src.format, data.max_length, data.max_prompt_length,
                                       data.implicit_prompt_marker),
                   cfg.eval.num_prompts, cfg.eval.batch_prompts, cfg.scoring.shard_size, RunLayout.of(cfg).sources)


def load_prompts(ps: PromptSource, tok, eval_dir: Store, tokenizer_identity: dict[str, Any],
                 join_ray: Callable[[], None]) -> Prompts:
    """The prompts, tokenized by Ray tasks (one per shard of the source) that write the prompt files; rejects go to
    `<eval_dir>/prompt_rejects.jsonl`. Files written for the same source and settings are reused; else
    `join_ray()` is called first."""
    src = ps.source
    plan = plan_source(src, ps.shard_size, ps.sources)
    key = sha256_json({"layout": PROMPTS_LAYOUT, "source": plan.sha256, "settings": asdict(ps.settings),
                       "tokenizer": tokenizer_identity, "num_prompts": ps.num_prompts,
                       "batch_prompts": ps.batch_prompts, "shard_size": ps.shard_size})
    store = eval_dir.child("prompts")
    if store.exists("manifest.json") and store.read_json("manifest.json")["key"] == key:
        prompts = Prompts.from_dict(store.read_json("manifest.json")["prompts"])
    else:
        join_ray()
        store.delete("")
        prompts = _tokenize(plan, tok, ps.settings, store, eval_dir, ps.num_prompts, ps.batch_prompts)
        store.write_json("manifest.json", {"key": key, "prompts": prompts.to_dict()})
    if not prompts.count:
        raise UserError(f"no usable prompts in {src.path!r} ({prompts.rejected} rejected, reasons in "
                        f"{eval_dir.uri}/prompt_rejects.jsonl); point eval.prompts at prompt data")
    return prompts


def _tokenize(plan: SourcePlan, tok, settings: PromptSettings, store: Store, eval_dir: Store,
              limit: int | None, per_file: int) -> Prompts:
    """Tokenize shards in order, a few at a time, until `limit` prompts are there; then one task cuts the last
    file to the limit, gathers the rejects and keys the content."""
    tok_ref, window = ray.put(tok), max(2, int(ray.cluster_resources().get("CPU", 2)))
    counts: dict[int, tuple[list[int], int]] = {}  # shard -> (prompts per file, rejects)
    pending: dict[ray.ObjectRef, int] = {}
    task = ray.remote(tokenize_prompt_shard).options(num_cpus=1)
    next_shard, used = 0, None
    while used is None and (pending or next_shard < len(plan.shards)):
        while next_shard < len(plan.shards) and len(pending) < window:
            shard = plan.shards[next_shard]
            pending[task.remote(plan, shard, tok_ref, settings, store.uri, per_file)] = next_shard
            next_shard += 1
        done, _ = ray.wait(list(pending), num_returns=1)
        counts[pending.pop(done[0])] = ray.get(done[0])
        used = _shards_needed(counts, limit)
    ray.get(list(pending))  # their files are not used; let them finish before the listing is final
    used = len(plan.shards) if used is None else used
    files, first = [], 0
    for i in range(used):
        for j, n in enumerate(counts[i][0]):
            rows = n if limit is None else min(n, limit - first)
            if rows > 0:
                files.append(PromptFile(f"{store.uri}/{i:06d}-{j:04d}.parquet", first, rows))
                first += rows
    sha = ray.get(ray.remote(finish_prompts).options(num_cpus=1).remote(
        files, [f"{store.uri}/{i:06d}.rejects.jsonl" for i in range(used)], f"{eval_dir.uri}/prompt_rejects.jsonl"))
    return Prompts(files, first, sha, sum(counts[i][1] for i in range(used)))


def _shards_needed(counts: dict[int, tuple[int, int]], limit: int | None) -> int | None:
    """How many leading shards hold `limit` prompts, once known; None while not (or without a limit)."""
    total, i = 0, 0
    while limit and i in counts:
        total += sum(counts[i][0])
        i += 1
        if total >= limit:
            return i
    return None


def tokenize_prompt_shard(plan: SourcePlan, shard: Shard, tok, settings: PromptSettings, out_uri: str,
                          per_file: int) -> tuple[list[int], int]:
    """Ray task: one source shard's prompts into `<out>/<shard>-<j>.parquet`, files of up to `per_file` prompts
    (one sampling call each), its rejects into `<out>/<shard>.rejects.jsonl`. Returns (prompts per file,
    rejects)."""
    items, rejects = tokenize_prompts(read_shard(plan, shard), tok, settings.format, settings.max_length,
                                      settings.max_prompt_length, settings.marker)
    prompt_ids = [i.prompt_input_ids for i in items]
    table = pa.table({"id": [i.id for i in items], "prompt_input_ids": prompt_ids,
                      "chosen_input_ids": [i.chosen_input_ids for i in items],
                      "prompt": tok.batch_decode(prompt_ids, skip_special_tokens=True),
                      "prompt_source": [i.source for i in items]}, schema=PROMPTS)
    store = Store(out_uri)
    sizes = []
    for j, start in enumerate(range(0, max(len(table), 1), per_file)):
        part = table.slice(start, per_file)
        store.write_parquet(f"{shard.index:06d}-{j:04d}.parquet", part)
        sizes.append(len(part))
    store.write_bytes(f"{shard.index:06d}.rejects.jsonl", "".join(r.to_json() + "\n" for r in rejects).encode())
    return sizes, len(rejects)


def finish_prompts(files: list[PromptFile], rejects: list[str], rejects_uri: str) -> str:
    """Ray task: cut each file to its `rows` (the last one may hold more than `eval.num_prompts` needs), write
    the used shards' rejects into one file, and return the key of the prompts' content (ids and token ids)."""
    h = hashlib.sha256()
    for f in files:
        table = read_table(f.uri)
        if len(table) > f.rows:
            table = table.slice(0, f.rows)
            write_table(f.uri, table)
        for row in table.select(["id", "prompt_input_ids", "chosen_input_ids"]).to_pylist():
            h.update(json.dumps(list(row.values())).encode())
    out = b"".join(split_uri(uri)[0].read_bytes(split_uri(uri)[1]) for uri in rejects)
    split_uri(rejects_uri)[0].write_bytes(split_uri(rejects_uri)[1], out)
    return h.hexdigest()


def read_prompts(prompts: Prompts) -> pa.Table:
    """All prompts in one table (with `prompt_index`): for inspection and tests, not for the stage."""
    return prompt_rows(prompts.files, 0, prompts.count, ["prompt_index", "id", "prompt_input_ids",
                                                         "chosen_input_ids", "prompt"])


@dataclass
class HeldOutPairs:
    """The cached held-out pairs that preference accuracy is measured on: the eval split's cache files (read by
    the engines, not by the driver) and that cache's key."""

    files: list[str]
    cache_key: str


def held_out_pairs(cache: CacheRef) -> HeldOutPairs:
    """The eval split's cached pairs (for `eval.preference_accuracy`), as its cache holds them (`find_cache`'s
    result carries its manifest's key)."""
    return HeldOutPairs(list(cache.files), cache.key)
