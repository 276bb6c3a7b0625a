"""Stage 3's data on storage, read and written in chunks by Ray workers: the tokenized prompts, the sampled rows
and the per-sample results. The driver only passes these small descriptions around (file URIs and row ranges);
the rows themselves never go through it.

    PromptChunk          rows [start, stop) of one prompts file: one sampling call
    SampledChunk         one row group of a target's sampled.parquet: one reference / reward call
"""

from __future__ import annotations

import hashlib
import json
import uuid
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dpo.batching import list_column
from pipeline.store.storage import Store

# One tokenized prompt per row; a row's global `prompt_index` is its file's `first` + its row number.
PROMPTS = pa.schema([
    pa.field("id", pa.string()),
    pa.field("prompt_input_ids", pa.list_(pa.int32())), pa.field("chosen_input_ids", pa.list_(pa.int32())),
    pa.field("prompt", pa.string()),
    pa.field("prompt_source", pa.string()),  # JSON: the prompt as the source row holds it (text or messages)
])


def prompt_sources(values: list[str]) -> list[Any]:
    """The `prompt_source` column parsed: each prompt as its source row holds it (a string, or a list of
    {role, content} messages), as `reward(prompts, completions, sources=...)` takes them."""
    return [json.loads(v) for v in values]


def split_uri(uri: str) -> tuple[Store, str]:
    """(the directory's Store, the file name) of a file URI or path."""
    parent, name = uri.rsplit("/", 1)
    return Store(parent), name


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    store, name = split_uri(uri)
    return pq.read_table(store.path(name), filesystem=store.fs, columns=columns)


def write_table(uri: str, table: pa.Table, metadata: dict[str, Any] | None = None) -> None:
    """Atomically (`Store.write_bytes`), with `metadata` as JSON in the file's schema metadata."""
    if metadata is not None:
        table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"dpo": json.dumps(metadata)})
    store, name = split_uri(uri)
    store.write_parquet(name, table)


def read_metadata(uri: str) -> dict[str, Any]:
    """The `metadata` that `write_table` stored (only the footer is read)."""
    store, name = split_uri(uri)
    with store.fs.open_input_file(store.path(name)) as f:
        return json.loads(pq.read_schema(f).metadata[b"dpo"])


@dataclass(frozen=True)
class PromptChunk:
    """Rows [start, stop) of the prompts file `uri`; `first` is the global index of row `start`."""

    uri: str
    start: int
    stop: int
    first: int

    def read(self, columns: list[str]) -> pa.Table:
        """The rows, with their global `prompt_index` when `columns` names it."""
        table = read_table(self.uri, [c for c in columns if c != "prompt_index"]).slice(self.start,
                                                                                       self.stop - self.start)
        if "prompt_index" in columns:
            index = pa.array(np.arange(self.first, self.first + len(table), dtype=np.int64))
            table = table.add_column(columns.index("prompt_index"), "prompt_index", index)
        return table


@dataclass(frozen=True)
class PromptFile:
    """One tokenized shard of the prompts: `rows` prompts from global index `first`."""

    uri: str
    first: int
    rows: int


def prompt_rows(files: list[PromptFile], lo: int, hi: int, columns: list[str]) -> pa.Table:
    """Prompts with global indices [lo, hi), read from the files that hold them."""
    parts = [PromptChunk(f.uri, max(lo, f.first) - f.first, min(hi, f.first + f.rows) - f.first,
                         max(lo, f.first)).read(columns)
             for f in files if f.first < hi and lo < f.first + f.rows]
    return pa.concat_tables(parts) if parts else pa.table({c: [] for c in columns})


@dataclass(frozen=True)
class SampledChunk:
    """Row group `group` of a target's sampled rows (sorted by prompt and sample index)."""

    target: str
    uri: str  # <eval_dir>/<target>/sampled.parquet
    group: int

    def read(self, columns: list[str] | None = None) -> pa.Table:
        store, name = split_uri(self.uri)
        with store.fs.open_input_file(store.path(name)) as f:
            return pq.ParquetFile(f).read_row_group(self.group, columns=columns)


def sampled_chunks(target: str, uri: str) -> list[SampledChunk]:
    """A target's sampled.parquet as chunks (its footer only is read)."""
    store, name = split_uri(uri)
    with store.fs.open_input_file(store.path(name)) as f:
        groups = pq.ParquetFile(f).metadata.num_row_groups
    return [SampledChunk(target, uri, g) for g in range(groups)]


def chunk_prompts(chunk_rows: pa.Table, files: list[PromptFile], columns: list[str]) -> dict[int, dict[str, Any]]:
    """The prompts (selected columns) that sampled rows refer to, by global index. Rows are sorted by prompt, so
    one contiguous range of prompts is read."""
    index = chunk_rows.column("prompt_index").to_numpy()
    if len(index) == 0:
        return {}
    lo, hi = int(index.min()), int(index.max()) + 1
    rows = prompt_rows(files, lo, hi, ["prompt_index", *columns]).to_pylist()
    return {row["prompt_index"]: row for row in rows}


def completion_sequences(sampled: pa.Table, prompts: dict[int, dict[str, Any]]) -> tuple[list[np.ndarray], list[int]]:
    """Sampled rows as the scorer takes them: prompt + completion token sequences, and where each completion
    starts (`prompts`: global index -> a row with `prompt_input_ids`)."""
    sequences, starts = [], []
    for prompt_index, completion in zip(sampled.column("prompt_index").to_pylist(),
                                        list_column(sampled.column("completion_ids")), strict=True):
        prompt = prompts[prompt_index]["prompt_input_ids"]
        sequences.append(np.concatenate([np.asarray(prompt, np.int32), completion.astype(np.int32)]))
        starts.append(len(prompt))
    return sequences, starts


def sequence_key(reference: dict[str, Any], sequences: list[np.ndarray], starts: list[int]) -> str:
    """Content key of the reference log-probs of these token sequences."""
    h = hashlib.sha256(json.dumps(reference, sort_keys=True).encode())
    for sequence, start in zip(sequences, starts, strict=True):
        h.update(np.asarray([len(sequence), start], np.int64).tobytes())
        h.update(np.asarray(sequence, np.int32).tobytes())
    return h.hexdigest()[:24]


def concat_files(uris: list[str], out_uri: str) -> int:
    """Parquet files (one schema) into one file at `out_uri`, each as a row group, streamed: one part in memory
    at a time. On a local disk written beside and moved into place; on an object store written straight to its
    name, which the store publishes only once the upload completes. A reader never sees a partial file. Returns
    the rows written."""
    store, name = split_uri(out_uri)
    store.makedirs()
    target = store.path(f".tmp-{uuid.uuid4().hex}-{name}") if store.local else store.path(name)
    rows, writer = 0, None
    try:
        for uri in uris:
            table = read_table(uri).replace_schema_metadata(None)
            if writer is None:
                writer = pq.ParquetWriter(target, table.schema, filesystem=store.fs)
            writer.write_table(table, row_group_size=max(1, len(table)))
            rows += len(table)
    finally:
        if writer is not None:
            writer.close()
    if writer is not None and store.local:
        store.fs.move(target, store.path(name))
    return rows


def read_pairs(files: list[str], columns: list[str]) -> pa.Table:
    """Columns of the held-out pairs, in cache order."""
    return pa.concat_tables([read_table(uri, columns) for uri in files])
