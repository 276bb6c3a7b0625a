"""Stage 3: evaluate checkpoints by sampling.

`run` calls the phases in this order (the numbers themselves are computed in `pipeline.evaluation`):

    prompts, select targets  `prepare`: `eval.prompts` tokenized like the cache, the reference and the checkpoints
                             of `eval.checkpoints` (an unusable one fails here), and from settings and weights the
                             keys that say which targets are already evaluated
    sample (engines)         `eval.num_actors` vLLM engines in Ray actors: completions with their log-probs under
                             each target, and its log-probs of the held-out cached pairs. An engine that finishes a
                             target takes the next of its architecture (`engine_signature`), weights swapped in place
    reference log-probs      every sample under the reference, by the stage-1 scorer (cached by content)
    rewards, finish          per target: `eval.reward` of every sample, per-sample Parquet, statistics
    summary, report          summary rows with win rates across targets; the report with plots

Layout under `<run_dir>/eval/` (reference log-probs: `<cache_dir>/eval-reference/<key>.parquet`):

    <name>/identity.json                   the weights' hash, reused while their files' (size, mtime) match
    <name>/sampled.parquet, sampled.json   after sampling: the resume point (sampled.json, written last, holds
                                           the sampling key)
    <name>/samples.parquet, result.json    final per-sample rows and summary; result.json (written last) holds
                                           the target's key
    chosen_rewards.json                    the chosen responses' rewards (`eval.win_rate_baseline: chosen`)
    summary.csv, summary.json, report.md, *.png
                                           every target evaluated with the current settings

Incremental: a target whose result.json holds the same key (same weights, prompts, sampling, reward and
reference) is not evaluated again, and the report covers every target evaluated with these settings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline.config import Config, to_yaml
from pipeline.data.models import load_tokenizer, read_chat_template, resolve_model, resolve_tokenizer
from pipeline.engines.actors import CheckpointEngine, RewardEngine, read_engine_signature, sample_seed
from pipeline.engines.scorers import actor_options, scorer_kwargs
from pipeline.errors import UserError, error_line
from pipeline.evaluation import summary
from pipeline.evaluation.inputs import HeldOutPairs, Prompts, load_held_out_pairs, load_prompts
from pipeline.evaluation.reference import engine_max_length, reference_logps
from pipeline.evaluation.report import write_report
from pipeline.evaluation.rewards import build_reward, reward_identity
from pipeline.runtime import faults
from pipeline.runtime.cluster import spread
from pipeline.runtime.session import connect, progress_bar
from pipeline.store.checkpoints import list_checkpoints
from pipeline.store.fingerprint import model_files_hash, sha256_json
from pipeline.store.storage import Store, local_copy


@dataclass
class Target:
    """One model to evaluate: the reference or a checkpoint."""

    name: str
    path: str
    step: int | None
    is_reference: bool = False
    error: str | None = None  # found unusable before any engine started


@dataclass
class EvalResult:
    """What `run` did: targets evaluated now, kept and failed ({name, path, error}), and the report's rows."""

    eval_dir: str
    evaluated: list[str]
    reused: list[str]
    failures: list[dict[str, str]]
    report: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    prompts: int = 0
    prompt_rejects: int = 0  # unusable prompt rows, listed with their reason in <eval_dir>/prompt_rejects.jsonl
    engine_starts: int = 0  # sampling engines started (targets of one architecture share one)


def run(cfg: Config, progress_factory=None) -> EvalResult:
    """Evaluate the selected targets not yet evaluated with these settings; rewrite the report over all."""
    progress_factory = progress_factory or progress_bar
    plan = prepare(cfg)  # select targets -> prompts -> which targets are left
    _connect(cfg, plan)
    sampling = _sample(cfg, plan, progress_factory)
    sampled = [job for job in plan.jobs if job.sampled is not None]  # a target that failed sampling is not
    chosen = _score_and_finish(cfg, plan, sampled, progress_factory)  # reference log-probs -> rewards -> finish
    return _report(cfg, plan, sampled, sampling, chosen)


