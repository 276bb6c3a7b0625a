"""Experiment trackers beyond TensorBoard: Weights & Biases and MLflow (`logging.report_to`; the `trackers` extra).

One tracker run per DPO run, shared by the processes that write to it: training's rank 0 logs every logged step's
metrics, evaluation logs each target's figures at its training step (the reference at step 0) and the report's
plots as files. The run's id is kept in `<run_dir>/trackers.json`, so that a restarted training run and the later
evaluation continue the same tracker run. The resolved config is the run's parameters (W&B config; MLflow params,
flattened to dotted keys).

W&B: `wandb.init` with `logging.wandb_mode` (default: wandb's own, i.e. `WANDB_MODE`, else online); offline runs
are written under `<run_dir>/wandb/` (`wandb sync` uploads them). MLflow: `MLFLOW_TRACKING_URI` if set (a server,
`databricks`, ...), else a SQLite store `<run_dir>/mlflow.db` with artifacts in `<run_dir>/mlartifacts/` (a local
run_dir only).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from pipeline.config import LoggingConfig
from pipeline.errors import UserError
from pipeline.store.storage import Store, staging_dir

IDS = "trackers.json"


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"train": {"loss": {"beta": 0.1}}} -> {"train.loss.beta": 0.1}; lists as JSON."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, list) else v
    return out


def _numbers(metrics: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


class Trackers:
    """The configured trackers of one run, in this process: `log` metrics at a step, `files` as artifacts,
    `close`. TensorBoard is not here: the training metrics logger writes it (pipeline/dpo/metrics.py)."""

    def __init__(self, run_dir: str, report_to: list[str], config: dict[str, Any], project: str,
                 run_name: str | None = None, wandb_mode: str | None = None):
        self.store = Store(run_dir)
        self.ids: dict[str, str] = self.store.read_json(IDS) if self.store.exists(IDS) else {}
        name = run_name or Path(self.store.uri.rstrip("/")).name
        self.wandb = self._wandb(config, project, name, wandb_mode) if "wandb" in report_to else None
        self.mlflow = self._mlflow(config, project, name) if "mlflow" in report_to else None
        self.store.write_json(IDS, self.ids)

    def _local_dir(self) -> Path:
        """Where W&B writes its `wandb/` directory: the run_dir, or (a URI run_dir) a local staging directory."""
        d = Path(self.store.root) if self.store.local else staging_dir() / "trackers"
        d.mkdir(parents=True, exist_ok=True)
        return d

    def _wandb(self, config: dict[str, Any], project: str, name: str, mode: str | None):
        import wandb  # noqa: PLC0415 (optional: the `trackers` extra)

        # Our metrics are logged explicitly: no console capture, no system-metrics sampling, no banner.
        settings = wandb.Settings(console="off", x_disable_stats=True, silent=True)
        run = wandb.init(project=project, name=name, id=self.ids.get("wandb"), resume="allow", config=config,
                         dir=str(self._local_dir()), mode=mode, reinit="create_new", settings=settings)
        self.ids["wandb"] = run.id
        return run

    def _mlflow(self, config: dict[str, Any], project: str, name: str):
        from mlflow.tracking import MlflowClient  # noqa: PLC0415 (optional: the `trackers` extra)

        uri = os.environ.get("MLFLOW_TRACKING_URI")
        artifacts = None
        if not uri:
            if not self.store.local:
                raise UserError("logging.report_to has mlflow and run_dir is a URI: set MLFLOW_TRACKING_URI to your "
                                "MLflow server (the default store, <run_dir>/mlflow.db, needs a local run_dir)")
            uri = f"sqlite:///{Path(self.store.root).resolve() / 'mlflow.db'}"
            artifacts = (Path(self.store.root).resolve() / "mlartifacts").as_uri()
        client = MlflowClient(uri)
        if "mlflow" not in self.ids:
            exp = client.get_experiment_by_name(project)
            exp_id = exp.experiment_id if exp else client.create_experiment(project, artifact_location=artifacts)
            run = client.create_run(exp_id, run_name=name)
            self.ids["mlflow"] = run.info.run_id
            from mlflow.entities import Param  # noqa: PLC0415

            params = [(k, str(v)[:6000]) for k, v in flatten(config).items()]
            for i in range(0, len(params), 100):  # MLflow takes at most 100 params per batch
                client.log_batch(self.ids["mlflow"], params=[Param(k, v) for k, v in params[i:i + 100]])
        self.mlflow_uri = uri
        return client

    def log(self, metrics: dict[str, float], step: int) -> None:
        """Training metrics of one logged step."""
        values = _numbers(metrics)
        if self.wandb is not None:
            self.wandb.log(values, step=step)
        if self.mlflow is not None:
            self.log_mlflow(values, step)

    def log_mlflow(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415

        now = int(time.time() * 1000)
        self.mlflow.log_batch(self.ids["mlflow"], metrics=[Metric(k, v, now, step)
                                                           for k, v in _numbers(metrics).items()])

    def files(self, paths: list[str | Path], folder: str) -> None:
        """Local files (the report's plots) as the run's artifacts under `folder`."""
        for p in map(Path, paths):
            if self.wandb is not None:
                self.wandb.save(str(p), base_path=str(p.parent), policy="now")
            if self.mlflow is not None:
                self.mlflow.log_artifact(self.ids["mlflow"], str(p), folder)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
        self.wandb = self.mlflow = None


def open_trackers(log: LoggingConfig, run_dir: str, params: dict[str, Any]) -> Trackers | None:
    """The run's W&B/MLflow trackers, recording `params` (the whole config, as JSON) as the run's parameters, or
    None when only TensorBoard (or nothing) is asked for."""
    if not {"wandb", "mlflow"} & set(log.report_to):
        return None
    return Trackers(run_dir, log.report_to, params, log.project, log.run_name, log.wandb_mode)


# Evaluation's figures per target, logged against the target's training step (the reference at 0).
EVAL_METRICS = ("reward_mean", "kl_mean", "win_rate", "pref_accuracy", "pref_margin_mean")


def log_evaluation(log: LoggingConfig, run_dir: str, params: dict[str, Any], rows: list[dict[str, Any]],
                   plots: list[str | Path]) -> None:
    """Evaluation's figures by checkpoint step (`eval/<figure>`, with `eval/step` the x-axis: W&B steps only
    grow, and training has logged up to its last step) and the report's plots as artifacts under `eval/`."""
    trackers = open_trackers(log, run_dir, params)
    if trackers is None:
        return
    try:
        if trackers.wandb is not None:
            trackers.wandb.define_metric("eval/step")
            trackers.wandb.define_metric("eval/*", step_metric="eval/step")
        for row in sorted(rows, key=lambda r: r.get("step") or 0):
            step = row.get("step") or 0
            figures = {f"eval/{k}": row[k] for k in EVAL_METRICS if row.get(k) is not None}
            if trackers.wandb is not None:
                trackers.wandb.log({**figures, "eval/step": step})
            if trackers.mlflow is not None:
                trackers.log_mlflow(figures, step)
        local = []
        for p in plots:
            if "://" in str(p):  # a URI eval_dir: a local copy to upload from
                copy = staging_dir() / "trackers" / Path(str(p)).name
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_bytes(Store(str(p).rsplit("/", 1)[0]).read_bytes(Path(str(p)).name))
                p = copy
            local.append(p)
        trackers.files(local, "eval")
    finally:
        trackers.close()
