"""The training data order (pipeline/data/lanes.py): the same global batches for any number of workers (dividing the
lanes or not), each worker reading only its lanes' files, resume skipping whole files unread."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.data.lanes import lane_count, plan_lanes, worker_batches

# 7 files of unequal sizes (a last partial one, one emptied by rejects), ids unique across files.
SIZES = [10, 10, 10, 10, 10, 6, 0]
FILES = [f"f{i}" for i in range(len(SIZES))]
TABLES = {f: pa.table({"id": [f"{f}-{j}" for j in range(n)], "x": list(range(n))}) for f, n in zip(FILES, SIZES)}


class Reader:
    def __init__(self):
        self.read: list[str] = []

    def __call__(self, f: str) -> pa.Table:
        self.read.append(f)
        return TABLES[f]


def batches(global_batch: int, world: int, rank: int, epoch: int = 0, skip: int = 0, reader=None, files=None):
    files = files or (FILES, SIZES)
    plan = plan_lanes(*files, global_batch)
    return [b.column("id").to_pylist() for b in worker_batches(plan, rank, world, seed=3, epoch=epoch, shuffle=True,
                                                                skip=skip, read=reader or Reader())
            ][:plan.steps_per_epoch - skip]


def test_lanes_are_equal_runs_of_the_cache_and_their_count_divides_the_global_batch():
    assert lane_count(6, 8) == 4 and lane_count(100, 8) == 8 and lane_count(3, 6) == 3 and lane_count(1, 8) == 1
    plan = plan_lanes(FILES, SIZES, 8)
    assert len(plan.lanes) == 4 and plan.rows_per_lane == 2
    assert [sum(e - s for _, s, e in lane) for lane in plan.lanes] == [14] * 4  # 56 rows // 4
    rows = [(f, i) for lane in plan.lanes for f, s, e in lane for i in range(s, e)]
    assert rows == [(f, i) for f, n in zip(FILES, SIZES) for i in range(n)]  # the cache's rows, in order, once
    assert plan.steps_per_epoch == 14 // 2 == sum(SIZES) // 8


@pytest.mark.parametrize("world, global_batch, files", [
    (2, 8, None), (4, 8, None),  # W divides the 4 lanes
    (8, 8, None),  # 8 workers, 4 lanes: each lane cut between two workers
    (2, 6, ([f"g{i}" for i in range(3)], [10, 10, 10])),  # 3 lanes on 2 workers
    (4, 8, (["one"], [30]))])  # a one-file cache (a small round): 1 lane, 4 workers
def test_workers_together_take_exactly_the_global_batches_of_one_worker(world, global_batch, files):
    if files:
        TABLES.update({f: pa.table({"id": [f"{f}-{j}" for j in range(n)], "x": list(range(n))})
                       for f, n in zip(*files)})
    single = batches(global_batch, 1, 0, files=files)
    assert single and all(len(b) == global_batch for b in single)
    ranks = [batches(global_batch, world, r, files=files) for r in range(world)]
    assert all(len(r) == len(single) for r in ranks)  # the same number of steps on every worker
    for step, want in enumerate(single):
        assert sum((r[step] for r in ranks), []) == want  # rank r holds positions [r·G/W, (r+1)·G/W)
    seen = [i for b in single for i in b]
    assert len(seen) == len(set(seen))  # no pair twice in an epoch


def test_each_worker_reads_only_its_lanes_files():
    plan = plan_lanes(FILES, SIZES, 8)
    readers = [Reader() for _ in range(2)]
    for r in range(2):
        batches(8, 2, r, reader=readers[r])
    read = [set(rd.read) for rd in readers]
    assert len(read[0] & read[1]) <= 1  # only a file cut between the two workers' lanes
    for r in range(2):
        assert read[r] == {f for k, _, _ in plan.worker_slices(r, 2) for f, _, _ in plan.lanes[k]}


def test_worker_slices_cover_each_batch_once_in_order():
    plan = plan_lanes(FILES, SIZES, 8)  # 4 lanes of 2 rows a batch
    assert plan.worker_slices(0, 2) == [(0, 0, 2), (1, 0, 2)]  # W divides K: whole lanes
    assert plan.worker_slices(5, 8) == [(2, 1, 2)]  # half a lane
    three = plan_lanes(["a", "b", "c"], [10, 10, 10], 6)  # 3 lanes of 2 rows, 2 workers of 3 positions
    assert three.worker_slices(0, 2) == [(0, 0, 2), (1, 0, 1)] and three.worker_slices(1, 2) == [(1, 1, 2), (2, 0, 2)]


def test_epochs_reorder_and_resume_skips_files_unread():
    whole, part = Reader(), Reader()
    full = batches(8, 1, 0, epoch=1, reader=whole)
    assert full != batches(8, 1, 0, epoch=0)  # a new order each epoch
    resumed = batches(8, 1, 0, epoch=1, skip=5, reader=part)
    assert resumed == full[5:]
    assert len(part.read) < len(whole.read)  # pieces wholly before step 5 are not read