# ---------------------------------------------------------------- select targets


def select_targets(cfg: Config) -> list[Target]:
    """`eval.checkpoints` (+ the reference) -> targets with unique names. Unusable paths become failed targets."""
    selection = cfg.eval.checkpoints
    targets: list[Target] = []
    if cfg.eval.include_reference_model:
        targets.append(Target("reference", resolve_model(cfg.model.path, cfg.model.revision).local_dir, 0, True))
    if isinstance(selection, str):
        entries = [(Path(p).name, p) for p in _run_checkpoints(cfg, selection)]
    elif isinstance(selection, dict):
        entries = [(name, _target_path(p)) for name, p in selection.items()]
        bad = next((n for n in selection if not n or "/" in n or n in (".", "..")), None)
        if bad is not None:
            raise UserError(f"eval.checkpoints name {bad!r} cannot name a results directory; use a plain name "
                            f"such as beta0.1-step40")
    else:
        entries = [(Path(p).name, _target_path(p)) for p in selection]
    names = {t.name for t in targets}
    for name, path in entries:
        if name in names:  # same directory name from elsewhere: disambiguate by the path
            name = f"{name}-{hashlib.sha256(path.encode()).hexdigest()[:8]}"
        names.add(name)
        targets.append(Target(name, path, _step_of(Path(path).name), error=_checkpoint_problem(path)))
    return targets


def _run_checkpoints(cfg: Config, selection: str) -> list[str]:
    """The run's checkpoints (local paths or URIs, like run_dir) that `all`, `last` or `every:K` selects."""
    found = list_checkpoints(Store(cfg.run_dir))
    if not found:
        raise UserError(f"no checkpoints in {Store(cfg.run_dir).uri}/checkpoints for eval.checkpoints={selection}; "
                        f"train first (`dpo-pipeline train CONFIG`) or list checkpoint directories in "
                        f"eval.checkpoints")
    if selection == "last":
        return found[-1:]
    if selection.startswith("every:"):
        k = int(selection.removeprefix("every:"))
        return found[k - 1::k] + ([found[-1]] if len(found) % k else [])
    return found


def _step_of(name: str) -> int | None:
    match = re.fullmatch(r"step_(\d+)", name)
    return int(match.group(1)) if match else None


def _target_path(path: str) -> str:
    """A checkpoint location as recorded: a URI as given, a local path made absolute."""
    return path.rstrip("/") if "://" in path else str(Path(path).resolve())


