"""Preference data sources: planning, sharding and reading.

A source (a JSONL or Parquet file at a local path or a pyarrow URI, or a `datasets` name/dir, exported to Parquet
under cache_dir) is planned on the driver: hashed for the cache key and cut into shards of `shard_size` rows, in one
read per version of the file (the plan is remembered, see `plan_source`). Ray tasks on any node then read one shard
each (`read_shard`) and turn raw rows into token ids (`pipeline.data.rows.tokenize_rows`). A row that cannot be
used becomes a `Reject` with a reason code; it never stops a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import time
import uuid
from dataclasses import asdict, dataclass, field
from itertools import accumulate, compress
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import DataSource
from pipeline.errors import UserError
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store, staging_dir, storage_error

_CHUNK = 8 << 20
_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".parquet": "parquet"}
# Plans this process made or read, by `_memo_key`: every stage of a `run` (plan, cache, training's and
# evaluation's cache lookups, the evaluation prompts) asks for the same source, and must not read it again.
_PLANS: dict[str, dict[str, Any]] = {}
_KEPT: set[tuple[str, str]] = set()  # (sources_dir, plan key) written there
SETTLE_NS = 2_000_000_000

# ---------------------------------------------------------------- sources and shards


@dataclass
class Shard:
    index: int
    start: int  # first row (inclusive)
    stop: int  # last row (exclusive)
    byte_start: int = 0  # JSONL only: where row `start` begins
    byte_stop: int = 0


@dataclass
class SourcePlan:
    """A data source resolved to one local file, with its content hash and shards."""

    kind: str  # "jsonl" | "parquet"
    path: str
    sha256: str
    num_rows: int
    shards: list[Shard] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SourcePlan:
        return cls(**{**d, "shards": [Shard(**s) for s in d["shards"]]})


def _plan_jsonl(file: Store, shard_size: int, limit: int | None) -> SourcePlan:
    """One pass over the bytes, the only full read of a JSONL source: hash them and note where every shard's first
    row begins. Blank lines are not rows."""
    h = hashlib.sha256()
    starts: list[tuple[int, int]] = []  # (row, byte offset) of each shard's first row
    rows = base = total = 0
    with file.fs.open_input_stream(file.root) as f:
        tail = b""
        while chunk := f.read(_CHUNK):
            h.update(chunk)
            total += len(chunk)
            if limit is not None and rows >= limit:  # the rest is only hashed
                continue
            lines = (tail + chunk).split(b"\n")
            tail = lines.pop()
            rows, base = _shard_starts(lines, rows, base, shard_size, limit, starts)
        if tail:
            rows, base = _shard_starts([tail], rows, base, shard_size, limit, starts)
    ends = [r for r, _ in starts[1:]] + [rows]
    bounds = [b for _, b in starts[1:]] + [total]  # a shard ends where the next begins, the last at the end
    shards = [Shard(i, r, stop, b, b_stop) for i, ((r, b), stop, b_stop) in enumerate(zip(starts, ends, bounds))]
    return SourcePlan("jsonl", file.uri, h.hexdigest(), rows, shards)


def _shard_starts(lines: list[bytes], rows: int, base: int, shard_size: int, limit: int | None,
                  starts: list[tuple[int, int]]) -> tuple[int, int]:
    """Append (row, byte offset) for each shard's first row among `lines` (each ended by a newline; the first
    begins at byte `base`, after `rows` rows); returns the rows and the offset after them. Per-line work runs in
    C (map, compress, accumulate): Python loops only over the shards."""
    found = list(compress(range(len(lines)), map(bytes.strip, lines)))  # non-blank lines are rows
    if limit is not None:
        found = found[:max(0, limit - rows)]
    ends = list(accumulate(map(len, lines)))
    for k in range((-rows) % shard_size, len(found), shard_size):
        i = found[k]
        starts.append((rows + k, base + (ends[i - 1] if i else 0) + i))  # + i: the newlines before line i
    return rows + len(found), base + (ends[-1] if lines else 0) + len(lines)


def _plan_parquet(file: Store, shard_size: int, limit: int | None, shown: str) -> SourcePlan:
    try:
        with file.fs.open_input_file(file.root) as f:
            n = pq.ParquetFile(f).metadata.num_rows
    except Exception:
        raise UserError(f"data file {shown!r} is not a readable Parquet file; check the file or its "
                        f"extension") from None
    n = n if limit is None else min(n, limit)
    shards = [Shard(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]
    return SourcePlan("parquet", file.uri, file.sha256(""), n, shards)


def _export_datasets(src: DataSource, sources: Store) -> Store:
    """Load a `datasets` name or directory and export the split to Parquet under `sources` (once per dataset
    fingerprint). `sources` is under cache_dir, which every node sees: the read tasks on any node find the export."""
    # Imported here: `datasets` takes ~0.7 s to import, and every Ray worker that reads, tokenizes or writes a
    # shard imports this module; only a `datasets` source (planned on the driver) needs it.
    import datasets  # noqa: PLC0415

    given = Store(src.path)
    p = Path(given.root)
    try:
        if given.local and p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            ds = datasets.load_from_disk(str(p))
        else:
            ds = datasets.load_dataset(src.path, src.subset, split=src.split)
    except Exception as e:
        raise UserError(f"data path {src.path!r} could not be loaded as a file or a `datasets` dataset "
                        f"({type(e).__name__}: {str(e).splitlines()[0][:200]}); check the path, name and "
                        f"split") from None
    if isinstance(ds, datasets.DatasetDict):
        if src.split not in ds:
            raise UserError(f"dataset {src.path!r} has no split {src.split!r}; set data.*.split to one of "
                            f"{sorted(ds)}")
        ds = ds[src.split]
    name = f"{ds._fingerprint}.parquet"
    if not sources.exists(name):
        # Written beside its final place on a local disk (then renamed), else on this node and then uploaded.
        sources.makedirs()
        tmp = (Path(sources.root) if sources.local else staging_dir()) / f".tmp-{uuid.uuid4().hex}-{name}"
        tmp.parent.mkdir(parents=True, exist_ok=True)
        try:
            ds.to_parquet(str(tmp))
            if sources.local:
                tmp.rename(sources.path(name))
            else:
                sources.upload_file(tmp, name)
        finally:
            tmp.unlink(missing_ok=True)
    return sources.child(name)


def _check_json_lines(file: Store, shown: str) -> None:
    """A JSON array is refused (reading one means holding it whole in memory); a file none of whose first lines is
    JSON is not JSON Lines at all (a CSV, a binary file): one error for the file, rather than every line rejected.
    A file with some bad lines is fine: those lines are rejected."""
    with file.fs.open_input_stream(file.root) as f:
        head = f.read(1 << 20)
    if head.removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"["):
        raise UserError(f"data file {shown!r} is a JSON array, which would have to be loaded whole; convert it to "
                        f"JSON Lines (one object per line, e.g. `jq -c '.[]' FILE > FILE.jsonl`) and point "
                        f"data.*.path at that")
    lines = [ln for ln in head.split(b"\n")[:-1 if len(head) == 1 << 20 else None] if ln.strip()][:100]
    for raw in lines:
        try:
            json.loads(raw.decode("utf-8").removeprefix("\ufeff"))
            return
        except ValueError:  # not UTF-8, or not JSON
            continue
    if lines:
        raise UserError(f"data file {shown!r} is not JSON Lines: none of its first {len(lines)} line(s) is JSON; "
                        f"point data.*.path at a .jsonl/.json or .parquet file")


def _file_info(file: Store, shown: str) -> pafs.FileInfo:
    try:
        return file.fs.get_file_info(file.root)
    except OSError as e:  # unreachable storage, refused credentials
        raise storage_error("reach", shown, e) from None


def check_local_source(src: DataSource) -> None:
    """`plan_source`'s missing-file error for a local path, without reading it: the command line checks the
    config's data before it imports a stage (torch, Ray, transformers: seconds)."""
    file = Store(src.path)
    if file.local and PurePosixPath(file.root).suffix.lower() in _SUFFIXES and not Path(file.root).is_file():
        raise _not_found(src)


