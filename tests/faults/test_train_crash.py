"""Case 4: a crash in training, one scenario. A run killed while writing a checkpoint leaves no half-written
checkpoint that resume or evaluation would pick, and the rerun resumes from the last complete one (the resume test
of the suite); in that rerun a worker killed mid-run is restarted by Ray Train from the last complete checkpoint,
and the run ends with the weights of an uninterrupted run, each step logged once, older exports pruned."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import RunFailed
from pipeline.store.checkpoints import list_checkpoints
from pipeline.store.storage import Store
from stages import evaluate, train
from tests.conftest import TRAIN_STEPS, copy_cache, make_config
from tests.faults.helpers import fault
from tests.test_train import assert_same_params, metrics

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory, standard_cache):
    root = tmp_path_factory.mktemp("train-faults")
    copy_cache(standard_cache, root)

    def config(name: str, *overrides: str):
        return make_config(tiny_model, root, "scoring.engine=hf", *TRAIN_STEPS, f"run_dir={root / name}",
                           "eval.include_reference_model=false", *overrides)
    return config


@pytest.fixture(scope="module")
def straight(straight_run):
    """The uninterrupted 4-step run (the session's: conftest.py)."""
    return straight_run[1]


def test_a_run_killed_while_writing_a_checkpoint_leaves_none_half_written_and_a_killed_worker_restarts(
        base, straight, tmp_path, monkeypatch):
    token = tmp_path / "token"
    # The worker dies halfway through the second export (step 4): weights written, tokenizer not yet.
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("checkpoint_export", token, nth=2))
    cfg = base("torn")
    with pytest.raises(RunFailed, match=r"training failed \(.*\); the last complete checkpoint is step_000002: rerun "
                                        r"the same command to resume from it, or set "
                                        r"train.checkpoint.max_failures") as e:
        train.run(cfg)
    # the worker's error, e.g. a failed health check
    assert "\n" not in str(e.value) and "Error: " in str(e.value), e.value
    ckpts = Path(cfg.run_dir) / "checkpoints"
    (half,) = ckpts.glob(".tmp-step_000004-*")  # the half-written export is there...
    assert (half / "config.json").exists() and not (half / "tokenizer_config.json").exists()
    assert [Path(c).name for c in list_checkpoints(Store(cfg.run_dir))] == ["step_000002"]  # ...unseen
    assert [t.name for t in evaluate.select_targets(cfg)] == ["step_000002"]
    ray_ckpts = sorted(p.name for p in Path(cfg.run_dir, "ray").glob("checkpoint_*") if p.is_dir())
    assert ray_ckpts == ["checkpoint_000002"]

    # The rerun resumes from step 2 (`keep` and `max_failures` are no inputs of the run). Its worker process exits
    # right after step 3 (logged, not checkpointed): Ray Train restarts it from the last checkpoint, step 2 again.
    killed = tmp_path / "killed-token"
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("train_step", killed, nth=1))
    result = train.run(base("torn", "train.checkpoint.keep=1", "train.checkpoint.max_failures=1"))
    assert not killed.exists()  # it fired
    assert_same_params(Path(result.checkpoints[-1]), Path(straight.checkpoints[-1]), atol=1e-6)
    assert [Path(c).name for c in result.checkpoints] == ["step_000004"]  # older HF exports pruned
    ray_ckpts = [p.name for p in Path(result.run_dir, "ray").glob("checkpoint_*") if p.is_dir()]
    assert ray_ckpts == ["checkpoint_000004"]
    assert not list(ckpts.glob(".tmp-*"))
    assert [r["step"] for r in metrics(result.run_dir)] == [1, 2, 3, 4]  # step 3 (done three times) logged once
    assert json.loads(Path(cfg.run_dir, "train.json").read_text())["steps"] == 4
