"""The configuration of on-policy data: `pairs` (preference pairs from a model's own samples, scored by a reward)
and `iterate` (rounds of pairs -> reference cache -> training -> evaluation). Same conventions as `schema`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.config.schema import DataSource, RewardConfig, SamplingSettings, _Strict


class PairsConfig(SamplingSettings):
    """`dpo-pipeline pairs`: sample `samples_per_prompt` completions per prompt from `model` (vLLM engines in Ray
    actors, as evaluation samples), score them with `reward`, keep pairs by `rule`."""

    model: str | None = Field(None, description="The model to sample: a directory (a checkpoint, or a LoRA adapter "
                                                "of `model.path`) or a hub id; default: `model.path`.")
    prompts: DataSource | None = Field(
        None, description="Prompts: rows with a `prompt` (text or messages) or preference data (its prompts); "
                          "default: `data.train`. The pairs are written in the prompts' format: text prompts give "
                          "`standard` rows, message prompts `conversational` rows.")
    samples_per_prompt: int = Field(4, ge=2, description="Completions sampled per prompt (K).")
    reward: RewardConfig | None = Field(None, description="How completions are scored; default: `eval.reward`.")
    rule: Literal["best_worst", "all_pairs"] = Field(
        "best_worst", description="`best_worst`: per prompt, the highest-reward completion against the lowest; "
                                  "`all_pairs`: every two completions of a prompt (the higher reward chosen).")
    margin: float = Field(0.0, ge=0, description="Keep a pair only when chosen's reward exceeds rejected's by more "
                                                 "than this; equal rewards never make a pair.")
    keep_truncated: bool = Field(False, description="Keep completions cut at `max_new_tokens` (default: dropped: "
                                                    "a response's end is part of what training learns).")
    output_format: Literal["parquet", "jsonl"] = Field("parquet", description="File format of the pairs.")
    output_dir: str | None = Field(None, description="Where the pairs go (a local path or URI); default: "
                                                     "`<run_dir>/pairs`.")


class IterateConfig(_Strict):
    """`dpo-pipeline iterate`: rounds r = 1..R of pairs sampled from π_{r-1} (π_0 = `model.path`), their
    reference cache, training from π_{r-1}, and evaluation of π_r; under `<run_dir>/round_<r>/`."""

    rounds: int = Field(3, ge=1, description="Rounds R.")
    reference: Literal["initial", "previous"] = Field(
        "initial", description="π_ref of round r: `initial` (`model.path`, every round) or `previous` (π_{r-1}, "
                               "the policy the round's pairs were sampled from).")
    prompts: Literal["split", "all"] = Field(
        "split", description="`split`: the prompts are cut into R consecutive parts, round r samples part r (R "
                             "rounds see the prompts once, as one offline round); `all`: every round samples "
                             "every prompt (its own seed per round).")
    evaluate: bool = Field(True, description="Evaluate each round's final policy (`eval` settings).")