def _not_found(src: DataSource) -> UserError:
    return UserError(f"data file {src.path!r} not found; check data.*.path")


def plan_source(src: DataSource, shard_size: int, sources_dir: Store | str | Path) -> SourcePlan:
    """Resolve a configured source to one file (a local path or a pyarrow URI), hash it and cut it into shards.

    `sources_dir` (under cache_dir) receives `datasets` exports and the plans made: a file is read for its plan once
    per version, the version being its (location, size, mtime) (pyarrow gives no ETag). Later calls in this
    process, and later runs, reuse the plan."""
    sources = sources_dir if isinstance(sources_dir, Store) else Store(str(sources_dir))
    file = Store(src.path)
    start = time.time_ns()
    info = _file_info(file, src.path)
    suffix = PurePosixPath(file.root).suffix.lower()
    if info.type == pafs.FileType.File and suffix not in _SUFFIXES:
        raise UserError(f"data file {src.path!r} has an unsupported extension; use .jsonl, .json or .parquet")
    if info.type != pafs.FileType.File and suffix in _SUFFIXES:
        raise _not_found(src)
    if info.type != pafs.FileType.File and not file.local:
        raise UserError(f"data path {src.path!r} is not a file; a URI must name a .jsonl or .parquet file "
                        f"(`datasets` directories are read from a local path)")
    kind = _SUFFIXES.get(suffix, "parquet")
    if info.type != pafs.FileType.File:
        file = _export_datasets(src, sources)
        info = file.fs.get_file_info(file.root)
    # A file changed within its timestamp's resolution of being read could change again unseen (same size and
    # mtime: git's "racy clean" case): its plan is not remembered. Object stores' mtimes are whole seconds.
    settled = info.mtime_ns is not None and info.mtime_ns < start - SETTLE_NS
    key = sha256_json({"file": file.uri, "size": info.size, "mtime_ns": info.mtime_ns, "kind": kind,
                       "shard_size": shard_size, "limit": src.limit})[:24]
    memo = f"plans/{key}.json"
    if settled and key not in _PLANS and sources.exists(memo):
        _PLANS[key] = sources.read_json(memo)
        _KEPT.add((sources.uri, key))
    if not settled or key not in _PLANS:
        if kind == "jsonl":
            _check_json_lines(file, src.path)
            plan = _plan_jsonl(file, shard_size, src.limit)
        else:
            plan = _plan_parquet(file, shard_size, src.limit, src.path)
        if not settled:
            return plan
        _PLANS[key] = plan.to_dict()
    _keep(sources, memo, key)
    return SourcePlan.from_dict(_PLANS[key])


