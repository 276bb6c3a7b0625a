"""Stage 3's reference log-probs: per-token log π_ref of sampled completions, by the stage-1 scorer
(`scoring.engine`) in Ray actors, cached by content under `<cache_dir>/eval-reference/<key>.parquet` so that
samples scored once are never scored again."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
from ray.util import ActorPool

from pipeline.config import DataConfig, EvalConfig, ModelConfig, RayConfig, ScoringConfig
from pipeline.data.models import resolve_model
from pipeline.engines.actors import ReferenceEngine, stop_engines
from pipeline.engines.chunks import PromptFile, SampledChunk, chunk_prompts, completion_sequences, sequence_key
from pipeline.engines.scorers import actor_options, scorer_kwargs
from pipeline.evaluation.inputs import Prompts
from pipeline.runtime.cluster import spread
from pipeline.store.storage import Store


def engine_max_length(data: DataConfig, eval_cfg: EvalConfig) -> int:
    """Tokens an evaluation engine (sampling or reference) must hold: a prompt and its completion, or a held-out
    pair's sequence."""
    return max(data.max_length, data.max_prompt_length + eval_cfg.max_new_tokens)


@dataclass(frozen=True)
class EngineBase:
    """What evaluation's engines (sampling and reference scoring) are built with beside a target's weights: the
    reference model (LoRA engines and the reference scorer load it), the longest sequence an engine holds, and
    whether the actors are spread over the nodes."""

    model: ModelConfig
    max_length: int
    spread: bool

    @classmethod
    def of(cls, model: ModelConfig, data: DataConfig, eval_cfg: EvalConfig, ray_cfg: RayConfig) -> EngineBase:
        return cls(model, engine_max_length(data, eval_cfg), spread(ray_cfg))

    def model_dir(self) -> str:
        """The reference model's local directory (resolved when an engine needs it)."""
        return resolve_model(self.model.path, self.model.revision).local_dir


def chunk_key(chunk: SampledChunk, prompt_files: list[PromptFile], reference: dict[str, Any]) -> tuple[str, int]:
    """Ray task: the content key of a chunk's reference log-probs (`sequence_key`) and its number of rows."""
    rows = chunk.read(["prompt_index", "completion_ids"])
    sequences, starts = completion_sequences(rows, chunk_prompts(rows, prompt_files, ["prompt_input_ids"]))
    return sequence_key(reference, sequences, starts), len(rows)


def reference_logps(scoring: ScoringConfig, base: EngineBase, cache: Store, logs: Store, reference: dict[str, Any],
                    chunks: list[SampledChunk], prompts: Prompts, progress_factory) -> dict[SampledChunk, str]:
    """The URI of every chunk's per-token log π_ref (`reference`: the reference's identity), cached in `cache`
    (RunLayout.eval_reference): Ray tasks key the chunks by content; chunks whose entry is not in the cache are
    scored and written by `scoring`'s scorer actors (their logs in `logs`). The driver handles keys and counts
    only."""
    task = ray.remote(chunk_key).options(num_cpus=1)
    keys = ray.get([task.remote(chunk, prompts.files, reference) for chunk in chunks])
    uris = {chunk: f"{cache.uri}/{key}.parquet" for chunk, (key, _) in zip(chunks, keys, strict=True)}
    missing: dict[str, tuple[SampledChunk, int]] = {}  # one chunk per key: equal samples are scored once
    for chunk, (key, rows) in zip(chunks, keys, strict=True):
        if key not in missing and not cache.exists(f"{key}.parquet"):
            missing[key] = (chunk, rows)
    if missing:
        _score(scoring, base, logs, missing, prompts, cache, progress_factory)
    return uris


def _score(ref: ScoringConfig, base: EngineBase, logs: Store, missing: dict[str, tuple[SampledChunk, int]],
           prompts: Prompts, cache: Store, progress_factory) -> None:
    """`scoring.num_actors` scorer actors write the missing cache entries, each read its chunk from storage.
    The actors are killed at the end, on an error or an interrupt too."""
    kwargs = scorer_kwargs(ref.engine, ref, base.model_dir(), base.model.dtype, base.max_length,
                           base.model.trust_remote_code)
    actors = [ray.remote(ReferenceEngine).options(**actor_options(ref, base.spread)).remote(
        ref.engine, kwargs, f"{logs.uri}/reference-scorer-{i}.log")
        for i in range(min(ref.num_actors, len(missing)))]
    size = max(1, ref.batch_size * 2)  # sequences per scorer call: a scorer batch holds 2 per pair
    total = sum(rows for _, rows in missing.values())
    try:
        with progress_factory(total=total, desc=f"reference log-probs ({ref.engine})", unit="sample") as bar:
            # The pool keeps every actor busy; results come back as counts.
            calls = ActorPool(actors).map_unordered(
                lambda actor, item: actor.score_chunk.remote(item[1][0], prompts.files,
                                                             f"{cache.uri}/{item[0]}.parquet", size),
                list(missing.items()))
            for rows in calls:
                bar.update(rows)
    except BaseException:  # an error or an interrupt: calls may be running; the actors go at once
        stop_engines(actors, timeout_s=0)
        raise
    stop_engines(actors)
