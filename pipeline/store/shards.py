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
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.data.sources import Reject
from pipeline.store.storage import Store

IDS = pa.list_(pa.int32())
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
# One tokenized pair; `_index` is its source row.
PAIR = pa.struct([pa.field("_index", pa.int64()), pa.field("id", pa.string())]
                 + [pa.field(c, IDS) for c in TOKEN_COLUMNS])
# What the driver receives per finished shard (one row each).
STATS = pa.schema([pa.field("_job", pa.int32()), pa.field("_shard", pa.int32()), pa.field("rows", pa.int64()),
                   pa.field("pairs", pa.int64()), pa.field("rejected", pa.int64()), pa.field("sha256", pa.string()),
                   pa.field("bytes", pa.int64())])


def data_file(sid: int) -> str:
    return f"data/part-{sid:05d}.parquet"


def rejects_file(sid: int) -> str:
    return f".work/rejects-{sid:05d}.jsonl"


def marker_file(sid: int) -> str:
    return f".work/shard-{sid:05d}.json"


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
    this sha256). `indices` (the pairs' source rows) let the end of the stage name the rows duplicate ids came
    from."""
    marker = {"shard": sid, "file": data_file(sid), "sha256": digest, "bytes": size, "rows": rows,
              "pairs": pairs.num_rows, "rejected": rejected, "reasons": reasons, "tokens": token_count(pairs),
              "nodes": nodes, "indices": pairs.column("_index").to_pylist()}
    store.write_json(marker_file(sid), marker)
    return marker


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
