"""A cache shard on its way from the source to its file, as the Ray workers of stage 1 carry and write it.

A shard travels as ONE row (its pairs in a nested list column), so no batching of Ray Data can split it between two
scorer actors or writers: whoever holds the row holds the whole shard, and can write its file. The files of a
shard, under `cache_dir/<key>/`:

    .work/rejects-NNNNN.jsonl   its unusable rows with their reason, by the task that read and tokenized it
    data/part-NNNNN.parquet     its scored pairs in source order, by the writer task
    .work/shard-NNNNN.json      its marker, by the writer task, after the data file: the shard is finished

The writer computes each file's sha256 from the bytes it writes and hands back only the shard's stats, so the
driver holds counts, never rows, and nobody reads a file again to hash it.
"""

from __future__ import annotations

import io
import json
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from pipeline.caches.layout import (
    DUPLICATES,
    MANIFEST,
    WORK,
    file_stats,
    marker_file,
    rejects_file,
    remember_verified,
)
from pipeline.data.rows import tokenize_rows
from pipeline.data.sources import Reject, Shard, SourcePlan, read_shard
from pipeline.errors import UserError
from pipeline.store.storage import Store

IDS = pa.list_(pa.int32())
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# One tokenized pair; `_index` is its source row.
PAIR = pa.struct([pa.field("_index", pa.int64()), pa.field("id", pa.string())]
                 + [pa.field(c, IDS) for c in TOKEN_COLUMNS])
# What the driver receives per finished shard (one row each).
STATS = pa.schema([pa.field("_job", pa.int32()), pa.field("_shard", pa.int32()), pa.field("rows", pa.int64()),
                   pa.field("pairs", pa.int64()), pa.field("rejected", pa.int64()), pa.field("sha256", pa.string()),
                   pa.field("bytes", pa.int64()), pa.field("error", pa.string())])


def data_file(sid: int) -> str:
    return f"data/part-{sid:05d}.parquet"


def pack(table: pa.Table) -> pa.Array:
    """A shard's rows as one list value (a row of a Ray Data block)."""
    values = pa.StructArray.from_arrays([table.column(n).combine_chunks() for n in table.column_names],
                                        fields=list(table.schema))
    return pa.ListArray.from_arrays(pa.array([0, len(values)], pa.int32()), values)


def unpack(value: pa.ListScalar) -> pa.Table:
    """The rows of one packed shard (see `pack`)."""
    return pa.Table.from_struct_array(value.values)


def write_rejects(store: Store, sid: int, rejects: list[Reject]) -> int:
    """A shard's rejects in source order, streamed to its rejects file; returns how many."""
    rejects = sorted(rejects, key=lambda r: r.index)
    store.write_stream(rejects_file(sid), (f"{r.to_json()}\n".encode() for r in rejects))
    return len(rejects)


def tokenize_shard(plan: SourcePlan, shard: Shard, tok, fmt: str, max_length: int, max_prompt_length: int,
                   marker: str) -> tuple[pa.Table, list[Reject]]:
    """A shard read and tokenized (`pipeline/data/rows.py`): its usable pairs in source order (schema `PAIR`) and
    its rejects. The reference cache and the token files of reference-free training tokenize alike through this."""
    pairs, rejects = tokenize_rows(read_shard(plan, shard), tok, fmt, max_length, max_prompt_length, marker)
    pairs.sort(key=lambda p: p.index)
    table = pa.Table.from_pylist([vars(p) | {"_index": p.index} for p in pairs], schema=pa.schema(list(PAIR)))
    return table, rejects


def token_count(table: pa.Table) -> int:
    return sum(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0 for c in TOKEN_COLUMNS)


def write_data(store: Store, sid: int, pairs: pa.Table, schema: pa.Schema) -> tuple[str, int]:
    """A shard's scored pairs (in source order) as its Parquet file; returns (sha256, bytes) of what was written."""
    buf = io.BytesIO()
    pq.write_table(pairs.select(schema.names).cast(schema), buf)
    data = buf.getvalue()
    return store.write_bytes(data_file(sid), data), len(data)


def write_marker(store: Store, sid: int, pairs: pa.Table, digest: str, size: int, rows: int, rejected: int,
                 reasons: dict[str, int], nodes: list[str]) -> dict[str, Any]:
    """The shard's marker, written after its files: from now on the shard is finished (while its data file keeps
    this sha256; `stat` lets a resumed or finishing run see it unchanged without reading it). `indices` (the pairs'
    source rows) let the end of the stage name the rows duplicate ids came from."""
    marker = {"shard": sid, "file": data_file(sid), "sha256": digest, "bytes": size,
              "stat": file_stat(store, data_file(sid)), "rows": rows,
              "pairs": pairs.num_rows, "rejected": rejected, "reasons": reasons, "tokens": token_count(pairs),
              "nodes": nodes, "indices": pairs.column("_index").to_pylist()}
    store.write_json(marker_file(sid), marker)
    return marker


