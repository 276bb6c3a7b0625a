"""The typed, strict configuration (`schema`: one section per component, every field documented) and its loading
(`loading`: YAML + dotted overrides, one-line errors, renamed keys, the generated reference)."""

from pipeline.config.loading import load_config, parse_overrides, reference_markdown, to_yaml
from pipeline.config.onpolicy import IterateConfig, PairsConfig
from pipeline.config.root import Config, LoggingConfig, RayConfig, SharedPaths
from pipeline.config.schema import (
                                    CheckpointConfig,
                                    DataConfig,
                                    DataSource,
                                    EngineSettings,
                                    EvalConfig,
                                    LossConfig,
                                    ModelConfig,
                                    OptimConfig,
                                    ParallelConfig,
                                    RewardConfig,
                                    ScoringConfig,
                                    TokenizerConfig,
                                    TrainConfig,
)

__all__ = ["CheckpointConfig", "Config", "DataConfig", "DataSource", "EngineSettings", "EvalConfig",
           "IterateConfig", "LoggingConfig", "LossConfig", "ModelConfig", "OptimConfig", "PairsConfig",
           "ParallelConfig", "RayConfig", "RewardConfig", "ScoringConfig", "SharedPaths", "TokenizerConfig",
           "TrainConfig", "load_config", "parse_overrides", "reference_markdown", "to_yaml"]
