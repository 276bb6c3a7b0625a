"""The reference cache's layout and identity: which inputs key a cache, where it lives, and whether a complete one
is intact. Stage 1 writes caches; training, evaluation and `plan` find and check them here.

    <cache_dir>/<key>/manifest.json            written last: its presence means the cache is complete
    <cache_dir>/<key>/data/part-NNNNN.parquet  one file per source shard (schema: README "Cache schema")
    <cache_dir>/<key>/rejects.jsonl            unusable rows with their reason
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline.config import Config, DataConfig, DataSource, ModelConfig, TokenizerConfig
from pipeline.data.models import (
    check_causal_lm,
    effective_template_sha,
    read_chat_template,
    resolve_model,
    resolve_tokenizer,
)
from pipeline.data.rows import TOKENIZATION_VERSION
from pipeline.data.sources import SETTLE_NS, Shard, SourcePlan, plan_source
from pipeline.errors import UserError
from pipeline.store.fingerprint import cache_key
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store


@dataclass
class CacheInputs:
    """One split's cache, resolved on the driver: its key, what the key hashes, the source's shard plan and the
    model and tokenizer directories."""

    split: str
    key: str
    inputs: dict[str, Any]  # what the key hashes, recorded in the manifest
    plan: SourcePlan
    model_dir: str
    tokenizer_dir: str
    chat_template: str | None
    fmt: str


@dataclass(frozen=True)
class CacheSpec:
    """What keys a split's cache and where caches are: the config sections the key hashes (the model, tokenizer,
    data and its truncation), scoring's shard size (how a source is planned), the run's layout (cache_dir) and an
    explicit train cache (`train.cache_path`)."""

    model: ModelConfig
    tokenizer: TokenizerConfig
    data: DataConfig
    shard_size: int
    layout: RunLayout
    cache_path: str | None = None

    @classmethod
    def of(cls, cfg: Config) -> CacheSpec:
        return cls(cfg.model, cfg.tokenizer, cfg.data, cfg.scoring.shard_size, RunLayout.of(cfg), cfg.train.cache_path)

    def source(self, split: str) -> DataSource:
        return self.data.train if split == "train" else self.data.eval


def resolve_inputs(spec: CacheSpec, split: str, src: DataSource | None = None) -> CacheInputs:
    """Resolve model/tokenizer/data (`src`, default the split's source), hash them and derive the cache key."""
    src = src or spec.source(split)
    model = resolve_model(spec.model.path, spec.model.revision)
    check_causal_lm(model.local_dir, spec.model.trust_remote_code)
    tok_path = spec.tokenizer.path or spec.model.path
    tokenizer = resolve_tokenizer(tok_path, spec.model.revision if spec.tokenizer.path is None else None)
    template = read_chat_template(spec.tokenizer.chat_template)
    plan = plan_source(src, spec.shard_size, spec.layout.sources)
    if plan.num_rows == 0:
        raise UserError(f"data.{split}.path {src.path!r} has no rows; point it at a non-empty file")
    data = spec.data
    inputs = {
        "model": {"path": spec.model.path, **model.identity},
        "tokenizer": {"path": tok_path, **tokenizer.identity},
        "chat_template_sha256": effective_template_sha(tokenizer.local_dir, template),
        "data": {"path": src.path, "sha256": plan.sha256, "rows": plan.num_rows, "format": src.format,
                 "implicit_prompt_marker": data.implicit_prompt_marker},
        "truncation": {"max_length": data.max_length, "max_prompt_length": data.max_prompt_length},
        "dtype": spec.model.dtype,
        "tokenization": TOKENIZATION_VERSION,
    }
    return CacheInputs(split, cache_key(keyed_inputs(inputs)), inputs, plan, model.local_dir, tokenizer.local_dir,
                    template, src.format)


def keyed_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs without their paths: paths are recorded for people, not hashed (moving a file must not
    invalidate the cache)."""
    keyed = json.loads(json.dumps(inputs))
    for part in ("model", "tokenizer", "data"):
        keyed[part].pop("path", None)
    return keyed


# Cache files whose bytes this process hashed (or wrote) and found equal to their manifest's sha256, by
# (uri, size, mtime_ns): within one `run` the cache, training and evaluation each check the cache, which must read
# it once, not three times. A rewrite changes size or mtime, and the file is read again.
_VERIFIED: dict[tuple[str, int, int], str] = {}
# Below this many bytes to check, threads in this process are quicker than starting Ray tasks.
RAY_MIN_BYTES = 1 << 30


def file_stats(store: Store, rel: str = "") -> dict[str, tuple[int, int]]:
    """{path under `rel`: (size, mtime_ns)} of the files there, from one listing (not one request per file)."""
    return {path: (size, mtime) for path, size, mtime in store.stamp(rel)}


def remember_verified(store: Store, rel: str, sha256: str, stat: tuple[int, int]) -> None:
    """Note that file `rel`, at (size, mtime_ns) `stat`, holds bytes with this sha256 (this process wrote them)."""
    _VERIFIED[(f"{store.uri}/{rel}", *stat)] = sha256


def _sha256_many(uri: str, rels: list[str]) -> list[str | None]:
    store = Store(uri)
    return [store.sha256(rel) for rel in rels]


_sha256_task = ray.remote(num_cpus=0)(_sha256_many)  # I/O bound, and must not wait for CPUs actors hold


def sha256_files(store: Store, rels: list[str], total_bytes: int) -> list[str | None]:
    """sha256 of each file (None if missing), read in parallel: by Ray tasks spread over the nodes when this
    process has joined Ray and there is much to read, else by a pool of threads here (hashing and pyarrow's reads
    release the GIL)."""
    if not rels:
        return []
    if ray.is_initialized() and total_bytes >= RAY_MIN_BYTES:
        n = min(len(rels), 2 * max(1, int(ray.cluster_resources().get("CPU", 1))))
        groups = [rels[i::n] for i in range(n)]
        refs = [_sha256_task.options(scheduling_strategy="SPREAD").remote(store.uri, g) for g in groups]
        digests = {rel: d for g, ds in zip(groups, ray.get(refs)) for rel, d in zip(g, ds)}
        return [digests[rel] for rel in rels]
    with ThreadPoolExecutor(max_workers=min(8, len(rels))) as pool:
        return list(pool.map(store.sha256, rels))


def damaged_files(store: Store, manifest: dict[str, Any]) -> list[str]:
    """The cache files (and rejects file) whose bytes differ from the manifest's sha256, or that are missing. A
    file is read at most once per process while its (size, mtime) stay the same."""
    entries = manifest["files"] + ([manifest["rejects"]] if "rejects" in manifest else [])
    start = time.time_ns()
    stats = file_stats(store)

    def verified(f: dict[str, Any]) -> bool:
        return f["path"] in stats and _VERIFIED.get((f"{store.uri}/{f['path']}", *stats[f["path"]])) == f["sha256"]

    todo = [f for f in entries if f["path"] in stats and not verified(f)]
    digests = sha256_files(store, [f["path"] for f in todo], sum(stats[f["path"]][0] for f in todo))
    intact = {f["path"] for f, digest in zip(todo, digests) if digest == f["sha256"]}
    for f in todo:
        if f["path"] in intact and stats[f["path"]][1] < start - SETTLE_NS:  # see plan_source: not "racy"
            remember_verified(store, f["path"], f["sha256"], stats[f["path"]])
    return [f["path"] for f in entries if f["path"] not in intact and not verified(f)]


# The files of a directory of shards (a cache or token files; pipeline/caches/shards.py writes them).
MANIFEST = "manifest.json"  # written last: the directory of shards is complete
WORK = ".work"  # while unfinished: the plan, and per finished shard its marker and rejects (deleted at the commit)
PLAN = f"{WORK}/plan.json"  # the first run's shard plan: a run began (and may be resumed)
DUPLICATES = f"{WORK}/duplicates.json"  # the duplicate ids found once every shard is finished
_MARKER = "shard-"


def marker_file(sid: int) -> str:
    """A finished shard's marker (written after its data file)."""
    return f"{WORK}/{_MARKER}{sid:05d}.json"


def rejects_file(sid: int) -> str:
    return f"{WORK}/rejects-{sid:05d}.jsonl"


def finished_markers(store: Store) -> list[str]:
    """The markers of the shards finished so far."""
    return [f"{WORK}/{name}" for name in store.listdir(WORK) if name.startswith(_MARKER)]


@dataclass
class ShardsStatus:
    """Where a directory of shards (a cache, or token files) stands."""

    state: str  # complete | resume | absent
    pairs: int = 0  # complete: the manifest's count of pairs
    done: int = 0  # resume: the shards finished


def status(store: Store) -> ShardsStatus:
    """Complete (its manifest), begun (its plan, and how many shards have their marker), or absent."""
    if store.exists(MANIFEST):
        return ShardsStatus("complete", pairs=store.read_json(MANIFEST)["counts"]["pairs"])
    if store.exists(PLAN):
        return ShardsStatus("resume", done=len(finished_markers(store)))
    return ShardsStatus("absent")


def pending_shards(store: Store, prep: CacheInputs) -> tuple[SourcePlan, list[Shard]]:
    """The shard plan of an unfinished directory of shards (the first run's, if resuming; `.work/plan.json`) and
    its unfinished shards (`pipeline/caches/shards.py`: a shard is finished when its marker exists and its file is
    as the marker records it)."""
    if store.exists(PLAN):
        plan = SourcePlan.from_dict(store.read_json(PLAN))
        plan.path = prep.plan.path  # same content (same key); the file may have moved
    else:
        plan = prep.plan
        store.write_json(PLAN, plan.to_dict())
    stats = file_stats(store)
    markers = [store.read_json(rel) for rel in finished_markers(store)]
    # Unchanged since written (same size and mtime): finished, nothing read. Otherwise (a marker of an older
    # version, a copied cache) the bytes decide; a damaged file is done again.
    done = {m["shard"] for m in markers if m["file"] in stats and tuple(m.get("stat", ())) == stats[m["file"]]}
    check = [m for m in markers if m["shard"] not in done and m["file"] in stats]
    digests = sha256_files(store, [m["file"] for m in check], sum(stats[m["file"]][0] for m in check))
    done |= {m["shard"] for m, digest in zip(check, digests) if digest == m["sha256"]}
    return plan, [s for s in plan.shards if s.index not in done]


@dataclass
class CacheRef:
    split: str
    key: str
    uri: str
    files: list[str]
    pairs: int
    model_dir: str
    tokenizer_dir: str
    chat_template: str | None
    file_rows: list[int] = field(default_factory=list)  # pairs per file, as `files`


def find_cache(spec: CacheSpec, split: str) -> CacheRef:
    """The complete stage-1 cache of this split's inputs; refuses a cache built for other inputs, or one whose
    files no longer match the manifest's checksums."""
    prep = resolve_inputs(spec, split)
    explicit = spec.cache_path if split == "train" else None
    store = Store(explicit) if explicit else spec.layout.cache(prep.key)
    if not store.exists(MANIFEST):
        where = explicit or f"{spec.layout.cache_dir}/{prep.key}"
        raise UserError(f"no complete reference cache for the {split} split at {where}; build it with "
                        f"`dpo-pipeline cache CONFIG` (same config) first")
    manifest = store.read_json(MANIFEST)
    got, want = keyed_inputs(manifest.get("inputs", {})), keyed_inputs(prep.inputs)
    for part in ("model", "tokenizer", "chat_template_sha256", "data", "truncation", "dtype"):
        if got.get(part) != want.get(part):
            raise UserError(f"the cache at {store.uri} was built for a different {part.replace('_sha256', '')} "
                            f"({got.get(part)!r} != {want.get(part)!r}); rebuild it with `dpo-pipeline cache "
                            f"CONFIG` or fix the config")
    damaged = damaged_files(store, manifest)
    if damaged:
        raise UserError(f"the cache at {store.uri} is damaged: {', '.join(damaged[:3])}"
                        f"{' and more' if len(damaged) > 3 else ''} no longer match(es) the manifest's sha256; "
                        f"run `dpo-pipeline cache CONFIG` (same config) to recompute only the damaged part(s)")
    return CacheRef(split, manifest["key"], store.uri, [f"{store.uri}/{f['path']}" for f in manifest["files"]],
                    manifest["counts"]["pairs"], prep.model_dir, prep.tokenizer_dir, prep.chat_template,
                    [f["rows"] for f in manifest["files"]])