def file_stat(store: Store, rel: str) -> list[int]:
    """[size, mtime_ns] of a file just written: recorded in its marker, so that a resumed or finishing run knows the
    file is unchanged without reading it."""
    info = store.fs.get_file_info(store.path(rel))
    return [info.size, info.mtime_ns or 0]


def read_chunks(store: Store, rel: str, size: int = 8 << 20) -> Iterator[bytes]:
    with store.fs.open_input_stream(store.path(rel)) as f:
        while chunk := f.read(size):
            yield chunk


def concat(store: Store, sources: Iterable[str], dest: str) -> str:
    """Write `dest` as the concatenation of files `sources`, streamed (8 MiB at a time); returns its sha256."""
    return store.write_stream(dest, (chunk for rel in sources for chunk in read_chunks(store, rel)))


def reasons_json(rejects: list[Reject]) -> str:
    counts: dict[str, int] = {}
    for r in rejects:
        counts[r.reason] = counts.get(r.reason, 0) + 1
    return json.dumps(counts)


# ---------------------------------------------------------------- finishing: duplicate ids, rejects, counts


@dataclass
class Finished:
    """A directory of finished shards, as its manifest records them: each shard's final marker (without its source
    rows), the pairs' counts and the sha256 of `rejects.jsonl`."""

    markers: list[dict[str, Any]]
    counts: dict[str, Any]
    rejects_sha256: str


def finish(store: Store, plan: SourcePlan, schema: pa.Schema) -> Finished:
    """Once every shard of `plan` is finished: drop the pairs whose id an earlier pair has (reason `duplicate_id`,
    by Ray tasks), stream the shards' rejects into `rejects.jsonl` and count. The driver keeps O(1) per shard."""
    markers = [{k: v for k, v in store.read_json(marker_file(s.index)).items() if k != "indices"}
               for s in plan.shards]
    dups = _duplicates_once(store, plan)
    drop = ray.remote(num_cpus=0.5)(_drop_duplicates)
    with_dups = [m for m in markers if str(m["shard"]) in dups]
    redone = dict(zip([m["shard"] for m in with_dups],
                      get([drop.remote(store, plan, m, dups[str(m["shard"])], schema) for m in with_dups])))
    markers = [redone.get(m["shard"], m) for m in markers]
    rejects_sha = concat(store, [rejects_file(s.index) for s in plan.shards], "rejects.jsonl")
    reasons: Counter[str] = Counter()
    for m in markers:
        reasons.update(m["reasons"])
    counts = {"rows": sum(m["rows"] for m in markers), "pairs": sum(m["pairs"] for m in markers),
              "rejected": sum(m["rejected"] for m in markers), "reasons": dict(sorted(reasons.items())),
              "tokens": sum(m["tokens"] for m in markers)}
    return Finished(markers, counts, rejects_sha)


def commit(store: Store, manifest: dict[str, Any], finished: Finished) -> None:
    """Write the manifest (the commit point: from now on the directory is complete) and drop the work files. The
    shards' sha256s were taken from the bytes written: a lookup later in this process need not read them again."""
    for name in store.listdir("data"):  # temp files of writes a crash interrupted
        if name.startswith(".tmp-"):
            store.delete(f"data/{name}")
    store.write_json(MANIFEST, manifest)
    store.delete(WORK)
    stats = file_stats(store)
    for m in finished.markers:
        if tuple(m.get("stat", ())) == stats.get(m["file"]):
            remember_verified(store, m["file"], m["sha256"], stats[m["file"]])
    remember_verified(store, "rejects.jsonl", finished.rejects_sha256, stats["rejects.jsonl"])


def _duplicates_once(store: Store, plan: SourcePlan) -> dict[str, list[dict]]:
    """Usable pairs whose id an earlier usable pair already has (`find_duplicates`). Computed once from the
    shards as written and recorded before any file changes: a crash while dropping them redoes the same."""
    if store.exists(DUPLICATES):
        return store.read_json(DUPLICATES)
    dups = find_duplicates(store, [s.index for s in plan.shards])
    store.write_json(DUPLICATES, dups)
    return dups