def _checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint directory (local or URI) cannot be evaluated, or None."""
    store = Store(path)
    if not store.exists(""):
        return f"{path} does not exist"
    if not store.exists("config.json"):
        return f"{path} has no config.json: not a Hugging Face model directory"
    return None


# ---------------------------------------------------------------- prompts, keys: the plan


@dataclass
class TargetJob:
    """A target left to evaluate: where its results go, its keys, and its samples once sampled."""

    target: Target
    store: Store  # <eval_dir>/<name>
    sample_key: str  # weights + sampling settings: the key of sampled.json
    key: str  # sample_key + scoring settings: the key of result.json
    sampled: pa.Table | None = None  # sampled.parquet
    sampled_meta: dict[str, Any] = field(default_factory=dict)  # sampled.json


@dataclass
class EvalPlan:
    """What `run` will do, resolved on the driver: targets to evaluate (`jobs`), kept ones, failed ones."""

    eval_store: Store
    tok: Any
    prompts: Prompts
    held_out: HeldOutPairs | None
    reference: dict[str, Any]
    scoring: dict[str, Any]
    settings_key: str
    targets: list[Target]
    failures: dict[str, str]
    jobs: list[TargetJob]
    reused: list[str]

    @property
    def to_sample(self) -> list[TargetJob]:
        return [j for j in self.jobs if j.sampled is None]


def prepare(cfg: Config) -> EvalPlan:
    """Resolve prompts, settings and targets; find which targets are already evaluated with these settings."""
    eval_store = Store(cfg.run_dir).child("eval")
    eval_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    tok_path = cfg.tokenizer.path or cfg.model.path
    tok = load_tokenizer(resolve_tokenizer(tok_path, cfg.model.revision if cfg.tokenizer.path is None else None)
                         .local_dir, read_chat_template(cfg.tokenizer.chat_template))
    prompts = load_prompts(cfg, tok, eval_store)
    held_out = load_held_out_pairs(cfg)
    eval_cfg = cfg.eval
    reference = {"model": resolve_model(cfg.model.path, cfg.model.revision).identity, "dtype": cfg.model.dtype}
    sampling = {"samples_per_prompt": eval_cfg.samples_per_prompt, "max_new_tokens": eval_cfg.max_new_tokens,
                "temperature": eval_cfg.temperature, "top_p": eval_cfg.top_p, "seed": eval_cfg.seed,
                "prompts": prompts.sha256,
                "eos": tok.eos_token_id, "dtype": cfg.model.dtype,
                "preference_cache": held_out.cache_key if held_out else None}
    scoring = {"reference": reference, "reward": reward_identity(eval_cfg.reward) if eval_cfg.reward else None,
               "beta": cfg.train.loss.beta}
    settings_key = sha256_json({"sampling": sampling, "scoring": scoring})

    targets = select_targets(cfg)
    jobs, reused = [], []
    for target in targets:
        if target.error:
            continue
        job = _job(target, eval_store.child(target.name), sampling, scoring)
        if job is None:
            reused.append(target.name)
        else:
            jobs.append(job)
    return EvalPlan(eval_store, tok, prompts, held_out, reference, scoring, settings_key, targets,
                    {t.name: t.error for t in targets if t.error}, jobs, reused)


def _job(target: Target, store: Store, sampling: dict[str, Any], scoring: dict[str, Any]) -> TargetJob | None:
    """The target's job, with its saved samples when their key matches; None when its result is current."""
    sample_key = sha256_json({"sampling": sampling, "weights": _weights_hash(target, store)})
    key = sha256_json({"sample_key": sample_key, "scoring": scoring})
    if store.exists("result.json") and store.read_json("result.json")["key"] == key:
        return None
    job = TargetJob(target, store, sample_key, key)
    if store.exists("sampled.json") and store.read_json("sampled.json")["sample_key"] == sample_key:
        job.sampled, job.sampled_meta = store.read_parquet("sampled.parquet"), store.read_json("sampled.json")
    return job


def _weights_hash(target: Target, store: Store) -> str:
    """Content hash of a target's weights. Hashing a large model takes a while: the hash is recorded with the
    files' (size, mtime) and reused while they match."""
    stamp = sha256_json(Store(target.path).stamp())  # local or URI: the files' (path, size, mtime)
    if store.exists("identity.json"):
        record = store.read_json("identity.json")
        if record.get("stamp") == stamp:
            return record["sha256"]
    digest = model_files_hash(local_copy(target.path))  # a checkpoint at a URI is downloaded once to hash it
    store.write_json("identity.json", {"path": target.path, "stamp": stamp, "sha256": digest})
    return digest


def _connect(cfg: Config, plan: EvalPlan) -> None:
    """Join Ray when anything is left to run (vLLM must be there to sample)."""
    if plan.to_sample and importlib.util.find_spec("vllm") is None:
        raise UserError("evaluation samples with vLLM, which is not installed; install the `cpu` or `gpu` extra "
                        "(see README)")
    if plan.jobs or (cfg.eval.reward is not None and cfg.eval.win_rate_baseline == "chosen"):
        connect(cfg)


# ---------------------------------------------------------------- sample (engines)


