"""Stage 3's sampling: the scheduler that keeps `eval.num_actors` vLLM engines busy over the targets' jobs
(`targets.py`).

The engines read their chunk of the prompt files and write its samples (`<target>/sampled-parts/<key>/`); the
driver hands out chunks and adds up counts. A target whose chunks are all written is merged into
`sampled.parquet` by a Ray task, then `sampled.json` (its resume point) is written. A crash loses only the
chunks in flight: a rerun samples the missing chunks of an unfinished target.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray

from pipeline import faults
from pipeline.config import EvalConfig
from pipeline.engines.actors import CheckpointEngine, read_engine_signature, stop_engines
from pipeline.engines.chunks import PromptChunk, concat_files
from pipeline.engines.lora import LoraEngine
from pipeline.engines.scorers import actor_options, scorer_kwargs
from pipeline.errors import error_line
from pipeline.evaluation.inputs import HeldOutPairs, Prompts
from pipeline.evaluation.reference import EngineBase
from pipeline.evaluation.targets import Target, TargetJob
from pipeline.store.fingerprint import sha256_json


@dataclass
class EngineSlot:
    """One running engine actor and the target it serves now."""

    actor: Any  # a CheckpointEngine actor
    log: str  # the engine's log, under the first target it served
    job: TargetJob


# A new engine starts to help with a target only while this many of its chunks are left unassigned (an engine
# start costs about what sampling a few chunks does); a running engine helps with any left.
HELP_CHUNKS = 2


@dataclass
class JobProgress:
    """What is left of a target being sampled, shared by the engines serving it."""

    todo: list[PromptChunk]  # chunks not yet handed to an engine
    held_out_asked: bool = False
    failed: bool = False
    started: float = field(default_factory=time.perf_counter)


def merge_sampled(parts_uri: str, firsts: list[int], target_uri: str, held_out: bool) -> int:
    """Ray task: a target's sampled chunks into `sampled.parquet` (a row group per chunk, in prompt order), and
    its held-out log-probs beside. Returns the rows."""
    rows = concat_files([f"{parts_uri}/{first:09d}.parquet" for first in sorted(firsts)],
                        f"{target_uri}/sampled.parquet")
    if held_out:
        concat_files([f"{parts_uri}/held_out.parquet"], f"{target_uri}/held_out.parquet")
    return rows


class SamplingScheduler:
    """`eval.num_actors` engine actors at once; chunked calls (a prompt file of up to `eval.batch_prompts`
    prompts each) feed the progress bar. An actor that finishes a target takes the next queued target of the same
    architecture (`engine_signature`) and swaps its weights in place, so a run's checkpoints cost one engine
    start, not one each. With fewer targets than actors, the idle ones take chunks of a target being sampled (its
    chunks go to whichever engine asks next; per-prompt seeds make the samples those of one engine). A target
    whose call fails fails alone (its engine goes with it); on any error or interrupt every engine is killed, the
    chunks written so far stay.

    LoRA adapters (and the reference, when there are adapters to sample) are served by engines of the reference
    model with LoRA on (`LoraEngine`, sized for all of them): an adapter is a `LoRARequest` on the requests, so
    a run's adapters cost one engine start and no weight load."""

    def __init__(self, eval_cfg: EvalConfig, base: EngineBase, prompts: Prompts, held_out: HeldOutPairs | None,
                 eos: int | None):
        self.eval_cfg, self.base, self.prompts, self.held_out = eval_cfg, base, prompts, held_out
        self.params = dict(n=eval_cfg.samples_per_prompt, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
                           max_tokens=eval_cfg.max_new_tokens, stop_token_ids=[eos] if eos is not None else None)
        self.failures: dict[str, str] = {}  # target name -> error line
        self.engine_starts = 0
        self.queue: list[TargetJob] = []  # targets waiting for an engine
        self.slots: list[EngineSlot] = []  # engines running now
        self.in_flight: dict[ray.ObjectRef, EngineSlot] = {}  # one call per slot
        self.signatures: dict[str, str | None] = {}  # target name -> engine_signature
        self.lora: LoraEngine | None = None  # the LoRA engine the adapters to sample need
        self.progress = None
        self.chunks: list[PromptChunk] = []  # what each target samples
        self.jobs: dict[str, JobProgress] = {}  # target name -> what is left of it, once an engine serves it

    def run(self, jobs: list[TargetJob], progress, chunks: list[PromptChunk] | None = None) -> None:
        """Sample every job's prompt chunks (default: all the prompts)."""
        self.queue, self.progress = list(jobs), progress
        self.chunks = self.prompts.chunks() if chunks is None else chunks
        self.lora = LoraEngine.serving([job.target.adapter for job in jobs if job.target.adapter is not None])
        self.signatures = {job.target.name: self._signature(job.target) for job in jobs}
        engine_cls = ray.remote(CheckpointEngine)
        try:
            while self.queue or self.in_flight:
                while self.queue and len(self.slots) < self.eval_cfg.num_actors:
                    self._start_engine(engine_cls, self.queue.pop(0))
                while len(self.slots) < self.eval_cfg.num_actors and (helped := self._unfinished()) is not None:
                    self._start_engine(engine_cls, helped)
                if self.in_flight:
                    done, _ = ray.wait(list(self.in_flight), num_returns=1)
                    self._receive(done[0])
        except BaseException:  # an error or an interrupt: the engines go at once (written chunks stay)
            stop_engines([slot.actor for slot in self.slots], timeout_s=0)
            raise
        stop_engines([slot.actor for slot in self.slots])  # none: a finished target's engine went at hand-over

    def _on_lora_engine(self, target: Target) -> bool:
        """Served by a LoRA engine of the reference model: an adapter, or the reference beside adapters."""
        return self.lora is not None and (target.adapter is not None or target.is_reference)

    def _signature(self, target: Target) -> str | None:
        """Targets with equal signatures share engines: a LoRA engine's, or their `engine_signature`."""
        if self._on_lora_engine(target):
            return sha256_json({"lora": self.lora.rank, "modules": self.lora.modules})
        return read_engine_signature(target.path, self.eval_cfg.use_gpu)

    def _start_engine(self, engine_cls, job: TargetJob) -> None:
        eval_cfg = self.eval_cfg
        lora = self.lora if self._on_lora_engine(job.target) else None
        model_dir = self.base.model_dir() if lora else job.target.path
        kwargs = scorer_kwargs("vllm", eval_cfg, model_dir, self.base.model.dtype, self.base.max_length)
        kwargs["seed"] = eval_cfg.seed
        helpers = sum(s.job is job for s in self.slots)  # engines already on this target: this one helps
        log = f"{job.store.uri}/engine{f'-{helpers + 1}' if helpers else ''}.log"
        actor = engine_cls.options(**actor_options(eval_cfg, self.base.spread)).remote(kwargs, log, lora)
        self.engine_starts += 1
        self._serve(EngineSlot(actor, log, job))

    def _serve(self, slot: EngineSlot) -> None:
        """The slot starts on its target (the first engine on it: chunks written by an earlier run count as done;
        a helper: it shares what is left)."""
        job = slot.job
        if job.target.name not in self.jobs:
            self.jobs[job.target.name] = JobProgress([c for c in self.chunks if c.first not in job.parts])
            self.progress.update(sum(p["rows"] for p in job.parts.values()))
        self.slots.append(slot)
        if not self._submit(slot):
            self._done_with(slot)

    def _unfinished(self) -> TargetJob | None:
        """A target being sampled with at least `HELP_CHUNKS` chunks no engine has yet: worth a new engine."""
        return next((s.job for s in self.slots if len(self.jobs[s.job.target.name].todo) >= HELP_CHUNKS
                     and not self.jobs[s.job.target.name].failed), None)

    def _submit(self, slot: EngineSlot) -> bool:
        """The slot's next call: a chunk of its target's prompts, then the held-out pairs (not for the reference,
        whose log-probs of them are the cache's). False when nothing of the target is left to hand out."""
        job, left = slot.job, self.jobs[slot.job.target.name]
        if left.todo and not left.failed:
            chunk = left.todo.pop(0)
            call = slot.actor.sample_chunk.remote(chunk, self.eval_cfg.seed, self.params,
                                                  f"{job.parts_dir.uri}/{chunk.first:09d}.parquet", job.target.path)
            self.in_flight[call] = slot
            return True
        if self.held_out is not None and not job.target.is_reference and not left.held_out_asked \
                and not left.failed and not job.parts_dir.exists("held_out.parquet"):
            call = slot.actor.score_held_out.remote(self.held_out.files, f"{job.parts_dir.uri}/held_out.parquet",
                                                    job.target.path)
            left.held_out_asked = True
            self.in_flight[call] = slot
            return True
        return False

    def _receive(self, call: ray.ObjectRef) -> None:
        slot = self.in_flight.pop(call)
        try:
            out = ray.get(call)
        except Exception as exc:  # this target alone fails (its engine goes with it); the others go on
            self._fail(slot, exc)
            return
        if isinstance(out, dict) and not self.jobs[slot.job.target.name].failed:  # a chunk's counts (samples: file)
            slot.job.parts[out["first"]] = out
            self.progress.update(out["rows"])
            faults.reach("eval_chunk_sampled")
        if not self._submit(slot):
            self._done_with(slot)

    def _done_with(self, slot: EngineSlot) -> None:
        """Nothing of its target is left for this slot: the last of the target's engines saves it; then the engine
        takes other work or goes."""
        job = slot.job
        if not self.jobs[job.target.name].failed and not any(s.job is job for s in self.in_flight.values()):
            self._save(job)
            faults.reach("eval_target_sampled")
        self._hand_over(slot)

    def _fail(self, slot: EngineSlot, exc: Exception) -> None:
        left = self.jobs[slot.job.target.name]
        if not left.failed:  # (its other engines' calls, still running, are not counted)
            self.failures[slot.job.target.name] = f"{error_line(exc)} (engine log: {slot.log})"
            total = self.eval_cfg.samples_per_prompt * sum(c.stop - c.start for c in self.chunks)
            self.progress.update(total - sum(p["rows"] for p in slot.job.parts.values()))  # the bar ends at 100%
            left.failed = True
        self.slots.remove(slot)
        stop_engines([slot.actor])

    def _hand_over(self, slot: EngineSlot) -> None:
        """The slot's engine takes the next queued target of its architecture, else helps with one being sampled,
        or goes (freeing it before the next target starts)."""
        self.slots.remove(slot)
        signature = self.signatures[slot.job.target.name]
        same = [job for job in self.queue if signature is not None and self.signatures[job.target.name] == signature]
        if same:
            self.queue.remove(same[0])
            return self._serve(EngineSlot(slot.actor, slot.log, same[0]))
        helped = next((s.job for s in self.slots if self.jobs[s.job.target.name].todo and signature is not None
                       and not self.jobs[s.job.target.name].failed
                       and self.signatures[s.job.target.name] == signature), None)
        if helped is not None and not self.queue:  # a queued target needs this engine's place more
            return self._serve(EngineSlot(slot.actor, slot.log, helped))
        stop_engines([slot.actor])

    def _save(self, job: TargetJob) -> None:
        """sampled.parquet (merged from the chunks by a Ray task), then sampled.json (the target's resume
        point); then the chunks go."""
        held_out = job.parts_dir.exists("held_out.parquet")
        ray.get(ray.remote(merge_sampled).options(num_cpus=0).remote(job.parts_dir.uri, list(job.parts),
                                                                     job.store.uri, held_out))
        seconds = sum(p["seconds"] for p in job.parts.values())
        meta = {"sample_key": job.sample_key, "sampling_s": seconds,
                "tokens": sum(p["tokens"] for p in job.parts.values()),
                "wall_s": time.perf_counter() - self.jobs[job.target.name].started, "held_out": held_out}
        job.store.write_json("sampled.json", meta)
        job.store.delete("sampled-parts")
        job.sampled, job.sampled_meta = True, meta
