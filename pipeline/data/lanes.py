"""The training data order: the same global batches for any number of workers, each worker reading only its share.

The cache's N rows, files in the cache's order, are cut into K *lanes* of N // K consecutive rows (K the largest
divisor of the global batch G not above the number of files, so a lane spans about a file or more). Global batch b
is lane 0's rows [b·c, (b+1)·c), then lane 1's, ..., lane K-1's, with c = G/K rows per lane per batch. Worker r of
W takes positions [r·G/W, (r+1)·G/W) of every batch: the lanes those positions fall in (`worker_slices`; W
dividing K: lanes [r·K/W, (r+1)·K/W) whole), so it reads about 1/W of the cache's files (a file or a lane cut
between two workers is read by both) and only the columns it is given. K depends on the files and G, never on W:
any number of workers that divides G trains any cache, to the same batches. As with the whole-batch order, the
last N mod G rows are not used.

Each epoch visits a lane's pieces (its part of each file) in an order seeded by (seed, epoch, lane) and each
piece's rows in an order seeded by (seed, epoch, row id); a lane's rows run on across pieces. Resuming at step s:
a lane skips s·c rows, whole pieces by their row counts (without reading them).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.config import TrainConfig
from pipeline.errors import UserError

Piece = tuple[str, int, int]  # (file, first row, end row)


@dataclass(frozen=True)
class LanePlan:
    lanes: list[list[Piece]]
    rows_per_lane: int  # c: each lane's rows in one global batch

    @property
    def steps_per_epoch(self) -> int:
        return min(sum(end - start for _, start, end in lane) for lane in self.lanes) // self.rows_per_lane

    def worker_slices(self, rank: int, world: int) -> list[tuple[int, int, int]]:
        """(lane, first, end): worker `rank` of `world` takes rows [first, end) of each of these lanes' c rows of
        every global batch; together, in order, positions [r·G/W, (r+1)·G/W) of the batch (W divides G)."""
        c = self.rows_per_lane
        lo, hi = rank * c * len(self.lanes) // world, (rank + 1) * c * len(self.lanes) // world
        return [(k, max(lo - k * c, 0), min(hi - k * c, c)) for k in range(lo // c, (hi - 1) // c + 1)]


def lane_count(files: int, global_batch: int) -> int:
    """K: the largest divisor of the global batch that is at most the number of files."""
    return max(d for d in range(1, min(files, global_batch) + 1) if global_batch % d == 0)


def plan_lanes(files: list[str], rows: list[int], global_batch: int) -> LanePlan:
    """Cut the cache (files in order, `rows` each) into K lanes of N // K consecutive rows."""
    nonempty = [(f, n) for f, n in zip(files, rows, strict=True) if n > 0]
    k = lane_count(len(nonempty), global_batch) if nonempty else 1
    length = sum(n for _, n in nonempty) // k
    lanes: list[list[Piece]] = [[] for _ in range(k)]
    offset = 0  # global row index of the current file's first row
    for f, n in nonempty:
        for lane in range(offset // length if length else k, k):
            start, end = max(offset, lane * length), min(offset + n, (lane + 1) * length)
            if start >= end:
                break
            lanes[lane].append((f, start - offset, end - offset))
        offset += n
    return LanePlan(lanes, global_batch // k)


def _seeded_order(table: pa.Table, seed: int, epoch: int) -> pa.Table:
    keys = [hashlib.blake2b(f"{seed}:{epoch}:{i}".encode(), digest_size=8).digest()
            for i in table.column("id").to_pylist()]
    return table.take(pa.array(sorted(range(len(keys)), key=keys.__getitem__), pa.int64()))


def lane_batches(lane: list[Piece], lane_id: int, rows_per_lane: int, seed: int, epoch: int, shuffle: bool,
                 skip: int, read: Callable[[str], pa.Table]) -> Iterator[pa.Table]:
    """The lane's rows of each global batch of the epoch, from batch `skip` on (`rows_per_lane` rows each; a last
    partial batch is dropped). `read(file)` returns a file's table."""
    pieces = list(lane)
    if shuffle:
        random.Random(f"{seed}:{epoch}:{lane_id}").shuffle(pieces)
    to_skip = skip * rows_per_lane
    while pieces and pieces[0][2] - pieces[0][1] <= to_skip:  # wholly before the resume point: not read at all
        _, start, end = pieces.pop(0)
        to_skip -= end - start
    pending: pa.Table | None = None
    for f, start, end in pieces:
        table = read(f).slice(start, end - start)
        table = _seeded_order(table, seed, epoch) if shuffle else table
        if to_skip:
            table, to_skip = table.slice(to_skip), 0
        pending = table if pending is None else pa.concat_tables([pending, table])
        while pending.num_rows >= rows_per_lane:
            yield pending.slice(0, rows_per_lane)
            pending = pending.slice(rows_per_lane)


def worker_batches(plan: LanePlan, rank: int, world: int, seed: int, epoch: int, shuffle: bool, skip: int,
                   read: Callable[[str], pa.Table]) -> Iterator[pa.Table]:
    """Worker `rank` of `world`'s G/W rows of each global batch of the epoch from batch `skip` on: its slices of
    its lanes' batches (`worker_slices`, `lane_batches`), in batch order."""
    slices = plan.worker_slices(rank, world)
    parts = [lane_batches(plan.lanes[k], k, plan.rows_per_lane, seed, epoch, shuffle, skip, read)
             for k, _, _ in slices]
    for batch in zip(*parts):
        yield pa.concat_tables([b.slice(lo, hi - lo) for b, (_, lo, hi) in zip(batch, slices)])


# The cache columns a training step reads: the per-token reference log-prob lists (as large as the token ids) stay
# on storage; `id` seeds the shuffle. A reference-free loss reads no reference column (token files have none).
PAIR_COLUMNS = ("id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
TRAIN_COLUMNS = (*PAIR_COLUMNS, "ref_chosen_logps", "ref_rejected_logps")


# Read only for LD-DPO (`ld_alpha`), which weighs each reference token by its position.
TOKEN_LOGP_COLUMNS = ("ref_chosen_token_logps", "ref_rejected_token_logps")


def train_columns(train: TrainConfig) -> tuple[str, ...]:
    """The columns the configured loss reads: `TRAIN_COLUMNS`; only `PAIR_COLUMNS` for a reference-free loss; and
    the per-token reference log-probs for LD-DPO with cached reference log-probs."""
    if not train.needs_reference:
        return PAIR_COLUMNS
    ld = any(t.ld_alpha is not None for t in train.losses)
    return TRAIN_COLUMNS + (TOKEN_LOGP_COLUMNS if ld and train.ref_logps == "cached" else ())


def read_train_columns(uri: str, columns: tuple[str, ...] = TRAIN_COLUMNS) -> pa.Table:
    """A cache (or token) file's `columns` (by default `TRAIN_COLUMNS`: the per-token log-prob lists stay on
    storage)."""
    fs, path = pafs.FileSystem.from_uri(uri) if "://" in uri else (pafs.LocalFileSystem(), uri)
    return pq.read_table(path, columns=list(columns), filesystem=fs)


def plan_steps(train: TrainConfig, files: list[str], rows: list[int]) -> tuple[LanePlan, int, int]:
    """(the data lanes, steps per epoch, total steps) for a cache's files and their row counts."""
    lanes = plan_lanes(files, rows, train.global_batch_pairs)
    per_epoch = lanes.steps_per_epoch
    if per_epoch == 0:
        raise UserError(f"the cache has {sum(rows)} pairs, fewer than train.global_batch_pairs="
                        f"{train.global_batch_pairs}; lower the global batch")
    total = per_epoch * train.epochs
    return lanes, per_epoch, min(total, train.max_steps or total)