def _sample(cfg: Config, plan: EvalPlan, progress_factory) -> SamplingScheduler:
    """Sample the targets without saved samples; the scheduler holds the failures and the engine starts."""
    scheduler = SamplingScheduler(cfg, plan.prompts, plan.held_out, plan.tok.eos_token_id)
    jobs = plan.to_sample
    if jobs:
        total = len(jobs) * len(plan.prompts.ids) * cfg.eval.samples_per_prompt
        with progress_factory(total=total, desc="sampling (vLLM)", unit="sample") as bar:
            scheduler.run(jobs, bar)
    return scheduler


@dataclass
class EngineSlot:
    """One running engine actor and the target it serves now, with that target's progress."""

    actor: Any  # a CheckpointEngine actor
    log: str  # the engine's log, under the first target it served
    job: TargetJob
    next_prompt: int = 0  # the first prompt not yet submitted
    parts: list[pa.Table] = field(default_factory=list)  # sampled chunks, as they came
    sampling_seconds: float = 0.0
    preference: tuple[np.ndarray, np.ndarray] | None = None  # the target's log-probs of held-out (chosen, rejected)
    started: float = field(default_factory=time.perf_counter)

    @property
    def samples(self) -> int:
        return sum(len(part) for part in self.parts)


class SamplingScheduler:
    """`eval.num_actors` engine actors at once; chunked calls (`eval.batch_prompts` prompts) feed the progress
    bar. An actor that finishes a target takes the next queued target of the same architecture
    (`engine_signature`) and swaps its weights in place, so a run's checkpoints cost one engine start, not one
    each. A target whose call fails fails alone (its engine goes with it); on any error or interrupt every engine
    is killed, the samples of finished targets stay saved."""

    def __init__(self, cfg: Config, prompts: Prompts, held_out: HeldOutPairs | None, eos: int | None):
        eval_cfg = cfg.eval
        self.cfg, self.prompts, self.held_out = cfg, prompts, held_out
        self.seeds = [sample_seed(eval_cfg.seed, i) for i in range(len(prompts.ids))]
        self.params = dict(n=eval_cfg.samples_per_prompt, temperature=eval_cfg.temperature, top_p=eval_cfg.top_p,
                           max_tokens=eval_cfg.max_new_tokens, stop_token_ids=[eos] if eos is not None else None)
        self.failures: dict[str, str] = {}  # target name -> error line
        self.engine_starts = 0
        self.queue: list[TargetJob] = []  # targets waiting for an engine
        self.slots: list[EngineSlot] = []  # engines running now
        self.in_flight: dict[ray.ObjectRef, EngineSlot] = {}  # one call per slot
        self.signatures: dict[str, str | None] = {}  # target name -> engine_signature
        self.pairs_ref = None  # the held-out pairs in the object store
        self.progress = None

    def run(self, jobs: list[TargetJob], progress) -> None:
        self.queue, self.progress = list(jobs), progress
        self.signatures = {job.target.name: read_engine_signature(job.target.path) for job in jobs}
        self.pairs_ref = ray.put(self.held_out.inputs) if self.held_out is not None else None
        engine_cls = ray.remote(CheckpointEngine)
        try:
            while self.queue or self.in_flight:
                while self.queue and len(self.slots) < self.cfg.eval.num_actors:
                    self._start_engine(engine_cls, self.queue.pop(0))
                done, _ = ray.wait(list(self.in_flight), num_returns=1)
                self._receive(done[0])
        finally:  # on an error or an interrupt too: the engines go (finished targets' samples are saved)
            for slot in self.slots:
                ray.kill(slot.actor)

    def _start_engine(self, engine_cls, job: TargetJob) -> None:
        eval_cfg = self.cfg.eval
        kwargs = scorer_kwargs("vllm", eval_cfg, job.target.path, self.cfg.model.dtype, engine_max_length(self.cfg))
        kwargs["seed"] = eval_cfg.seed
        log = f"{job.store.uri}/engine.log"
        actor = engine_cls.options(**actor_options(eval_cfg, spread(self.cfg))).remote(kwargs, log)
        self.engine_starts += 1
        self._serve(EngineSlot(actor, log, job))

    def _serve(self, slot: EngineSlot) -> None:
        self.slots.append(slot)
        self._submit(slot)

    def _submit(self, slot: EngineSlot) -> bool:
        """The slot's next call: a chunk of prompts, then the held-out pairs (not for the reference, whose
        log-probs of them are the cache's). False when the target is done."""
        n, target = len(self.prompts.ids), slot.job.target
        if slot.next_prompt < n:
            lo, hi = slot.next_prompt, min(slot.next_prompt + self.cfg.eval.batch_prompts, n)
            call = slot.actor.sample.remote(self.prompts.ids[lo:hi], self.seeds[lo:hi], self.params, lo, target.path)
            slot.next_prompt = hi
        elif self.pairs_ref is not None and not target.is_reference and slot.preference is None:
            call = slot.actor.score_pairs.remote(self.pairs_ref, target.path)
        else:
            return False
        self.in_flight[call] = slot
        return True

    def _receive(self, call: ray.ObjectRef) -> None:
        slot = self.in_flight.pop(call)
        try:
            out = ray.get(call)
        except Exception as exc:  # this target alone fails (its engine goes with it); the others go on
            self._fail(slot, exc)
            return
        if isinstance(out, dict):  # a chunk of samples
            slot.parts.append(out["table"])
            slot.sampling_seconds += out["seconds"]
            self.progress.update(len(out["table"]))
        else:  # the held-out pairs' log-probs
            slot.preference = out
        if not self._submit(slot):
            self._save(slot)
            self._hand_over(slot)
            faults.reach("eval_target_sampled")

    def _fail(self, slot: EngineSlot, exc: Exception) -> None:
        self.failures[slot.job.target.name] = f"{error_line(exc)} (engine log: {slot.log})"
        total = self.cfg.eval.samples_per_prompt * len(self.prompts.ids)
        self.progress.update(total - slot.samples)  # the bar still ends at 100%
        self.slots.remove(slot)
        ray.kill(slot.actor)

    def _hand_over(self, slot: EngineSlot) -> None:
        """The finished slot's engine takes the next queued target of its architecture, or goes (freeing it
        before the next target starts)."""
        self.slots.remove(slot)
        signature = self.signatures[slot.job.target.name]
        following = next((job for job in self.queue
                          if signature is not None and self.signatures[job.target.name] == signature), None)
        if following is None:
            ray.kill(slot.actor)
        else:
            self.queue.remove(following)
            self._serve(EngineSlot(slot.actor, slot.log, following))

    def _save(self, slot: EngineSlot) -> None:
        """sampled.parquet, then sampled.json (the target's resume point)."""
        job = slot.job
        table = pa.concat_tables(slot.parts).sort_by([("prompt_index", "ascending"), ("sample_index", "ascending")])
        tokens = int(pc.sum(pc.list_value_length(table.column("completion_ids"))).as_py() or 0)
        meta = {"sample_key": job.sample_key, "sampling_s": slot.sampling_seconds, "tokens": tokens,
                "wall_s": time.perf_counter() - slot.started}
        if slot.preference is not None:
            meta["policy_chosen_logps"], meta["policy_rejected_logps"] = (v.tolist() for v in slot.preference)
        job.store.write_parquet("sampled.parquet", table)
        job.store.write_json("sampled.json", meta)
        job.sampled, job.sampled_meta = table, meta