def _keep(sources: Store, memo: str, key: str) -> None:
    """Write a plan under `sources` for later runs, once cache_dir exists: `dpo-pipeline plan` creates nothing, and
    the first stage that writes cache_dir makes the next lookup keep it."""
    if (sources.uri, key) in _KEPT:
        return
    if sources.fs.get_file_info(sources.root.rsplit("/", 1)[0]).type == pafs.FileType.NotFound:
        return
    sources.write_bytes(memo, json.dumps(_PLANS[key], separators=(",", ":")).encode())
    _KEPT.add((sources.uri, key))


@functools.lru_cache(maxsize=16)
def _open(path: str) -> Store:
    """The source file's store, opened once per process (a Ray task reads many shards of one file)."""
    return Store(path)


def read_shard(plan: SourcePlan, shard: Shard) -> list[tuple[int, Any]]:
    """Rows [start, stop) as (index, record); a JSONL line that does not parse becomes a `Reject` record. The file
    may be on any pyarrow filesystem: only the shard's bytes (JSONL) or row groups (Parquet) are read."""
    file = _open(plan.path)
    if plan.kind == "parquet":
        with file.fs.open_input_file(file.root) as f:
            pf = pq.ParquetFile(f)
            groups, first, seen = [], None, 0
            for g in range(pf.num_row_groups):
                n = pf.metadata.row_group(g).num_rows
                if seen + n > shard.start and seen < shard.stop:
                    groups.append(g)
                    first = seen if first is None else first
                seen += n
            table = pf.read_row_groups(groups).slice(shard.start - first, shard.stop - shard.start)
        return list(enumerate(table.to_pylist(), start=shard.start))
    out: list[tuple[int, Any]] = []
    with file.fs.open_input_file(file.root) as f:
        data = f.read_at(shard.byte_stop - shard.byte_start, shard.byte_start)
    index = shard.start
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        if index >= shard.stop:
            break
        try:
            record = json.loads(raw.decode("utf-8").removeprefix("\ufeff"))  # a UTF-8 BOM is not content
        except UnicodeDecodeError:
            record = Reject(index, None, "invalid_utf8", "line is not valid UTF-8",
                            raw.decode("utf-8", errors="replace"))
        except json.JSONDecodeError as e:
            record = Reject(index, None, "invalid_json", f"line is not JSON ({e.msg})",
                            raw.decode("utf-8", errors="replace"))
        out.append((index, record))
        index += 1
    return out


@dataclass
class Reject:
    index: int
    id: str | None
    reason: str
    detail: str
    row: Any

    def to_json(self) -> str:
        text = json.dumps(asdict(self), ensure_ascii=False, default=repr)
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates (valid JSON escapes, not UTF-8): keep them escaped
            text = json.dumps(asdict(self), default=repr)
        return text
