"""`plan` and `run`: the whole tiny pipeline in one call, then everything reused."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.orchestrate import plan, run
from pipeline.store.run_status import run_status, status_lines
from tests.conftest import DATA, make_config

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
pytest.importorskip("vllm")


def _actions(cfg):
    return [(s.stage, s.action) for s in plan(cfg)]


def _assert_trackers_recorded(run_dir: Path, rows: list[dict]) -> None:
    """Training (in the Ray Train worker) and evaluation (the driver) logged to one W&B and one MLflow run: the
    values of metrics.jsonl at their steps, and each target's figures at its training step."""
    import json

    from mlflow.tracking import MlflowClient

    from tests.test_trackers import wandb_history

    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    ids = json.loads((run_dir / "trackers.json").read_text())
    client = MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss")] == \
        [(r["step"], r["loss"]) for r in logged]
    want = sorted(((r["step"] or 0), r["reward_mean"]) for r in rows)
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "eval/reward_mean")] == want
    assert {a.path for a in client.list_artifacts(ids["mlflow"], "eval")} >= {"eval/reward_vs_kl.png"}
    history = wandb_history(run_dir)
    assert [(h["_step"], h["loss"]) for h in history if "loss" in h] == [(r["step"], r["loss"]) for r in logged]
    assert [(h["eval/step"], h["eval/reward_mean"]) for h in history if "eval/step" in h] == want


def _assert_console_and_logs(out: str, err: str, run_dir: Path) -> None:
    """What the person saw: the training bar and a compact line per step, from the Ray Train worker but drawn by
    the driver; no line of Ray's, Ray Train's or vLLM's own. Those are in the run's log files, by component."""
    assert "step 1/2  loss 0.6931" in out and "step 2/2  loss" in out and "training: 100%" in err
    for internal in ("RayTrainWorker pid=", "TrainController pid=", "PlacementGroupCleaner pid=",
                     "Reporting training result", "Failed to query Ray Train Controller"):
        assert internal not in out + err, internal
    logs = run_dir / "logs"
    assert "Reporting training result" in (logs / "train-workers.log").read_text()
    assert "TrainController" in (logs / "ray-train.log").read_text()


def test_plan_run_then_everything_is_reused(tiny_model, tmp_path, ray_local, capsys):
    cfg = make_config(tiny_model, tmp_path, "scoring.engine=hf", f"data.eval.path={DATA / 'conversational.jsonl'}",
                      "train.max_steps=2", "train.global_batch_pairs=4", "train.micro_batch_pairs=2",
                      "eval.num_prompts=3", "eval.max_new_tokens=4", "eval.engine_kwargs={enforce_eager: true}",
                      "eval.reward.type=rule", "eval.reward.rule=length",
                      "logging.report_to=[tensorboard, wandb, mlflow]", "logging.wandb_mode=offline")
    assert _actions(cfg) == [("cache/train", "run"), ("cache/eval", "run"), ("train", "run"), ("eval", "run")]

    lines: list[str] = []
    first = run(cfg, echo=lines.append)
    assert len(lines) == 4 and lines[0].startswith("plan: cache/train")
    assert [Path(c).name for c in first.checkpoints] == ["step_000002"]
    assert [r["name"] for r in first.rows] == ["reference", "step_000002"] and not first.failures
    assert Path(first.report).is_file() and (Path(cfg.run_dir) / "train.json").is_file()

    _assert_console_and_logs(*capsys.readouterr(), Path(cfg.run_dir))
    _assert_trackers_recorded(Path(cfg.run_dir), first.rows)
    status = run_status(cfg.run_dir)  # what `dpo-pipeline status` reads: the run_dir's files alone
    assert status.stage == "evaluated" and status.steps_total == 2 and status.loss == "sigmoid β=0.1"
    assert [c.rsplit("/", 1)[-1] for c in status.checkpoints] == ["step_000002"]
    assert [r["name"] for r in status.evaluated] == ["reference", "step_000002"]
    assert status.caches["train"]["pairs"] == 24 and status.report == f"{status.run_dir}/eval/report.md"
    text = "\n".join(status_lines(status))
    assert "[step_000002] reward" in text and "engine.log" in text and "logs/train-workers.log" in text

    steps = plan(cfg)
    assert [s.action for s in steps] == ["reuse"] * 4, steps
    assert "2 steps" in steps[2].why and "2 target(s)" in steps[3].why
    watched = [Path(first.checkpoints[0]) / "model.safetensors", Path(first.report).parent / "reference" /
               "result.json", Path(cfg.run_dir) / "train.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    second = run(cfg, echo=lines.append)
    assert [p.stat().st_mtime_ns for p in watched] == before  # nothing recomputed or rewritten
    assert second.rows == first.rows and second.checkpoints == first.checkpoints

    # A training setting that shapes the weights makes training (and so evaluation) due again; one that does not,
    # does not.
    assert _actions(make_config(tiny_model, tmp_path, "scoring.engine=hf",
                                f"data.eval.path={DATA / 'conversational.jsonl'}", "train.max_steps=2",
                                "train.global_batch_pairs=4", "train.micro_batch_pairs=2", "train.log_every=5",
                                "eval.num_prompts=3", "eval.max_new_tokens=4",
                                "eval.engine_kwargs={enforce_eager: true}", "eval.reward.type=rule",
                                "eval.reward.rule=length"))[2] == ("train", "reuse")
    changed = cfg.model_copy(deep=True)
    changed.train.optim.lr = 3e-4
    steps = plan(changed)
    assert [(s.stage, s.action) for s in steps[2:]] == [("train", "resume"), ("eval", "run")]
    assert "run_dir holds a run with other inputs or settings" in steps[2].why
