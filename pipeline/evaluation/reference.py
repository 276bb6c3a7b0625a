"""Stage 3's reference log-probs: per-token log π_ref of sampled completions, by the stage-1 scorer
(`scoring.engine`) in Ray actors, cached by content under `<cache_dir>/eval-reference/<key>.parquet` so that
samples scored once are never scored again."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from ray.util import ActorPool

from pipeline.config import Config
from pipeline.data.models import resolve_model
from pipeline.dpo.batching import list_column
from pipeline.engines.actors import ReferenceEngine
from pipeline.engines.scorers import actor_options, scorer_kwargs
from pipeline.runtime.cluster import spread
from pipeline.store.storage import Store


def engine_max_length(cfg: Config) -> int:
    """Tokens an evaluation engine (sampling or reference) must hold: a prompt and its completion, or a held-out
    pair's sequence."""
    return max(cfg.data.max_length, cfg.data.max_prompt_length + cfg.eval.max_new_tokens)


def completion_sequences(sampled: pa.Table, prompt_ids: list[list[int]]) -> tuple[list[np.ndarray], list[int]]:
    """Sampled rows as the scorer takes them: prompt + completion token sequences, and where each completion
    starts."""
    sequences, starts = [], []
    for prompt_index, completion in zip(sampled.column("prompt_index").to_pylist(),
                                        list_column(sampled.column("completion_ids")), strict=True):
        prompt = prompt_ids[prompt_index]
        sequences.append(np.concatenate([np.asarray(prompt, np.int32), completion.astype(np.int32)]))
        starts.append(len(prompt))
    return sequences, starts


def sequence_key(reference: dict[str, Any], sequences: list[np.ndarray], starts: list[int]) -> str:
    """Content key of the reference log-probs of these token sequences."""
    h = hashlib.sha256(json.dumps(reference, sort_keys=True).encode())
    for sequence, start in zip(sequences, starts, strict=True):
        h.update(np.asarray([len(sequence), start], np.int64).tobytes())
        h.update(np.asarray(sequence, np.int32).tobytes())
    return h.hexdigest()[:24]


@dataclass
class ReferenceTask:
    """One target's samples to score under the reference, and the cache entry their log-probs go to."""

    name: str  # the target's
    key: str  # <cache_dir>/eval-reference/<key>.parquet
    sequences: list[np.ndarray]  # prompt + completion
    starts: list[int]  # where each completion starts
    logps: list[np.ndarray] = field(default_factory=list)  # per-token log π_ref, scored so far (in order)


@dataclass
class ReferenceChunk:
    """One scorer call: a task's sequences [start, stop)."""

    task: ReferenceTask
    start: int
    stop: int

    def score(self, actor) -> ray.ObjectRef:
        task = self.task
        return actor.token_logps.remote(task.sequences[self.start:self.stop], task.starts[self.start:self.stop])


def reference_logps(cfg: Config, reference: dict[str, Any], sampled: dict[str, pa.Table],
                    prompt_ids: list[list[int]], progress_factory) -> dict[str, list[np.ndarray]]:
    """Per-token log π_ref of every sample of every target (`sampled`: target name -> its sampled rows), from
    the cache where `reference` (the reference's identity) and the sequences match, else scored and cached."""
    cache = Store(cfg.cache_dir).child("eval-reference")
    logps: dict[str, list[np.ndarray]] = {}
    tasks = []
    for name, table in sampled.items():
        sequences, starts = completion_sequences(table, prompt_ids)
        key = sequence_key(reference, sequences, starts)
        if cache.exists(f"{key}.parquet"):
            logps[name] = [np.asarray(v, np.float32) for v in
                           cache.read_parquet(f"{key}.parquet").column("ref_token_logps").to_pylist()]
        else:
            tasks.append(ReferenceTask(name, key, sequences, starts))
    if tasks:
        _score(cfg, tasks, cache, progress_factory)
        logps.update({task.name: task.logps for task in tasks})
    return logps


def _score(cfg: Config, tasks: list[ReferenceTask], cache: Store, progress_factory) -> None:
    """`scoring.num_actors` scorer actors fill the tasks' log-probs; each task's are written to the cache once
    complete. The actors are killed at the end, on an error or an interrupt too."""
    ref = cfg.scoring
    kwargs = scorer_kwargs(ref.engine, ref, resolve_model(cfg.model.path, cfg.model.revision).local_dir,
                           cfg.model.dtype, engine_max_length(cfg), cfg.model.trust_remote_code)
    total = sum(len(task.sequences) for task in tasks)
    actors = [ray.remote(ReferenceEngine).options(**actor_options(ref, spread(cfg))).remote(
        ref.engine, kwargs, f"{Store(cfg.run_dir).uri}/eval/reference-scorer-{i}.log")
        for i in range(min(ref.num_actors, total))]
    size = max(1, ref.batch_size * 2)  # sequences per call: a scorer batch holds 2 per pair
    chunks = [ReferenceChunk(task, start, start + size)
              for task in tasks for start in range(0, len(task.sequences), size)]
    try:
        with progress_factory(total=total, desc=f"reference log-probs ({ref.engine})", unit="sample") as bar:
            # The pool keeps every actor busy and yields results in submission order.
            results = ActorPool(actors).map(lambda actor, chunk: chunk.score(actor), chunks)
            for chunk, out in zip(chunks, results, strict=True):
                task = chunk.task
                task.logps += out
                bar.update(len(out))
                if len(task.logps) == len(task.sequences):
                    cache.write_parquet(f"{task.key}.parquet", pa.table({"ref_token_logps": pa.array(
                        task.logps, pa.list_(pa.float32()))}))
    finally:
        for actor in actors:
            ray.kill(actor)
