"""The root of the configuration: one section per component (`schema`, `onpolicy`; the run-wide ones, trackers and
Ray, here)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import Field

from pipeline.config.onpolicy import IterateConfig, PairsConfig
from pipeline.config.schema import (
    DataConfig,
    EvalConfig,
    ModelConfig,
    ScoringConfig,
    TokenizerConfig,
    TrainConfig,
    _Strict,
)


class LoggingConfig(_Strict):
    """Where metrics go besides `<run_dir>/metrics.jsonl` and the report."""

    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=lambda: ["tensorboard"],
        description="Trackers: `tensorboard` (<run_dir>/tensorboard), `wandb`, `mlflow` (the `trackers` extra). "
                    "Training metrics every logged step, evaluation figures by checkpoint step, the report's plots, "
                    "the resolved config as parameters.")
    project: str = Field("dpo-pipeline", description="W&B project / MLflow experiment name.")
    run_name: str | None = Field(None, description="Tracker run name; default: the run_dir's last part.")
    wandb_mode: Literal["online", "offline"] | None = Field(
        None, description="W&B mode; default: wandb's own (`WANDB_MODE`, else online). Offline runs are kept in "
                          "<run_dir>/wandb (`wandb sync` uploads them).")


class RayConfig(_Strict):
    address: str | None = Field(None, description="Ray cluster to join (`auto`, `ray://...`); default: the "
                                                  "`RAY_ADDRESS` variable, else a local Ray instance.")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for a local Ray instance; default: all.")
    placement: Literal["default", "spread"] = Field(
        "default", description="`default`: Ray's placement (Ray Train packs workers onto few nodes, evaluation "
                               "actors go where resources are free); `spread`: Ray Train workers and evaluation "
                               "actors over as many nodes as possible (SPREAD). Stage-1 scorer actors always spread "
                               "(Ray Data's default).")
    dashboard: bool | None = Field(
        None, description="Start Ray's dashboard with a local Ray instance (its URL is printed); default: when "
                          "its packages are installed (the `dashboard` extra, `ray[default]`). A joined cluster "
                          "has the dashboard its head started with.")


class Config(_Strict):
    model: ModelConfig = Field(description="The reference (and initial policy) model.")
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig, description="Tokenizer and chat template.")
    data: DataConfig = Field(description="Preference data and truncation.")
    scoring: ScoringConfig = Field(default_factory=ScoringConfig,
                                   description="Reference log-prob scoring (stage 1; evaluation's sample scoring).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="DPO training (stage 2).")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Checkpoint evaluation by sampling (stage 3).")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    pairs: PairsConfig = Field(default_factory=PairsConfig,
                               description="Preference pairs from a model's own samples (`dpo-pipeline pairs`).")
    iterate: IterateConfig = Field(default_factory=IterateConfig,
                                   description="Iterative DPO (`dpo-pipeline iterate`).")
    logging: LoggingConfig = Field(default_factory=LoggingConfig, description="Experiment trackers.")
    cache_dir: str = Field("cache", description="Root of the content-addressed reference cache: a local path or a "
                                                "`file://`, `s3://`, `gs://` URI; shared storage on several nodes.")
    run_dir: str = Field("runs/default", description="This run's directory (resolved config, logs, checkpoints, "
                                                     "evaluation): a local path or a `file://`, `s3://`, `gs://` URI; "
                                                     "shared storage on several nodes.")

    def shared_paths(self) -> SharedPaths:
        """The places every node of a multi-node run must see (runtime/cluster.check_shared_storage)."""
        inputs = {"model.path": self.model.path, "tokenizer.path": self.tokenizer.path,
                  "data.train.path": self.data.train.path,
                  "data.eval.path": self.data.eval.path if self.data.eval else None,
                  "eval.prompts.path": self.eval.prompts.path if self.eval.prompts else None}
        return SharedPaths({"cache_dir": self.cache_dir, "run_dir": self.run_dir},
                           {k: v for k, v in inputs.items() if v})


@dataclass(frozen=True)
class SharedPaths:
    """By config key: the storage roots a run writes (cache_dir, run_dir) and the model, tokenizer and data paths it
    reads."""

    roots: dict[str, str]
    inputs: dict[str, str]
