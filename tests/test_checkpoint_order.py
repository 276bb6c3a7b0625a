"""The order a training worker checkpoints in: the previous step's training state (saved in the background) is
reported to Ray Train before the next Hugging Face export starts, so a run that dies during an export resumes from
the last export it shows as complete. (The end-to-end crash is tests/faults/test_train_crash.py; there the
background save usually finishes first, which hid this ordering.)"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from pathlib import Path

import pytest

from pipeline.errors import RunFailed
from pipeline.store.checkpoints import training_failed
from pipeline.store.storage import Store
from pipeline.training.checkpointer import Checkpointer


class ExportCrash(RuntimeError):
    pass


def checkpointer_with_a_save_in_flight(previous: int, seconds: float) -> tuple[Checkpointer, list[int]]:
    """A worker's checkpointer whose checkpoint of `previous` is still being written in the background for
    `seconds`; its exports crash, and what it reports to Ray Train is recorded."""
    checkpointer = Checkpointer.__new__(Checkpointer)
    checkpointer.saved_step, checkpointer.blocked_s, checkpointer.reporting_s = previous, [], 0.0
    future: Future = Future()
    threading.Timer(seconds, future.set_result, args=(None,)).start()
    checkpointer.pending = (future, Path("unused"), {"step": previous})
    reported: list[int] = []
    checkpointer._report = lambda local, meta: reported.append(meta["step"])

    def export(name: str) -> None:
        raise ExportCrash(name)
    checkpointer._export_hf = export
    return checkpointer, reported


def test_the_previous_checkpoint_is_reported_before_the_next_export_starts():
    checkpointer, reported = checkpointer_with_a_save_in_flight(previous=2, seconds=0.3)
    with pytest.raises(ExportCrash):
        checkpointer.save(4, {}, {})
    assert reported == [2]
    assert checkpointer.pending is None


class Failed(RuntimeError):
    worker_failures = {0: RuntimeError("worker died")}


@pytest.mark.parametrize("ray_dirs, expected", [
    ([], "no checkpoint yet"),
    (["checkpoint_000002"], "the last complete checkpoint is step_000002"),
    (["checkpoint_000002", "checkpoint_000004"], "the last complete checkpoint is step_000004"),
])
def test_a_failed_run_names_the_checkpoint_a_rerun_resumes_from(tmp_path, ray_dirs, expected):
    # The Hugging Face exports run one ahead: step 6 is exported, its training state never reported.
    for name in ("step_000002", "step_000004", "step_000006"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "config.json").write_text("{}")
    for name in ray_dirs:
        (tmp_path / "ray" / name).mkdir(parents=True)
    (tmp_path / "ray").mkdir(exist_ok=True)
    (tmp_path / "ray" / "checkpoint_manager_snapshot.json").write_text("{}")  # Ray Train's own files: not checkpoints
    error = training_failed(Failed(), Store(str(tmp_path)))
    assert isinstance(error, RunFailed)
    assert f"(RuntimeError: worker died); {expected}: rerun the same command" in str(error)
