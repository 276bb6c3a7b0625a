"""W&B and MLflow trackers (`logging.report_to`): what each wrote, read back with its own reader (MLflow's client;
W&B's offline run files, decoded with wandb's own record protobuf)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.runtime.trackers import IDS, Trackers, log_evaluation, open_trackers

wandb = pytest.importorskip("wandb")
mlflow = pytest.importorskip("mlflow")


def wandb_records(run_dir: Path, kind: str) -> list:
    """Every record of `kind` ("history", "run", "files") in the run's offline W&B files, oldest session first.
    The files are LevelDB-style logs (32 KiB blocks of CRC, length, type-tagged chunks) of wandb's `Record`s."""
    from wandb.proto import wandb_internal_pb2

    out = []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, block, chunks = path.read_bytes(), 7, 32768, b""  # 7: the W&B file header
        while pos + 7 <= len(data):
            left = block - pos % block
            _crc, length, kind_of_chunk = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind_of_chunk == 0):  # the block's padding
                pos += left
                continue
            chunks += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind_of_chunk in (1, 4):  # a whole record, or the last chunk of one
                rec = wandb_internal_pb2.Record()
                rec.ParseFromString(chunks)
                chunks = b""
                if rec.WhichOneof("record_type") == kind:
                    out.append(getattr(rec, kind))
    return out


def wandb_history(run_dir: Path) -> list[dict]:
    return [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in h.item}
            for h in wandb_records(run_dir, "history")]


def config(run_dir: Path):
    return load_config("configs/tiny.yaml", [f"run_dir={run_dir}", "logging.report_to=[tensorboard, wandb, mlflow]",
                                             "logging.wandb_mode=offline", "train.loss.beta=0.25"])


@pytest.mark.subprocess
def test_training_then_evaluation_log_to_one_run_of_each_tracker(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_dir = tmp_path / "run"
    cfg = config(run_dir)
    # Training's rank 0: two logged steps.
    trackers = open_trackers(cfg.logging, str(run_dir), cfg.model_dump(mode="json"))
    trackers.log({"loss": 0.693, "rewards/accuracies": 0.5, "pairs": 8}, step=1)
    trackers.log({"loss": 0.61, "rewards/accuracies": 0.75, "pairs": 8}, step=2)
    trackers.close()
    # Evaluation, later, in another process: the same tracker runs continue.
    plot = tmp_path / "reward_vs_kl.png"
    plot.write_bytes(b"\x89PNG fake")
    rows = [{"name": "reference", "step": None, "reward_mean": 0.1, "kl_mean": 0.0, "win_rate": None,
             "pref_accuracy": None, "pref_margin_mean": None},
            {"name": "step_000002", "step": 2, "reward_mean": 0.4, "kl_mean": 1.5, "win_rate": 0.6,
             "pref_accuracy": 0.7, "pref_margin_mean": 0.2}]
    log_evaluation(cfg.logging, str(run_dir), cfg.model_dump(mode="json"), rows, [plot])

    ids = json.loads((run_dir / IDS).read_text())
    client = mlflow.tracking.MlflowClient(f"sqlite:///{run_dir / 'mlflow.db'}")
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "loss")] == [(1, 0.693), (2, 0.61)]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "eval/reward_mean")] == \
        [(0, 0.1), (2, 0.4)]
    assert [(m.step, m.value) for m in client.get_metric_history(ids["mlflow"], "eval/win_rate")] == [(2, 0.6)]
    run = client.get_run(ids["mlflow"])
    assert run.data.params["train.loss.beta"] == "0.25" and run.data.params["logging.report_to"] == \
        '["tensorboard", "wandb", "mlflow"]'
    assert [a.path for a in client.list_artifacts(ids["mlflow"], "eval")] == ["eval/reward_vs_kl.png"]
    assert len(client.search_runs([run.info.experiment_id])) == 1

    history = wandb_history(run_dir)
    train = [h for h in history if "loss" in h]
    assert [(h["_step"], h["loss"], h["rewards/accuracies"]) for h in train] == [(1, 0.693, 0.5), (2, 0.61, 0.75)]
    evals = [h for h in history if "eval/step" in h]
    assert [(h["eval/step"], h["eval/reward_mean"]) for h in evals] == [(0, 0.1), (2, 0.4)]
    assert evals[1]["eval/pref_accuracy"] == 0.7 and "eval/win_rate" not in evals[0]
    runs = wandb_records(run_dir, "run")
    assert {r.run_id for r in runs} == {ids["wandb"]}  # both sessions: one W&B run
    params = {i.key: json.loads(i.value_json) for i in runs[0].config.update}
    assert params["train"]["loss"]["beta"] == 0.25
    saved = [f.path for r in wandb_records(run_dir, "files") for f in r.files]
    assert "reward_vs_kl.png" in saved


def test_only_tensorboard_opens_no_tracker(tmp_path):
    cfg = load_config("configs/tiny.yaml", [f"run_dir={tmp_path}"])
    assert cfg.logging.report_to == ["tensorboard"] and open_trackers(cfg.logging, str(tmp_path), {}) is None
    log_evaluation(cfg.logging, str(tmp_path), {}, [], [])  # nothing to do, nothing written
    assert not (tmp_path / IDS).exists()


def test_mlflow_needs_a_server_for_a_uri_run_dir(s3, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="set MLFLOW_TRACKING_URI"):
        Trackers(f"{s3}/runs/x", ["mlflow"], {}, "p")