# ---------------------------------------------------------------- reference log-probs -> rewards -> finish


def _score_and_finish(cfg: Config, plan: EvalPlan, jobs: list[TargetJob], progress_factory) -> np.ndarray | None:
    """Reference log-probs of every sample, then per target its rewards and results. Returns the chosen
    responses' rewards when they are the win-rate baseline (`eval.win_rate_baseline: chosen`), else None."""
    reward, close = _reward_fn(cfg)
    try:
        sampled = {job.target.name: job.sampled for job in jobs}
        ref_logps = reference_logps(cfg, plan.reference, sampled, plan.prompts.ids, progress_factory) if jobs else {}
        for job in jobs:
            completions = plan.tok.batch_decode(job.sampled.column("completion_ids").to_pylist(),
                                                skip_special_tokens=True)
            rewards = _rewards(plan, job, completions, reward)
            _finish(cfg, plan, job, completions, ref_logps[job.target.name], rewards)
            faults.reach("eval_target_finished")
        if reward is not None and cfg.eval.win_rate_baseline == "chosen":
            return summary.chosen_rewards(plan.eval_store, plan.prompts, plan.tok, reward, plan.scoring["reward"])
        return None
    finally:
        close()


def _reward_fn(cfg: Config):
    """(reward(prompts, completions) or None, close). Rules and callables run here; a reward model runs in a Ray
    actor (on a GPU with `reward.use_gpu`), which close() kills."""
    r = cfg.eval.reward
    if r is None:
        return None, lambda: None
    if r.type != "model":
        return build_reward(r), lambda: None

    actor = ray.remote(RewardEngine).options(num_cpus=1, num_gpus=1 if r.use_gpu else 0).remote(
        r, "cuda" if r.use_gpu else "cpu")
    error = ray.get(actor.ready.remote())
    if error:
        ray.kill(actor)
        raise UserError(error)
    return (lambda p, c: ray.get(actor.score.remote(p, c))), lambda: ray.kill(actor)


