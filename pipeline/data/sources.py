"""Preference data sources: planning, sharding and reading.

A source (JSONL, Parquet, or a `datasets` name/dir) is planned once on the driver: hashed for the cache key and
cut into shards of `shard_size` rows. Ray tasks then read one shard each (`read_shard`) and turn raw rows into
token ids (`pipeline.data.rows.tokenize_rows`). A row that cannot be used becomes a `Reject` with a reason code;
it never stops a run.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import datasets
import pyarrow.parquet as pq

from pipeline.config import DataSource
from pipeline.errors import UserError
from pipeline.store.fingerprint import sha256_file

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


def _plan_jsonl(path: Path, shard_size: int, limit: int | None) -> SourcePlan:
    """One pass: hash the bytes and note where every shard's first row begins. Blank lines are not rows."""
    h = hashlib.sha256()
    shards: list[Shard] = []
    rows, offset = 0, 0
    with open(path, "rb") as f:
        for line in f:
            h.update(line)
            if line.strip() and (limit is None or rows < limit):
                if rows % shard_size == 0:
                    if shards:
                        shards[-1].byte_stop = offset
                    shards.append(Shard(len(shards), rows, rows, offset, offset))
                rows += 1
                shards[-1].stop = rows
            offset += len(line)
    if shards:
        shards[-1].byte_stop = offset
    return SourcePlan("jsonl", str(path), h.hexdigest(), rows, shards)


def _plan_parquet(path: Path, shard_size: int, limit: int | None) -> SourcePlan:
    try:
        n = pq.ParquetFile(path).metadata.num_rows
    except Exception:
        raise UserError(f"data file {str(path)!r} is not a readable Parquet file; check the file or its "
                        f"extension") from None
    n = n if limit is None else min(n, limit)
    shards = [Shard(i, s, min(s + shard_size, n)) for i, s in enumerate(range(0, n, shard_size))]
    return SourcePlan("parquet", str(path), sha256_file(path), n, shards)


def _export_datasets(src: DataSource, sources_dir: Path) -> Path:
    """Load a `datasets` name or directory and export the split to Parquet (once per dataset fingerprint)."""
    p = Path(src.path)
    try:
        if p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
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
    out = sources_dir / f"{ds._fingerprint}.parquet"
    if not out.exists():
        sources_dir.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(".tmp")
        ds.to_parquet(str(tmp))
        tmp.rename(out)
    return out


def _check_json_lines(path: Path, shown: str) -> None:
    """A file none of whose first lines is JSON is not JSON Lines at all (a CSV, a binary file): one error for the
    file, rather than every line rejected. A file with some bad lines is fine: those lines are rejected."""
    with open(path, "rb") as f:
        head = f.read(1 << 20)
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


def plan_source(src: DataSource, shard_size: int, sources_dir: Path) -> SourcePlan:
    """Resolve a configured source to a local file, hash it and cut it into shards."""
    p = Path(src.path)
    suffix = p.suffix.lower()
    if p.is_file() and suffix in (".jsonl", ".json"):
        with open(p, "rb") as f:
            head = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip()
        if head.startswith(b"["):  # a JSON array: convert once to JSON Lines
            try:
                rows = json.loads(p.read_bytes())
            except ValueError as e:  # not JSON, or not UTF-8: the whole file is unusable
                raise UserError(f"data file {src.path!r} starts with '[' but is not a valid JSON array "
                                f"({str(e).splitlines()[0][:200]}); fix it or convert it to JSON Lines") from None
            p = sources_dir / f"{sha256_file(src.path)}.jsonl"
            sources_dir.mkdir(parents=True, exist_ok=True)
            # ASCII JSON: independent of the locale, and lone surrogate escapes (\ud800) stay escapes
            p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        else:
            _check_json_lines(p, src.path)
        return _plan_jsonl(p, shard_size, src.limit)
    if p.is_file() and suffix == ".parquet":
        return _plan_parquet(p, shard_size, src.limit)
    if p.is_file():
        raise UserError(f"data file {src.path!r} has an unsupported extension; use .jsonl, .json or .parquet")
    if suffix in (".jsonl", ".json", ".parquet"):
        raise UserError(f"data file {src.path!r} not found; check data.*.path")
    return _plan_parquet(_export_datasets(src, sources_dir), shard_size, src.limit)


def read_shard(plan: SourcePlan, shard: Shard) -> list[tuple[int, Any]]:
    """Rows [start, stop) as (index, record); a JSONL line that does not parse becomes a `Reject` record."""
    if plan.kind == "parquet":
        pf = pq.ParquetFile(plan.path)
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
    with open(plan.path, "rb") as f:
        f.seek(shard.byte_start)
        data = f.read(shard.byte_stop - shard.byte_start)
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