def _drop_duplicates(store: Store, plan: SourcePlan, marker: dict, dups: list[dict], schema: pa.Schema) -> dict:
    """Remove a shard's duplicate pairs from its file and list them with its rejects; the shard's final record."""
    table, sid = store.read_parquet(marker["file"]), marker["shard"]
    if table.num_rows == marker["pairs"]:  # not yet rewritten (a crash may have come after the rewrite)
        drop = {d["pos"] for d in dups}
        table = table.filter(pa.array([i not in drop for i in range(table.num_rows)]))
        digest, size = write_data(store, sid, table, schema)
    else:
        digest, size = store.sha256(marker["file"]), store.fs.get_file_info(store.path(marker["file"])).size
    raw = dict(read_shard(plan, plan.shards[sid]))
    lines = store.read_bytes(rejects_file(sid)).decode().splitlines()
    lines += [Reject(d["index"], d["id"], "duplicate_id", f"id {d['id']!r} is already used by "
                     + (f"row {d['first']}" if d["first"] is not None else "an earlier row"),
                     raw.get(d["index"])).to_json() for d in dups]
    lines.sort(key=lambda line: json.loads(line)["index"])
    store.write_bytes(rejects_file(sid), "".join(f"{x}\n" for x in lines).encode())
    reasons = Counter(marker["reasons"])
    reasons["duplicate_id"] += len(dups)
    return {**marker, "sha256": digest, "bytes": size, "stat": file_stat(store, marker["file"]),
            "pairs": table.num_rows, "rejected": marker["rejected"] + len(dups), "reasons": dict(reasons),
            "tokens": token_count(table)}


# ---------------------------------------------------------------- duplicate ids, found by Ray tasks

BUCKETS = 16  # reducers: each holds the ids of 1/BUCKETS of the cache
MAPPERS = 16  # readers: each reads the ids of a contiguous range of shards


@ray.remote(num_cpus=0.5)
def _ids_by_bucket(store: Store, sids: list[int]) -> tuple[pa.Table, ...]:
    """The (id, shard, pos, index) of every pair of shards `sids` (in order), cut into BUCKETS by a hash of the id
    that every process computes alike (crc32; Python's `hash` of a str differs between processes)."""
    parts = []
    for sid in sids:
        marker = store.read_json(marker_file(sid))
        ids = pq.read_table(store.path(marker["file"]), columns=["id"], filesystem=store.fs).column("id")
        # A repaired cache's kept shards have no indices (and no duplicates among themselves).
        indices = marker.get("indices") or [None] * len(ids)
        parts.append(pa.table({"id": ids, "shard": pa.array([sid] * len(ids), pa.int32()),
                               "pos": pa.array(range(len(ids)), pa.int64()), "index": pa.array(indices, pa.int64())}))
    table = pa.concat_tables(parts)
    bucket = pa.array([zlib.crc32(i.encode()) % BUCKETS for i in table.column("id").to_pylist()], pa.int32())
    return tuple(table.filter(pc.equal(bucket, b)) for b in range(BUCKETS))


@ray.remote(num_cpus=0.5)
def _bucket_duplicates(*parts: pa.Table) -> list[dict]:
    """The pairs of one bucket whose id an earlier pair (parts come in shard order) already has."""
    seen: dict[str, int | None] = {}
    dups = []
    for row in pa.concat_tables(parts).to_pylist():
        if row["id"] in seen:
            dups.append({**row, "first": seen[row["id"]]})
        else:
            seen[row["id"]] = row["index"]
    return dups


def find_duplicates(store: Store, sids: list[int]) -> dict[str, list[dict]]:
    """Pairs whose id an earlier pair (lower shard, then lower position) already has: {shard: [{pos, index, id,
    first}]}, `first` being the source row of the earlier pair. Ray tasks read the ids and find the duplicates, by
    a hash of the id, so no process holds every id; the driver receives only the duplicates."""
    step = -(-len(sids) // MAPPERS)
    readers = [_ids_by_bucket.options(num_returns=BUCKETS).remote(store, sids[i:i + step])
               for i in range(0, len(sids), step)]
    found = get([_bucket_duplicates.remote(*[refs[b] for refs in readers]) for b in range(BUCKETS)])
    dups: dict[str, list[dict]] = {}
    for d in sorted((d for bucket in found for d in bucket), key=lambda d: (d["shard"], d["pos"])):
        dups.setdefault(str(d.pop("shard")), []).append(d)
    return dups


def get(refs: list) -> list:
    """`ray.get`, except that a task's `UserError` (a storage failure) is raised as itself: one line, without the
    task's traceback that Ray's wrapper of it carries in its message."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, UserError):
            raise UserError(str(e.cause)) from None
        raise