def _rewards(plan: EvalPlan, job: TargetJob, completions: list[str], reward) -> np.ndarray | None:
    if reward is None:
        return None
    texts = [plan.prompts.texts[i] for i in job.sampled.column("prompt_index").to_pylist()]
    return np.asarray(reward(texts, completions), np.float64)


def _finish(cfg: Config, plan: EvalPlan, job: TargetJob, completions: list[str], ref_logps: list[np.ndarray],
            rewards: np.ndarray | None) -> None:
    """One target's results: samples.parquet, then result.json (its commit point)."""
    samples = summary.samples_table(job.sampled, plan.prompts.texts, completions, ref_logps, rewards)
    job.store.write_parquet("samples.parquet", samples)
    preference = None
    if plan.held_out is not None and "policy_chosen_logps" in job.sampled_meta:
        preference = summary.preference_metrics(job.sampled_meta["policy_chosen_logps"],
                                                job.sampled_meta["policy_rejected_logps"], plan.held_out.ref_chosen,
                                                plan.held_out.ref_rejected, cfg.train.loss.beta)
    stats = summary.target_stats(samples, len(plan.prompts.ids), rewards, job.sampled_meta, preference)
    target = job.target
    job.store.write_json("result.json", {"key": job.key, "settings_key": plan.settings_key, "name": target.name,
                                         "path": target.path, "step": target.step,
                                         "is_reference": target.is_reference, "stats": stats})


# ---------------------------------------------------------------- summary and report


def _report(cfg: Config, plan: EvalPlan, evaluated: list[TargetJob], sampling: SamplingScheduler,
            chosen: np.ndarray | None) -> EvalResult:
    """Summary rows of every target evaluated with these settings, and the report over them and the failures."""
    rows = summary.summary_rows(plan.eval_store, plan.settings_key, cfg.eval.win_rate_baseline, chosen)
    paths = {t.name: t.path for t in plan.targets}
    failures = {**plan.failures, **sampling.failures}
    failed = [{"name": name, "path": paths[name], "error": message} for name, message in failures.items()]
    report = write_report(plan.eval_store, rows, failed, summary.report_settings(cfg, len(plan.prompts.ids)))
    return EvalResult(plan.eval_store.uri, [j.target.name for j in evaluated], reused=plan.reused, failures=failed,
                      report=str(report.report), rows=rows, prompts=len(plan.prompts.ids),
                      prompt_rejects=plan.prompts.rejected, engine_starts=sampling.engine_starts)
