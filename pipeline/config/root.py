"""The root of the configuration: one section per component (`schema`, `onpolicy`)."""

from __future__ import annotations

from pydantic import Field

from pipeline.config.onpolicy import IterateConfig, PairsConfig
from pipeline.config.schema import (
    DataConfig,
    EvalConfig,
    LoggingConfig,
    ModelConfig,
    RayConfig,
    ScoringConfig,
    TokenizerConfig,
    TrainConfig,
    _Strict,
)


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
