"""Stage 3: evaluate checkpoints by sampling.

`run` calls the phases in this order (the numbers themselves are computed in `pipeline.evaluation`):

    prompts, select targets  `prepare`: `eval.prompts` tokenized like the cache by Ray tasks into prompt files,
                             the reference and the checkpoints of `eval.checkpoints` (an unusable one fails here),
                             and from settings and weights the keys that say which targets are already evaluated
    sample (engines)         `eval.num_actors` vLLM engines in Ray actors: each reads a chunk of prompts (a prompt
                             file) and writes its completions with their log-probs, and its log-probs of the
                             held-out cached pairs. An engine that finishes a target takes the next of its
                             architecture (`engine_signature`), weights swapped in place; LoRA adapters share
                             an engine of the reference model with LoRA on, a `LoRARequest` each
    reference log-probs      every chunk of samples under the reference, by the stage-1 scorer (cached by content)
    rewards, finish          per chunk, in Ray tasks (or the reward model's actor): `eval.reward`, the per-sample
                             rows and their statistics; per target, merged rows and result.json
    summary, report          win rates from the sample files (Ray tasks); summary rows; the report with plots

The driver plans and counts: it passes file URIs and row ranges and gets back counts, content keys and
per-chunk statistics (`summary.ChunkStats`), never the prompts' or samples' rows.

Layout under `<run_dir>/eval/` (reference log-probs: `<cache_dir>/eval-reference/<key>.parquet`, one per chunk):

    prompts/*.parquet, manifest.json       the tokenized prompts (files of up to `eval.batch_prompts` prompts);
                                           reused while the manifest's key (source, tokenizer, settings) matches
    <name>/identity.json                   the weights' hash, reused while their files' (size, mtime) match
    <name>/sampled-parts/<key>/*.parquet   chunks sampled so far: a crash loses only the chunks in flight
    <name>/sampled.parquet, sampled.json   after sampling (a row group per chunk): the resume point (sampled.json,
                                           written last, holds the sampling key); held_out.parquet: the
                                           target's log-probs of the held-out pairs
    <name>/samples.parquet, result.json    final per-sample rows and summary; result.json (written last) holds
                                           the target's key; win_rate.json: its win rate against the baseline
    chosen_rewards.json                    the chosen responses' rewards (`eval.win_rate_baseline: chosen`)
    summary.csv, summary.json, report.md, *.png
                                           every target evaluated with the current settings

Incremental: a target whose result.json holds the same key (same weights, prompts, sampling, reward and
reference) is not evaluated again, and the report covers every target evaluated with these settings.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from pipeline import faults
from pipeline.caches.layout import CacheSpec, find_cache
from pipeline.config import Config, to_yaml
from pipeline.data.models import load_tokenizer, read_chat_template, resolve_model, resolve_tokenizer
from pipeline.engines.actors import RewardRunner
from pipeline.engines.chunks import concat_files, sampled_chunks
from pipeline.engines.rewards import reward_identity
from pipeline.errors import UserError
from pipeline.evaluation import summary
from pipeline.evaluation.inputs import HeldOutPairs, Prompts, PromptSource, held_out_pairs, load_prompts
from pipeline.evaluation.reference import EngineBase, reference_logps
from pipeline.evaluation.report import write_report
from pipeline.evaluation.sampling import SamplingScheduler
from pipeline.evaluation.targets import Target, TargetJob, check_adapters, checkpoint_target, target_job
from pipeline.runtime.console import progress_bar
from pipeline.runtime.session import connect
from pipeline.runtime.trackers import log_evaluation
from pipeline.store.checkpoints import list_checkpoints
from pipeline.store.fingerprint import sha256_json
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store

SAMPLES_LAYOUT = 2  # sampled.parquet in row groups (one per chunk), held-out log-probs in held_out.parquet


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
    sampled = [job for job in plan.jobs if job.sampled]  # a target that failed sampling is not
    chosen_key = _score_and_finish(cfg, plan, sampled, progress_factory)  # reference log-probs -> rewards -> finish
    return _report(cfg, plan, sampled, sampling, chosen_key)


# ---------------------------------------------------------------- select targets


def select_targets(cfg: Config) -> list[Target]:
    """`eval.checkpoints` (+ the reference) -> targets with unique names. Unusable paths become failed targets;
    a LoRA adapter that is not one of the reference model's, or that vLLM cannot serve, is a user error."""
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
        targets.append(checkpoint_target(name, path))
    check_adapters(cfg.model, [t for t in targets if t.adapter is not None])
    return targets


def _run_checkpoints(cfg: Config, selection: str) -> list[str]:
    """The run's checkpoints (local paths or URIs, like run_dir) that `all`, `last` or `every:K` selects."""
    run_store = RunLayout.of(cfg).run
    found = list_checkpoints(run_store)
    if not found:
        raise UserError(f"no checkpoints in {run_store.uri}/checkpoints for eval.checkpoints={selection}; "
                        f"train first (`dpo-pipeline train CONFIG`) or list checkpoint directories in "
                        f"eval.checkpoints")
    if selection == "last":
        return found[-1:]
    if selection.startswith("every:"):
        k = int(selection.removeprefix("every:"))
        return found[k - 1::k] + ([found[-1]] if len(found) % k else [])
    return found


def _target_path(path: str) -> str:
    """A checkpoint location as recorded: a URI as given, a local path made absolute."""
    return path.rstrip("/") if "://" in path else str(Path(path).resolve())


# ---------------------------------------------------------------- prompts, keys: the plan


@dataclass
class EvalPlan:
    """What `run` will do, resolved on the driver: targets to evaluate (`jobs`), kept ones, failed ones."""

    layout: RunLayout  # the run's places: eval_store is its `eval`
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
        return [j for j in self.jobs if not j.sampled]


def prepare(cfg: Config) -> EvalPlan:
    """Resolve prompts, settings and targets; find which targets are already evaluated with these settings.
    Targets and the held-out cache first: a user error there stops the stage before Ray starts (prompts are
    tokenized in Ray tasks)."""
    held_out = held_out_pairs(find_cache(CacheSpec.of(cfg), "eval")) \
        if cfg.eval.preference_accuracy and cfg.data.eval is not None else None
    targets = select_targets(cfg)
    layout = RunLayout.of(cfg)
    eval_store = layout.eval
    eval_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    tok_path = cfg.tokenizer.path or cfg.model.path
    resolved_tok = resolve_tokenizer(tok_path, cfg.model.revision if cfg.tokenizer.path is None else None)
    template = read_chat_template(cfg.tokenizer.chat_template)
    tok = load_tokenizer(resolved_tok.local_dir, template)
    prompts = load_prompts(PromptSource.of(cfg), tok, eval_store,
                           {"tokenizer": resolved_tok.identity, "chat_template": template},
                           functools.partial(connect, cfg.ray, cfg.run_dir, cfg.shared_paths()))
    eval_cfg = cfg.eval
    reference = {"model": resolve_model(cfg.model.path, cfg.model.revision).identity, "dtype": cfg.model.dtype}
    sampling = {"samples_per_prompt": eval_cfg.samples_per_prompt, "max_new_tokens": eval_cfg.max_new_tokens,
                "temperature": eval_cfg.temperature, "top_p": eval_cfg.top_p, "seed": eval_cfg.seed,
                "prompts": prompts.sha256, "layout": SAMPLES_LAYOUT,
                "eos": tok.eos_token_id, "dtype": cfg.model.dtype,
                "preference_cache": held_out.cache_key if held_out else None}
    scoring = {"reference": reference, "reward": reward_identity(eval_cfg.reward) if eval_cfg.reward else None,
               "beta": cfg.train.reward_beta}
    settings_key = sha256_json({"sampling": sampling, "scoring": scoring})
    jobs, reused = [], []
    for target in targets:
        if target.error:
            continue
        job = target_job(target, eval_store.child(target.name), sampling, scoring)
        if job is None:
            reused.append(target.name)
        else:
            jobs.append(job)
    return EvalPlan(layout, eval_store, tok, prompts, held_out, reference, scoring, settings_key, targets,
                    {t.name: t.error for t in targets if t.error}, jobs, reused)


def _connect(cfg: Config, plan: EvalPlan) -> None:
    """Join Ray when anything is left to run (vLLM must be there to sample). Prompts to tokenize joined it
    already; win rates to compute join it in `_report`."""
    if plan.to_sample and importlib.util.find_spec("vllm") is None:
        raise UserError("evaluation samples with vLLM, which is not installed; install the `cpu` or `gpu` extra "
                        "(see README)")
    if plan.jobs or (cfg.eval.reward is not None and cfg.eval.win_rate_baseline == "chosen"):
        connect(cfg.ray, cfg.run_dir, cfg.shared_paths())


# ---------------------------------------------------------------- sample (engines)


def _sample(cfg: Config, plan: EvalPlan, progress_factory) -> SamplingScheduler:
    """Sample the targets without saved samples; the scheduler holds the failures and the engine starts."""
    base = EngineBase.of(cfg.model, cfg.data, cfg.eval, cfg.ray)
    scheduler = SamplingScheduler(cfg.eval, base, plan.prompts, plan.held_out, plan.tok.eos_token_id)
    jobs = plan.to_sample
    if jobs:
        total = len(jobs) * plan.prompts.count * cfg.eval.samples_per_prompt
        with progress_factory(total=total, desc="sampling (vLLM)", unit="sample") as bar:
            scheduler.run(jobs, bar)
    return scheduler


# ---------------------------------------------------------------- reference log-probs -> rewards -> finish


def _score_and_finish(cfg: Config, plan: EvalPlan, jobs: list[TargetJob], progress_factory) -> str | None:
    """Reference log-probs of every chunk of samples, then per target its rewards and results, each computed
    where the chunk is read (Ray tasks, or the reward model's actor). Returns the key of the chosen responses'
    rewards when they are the win-rate baseline (`eval.win_rate_baseline: chosen`), else None."""
    reward_cfg = cfg.eval.reward
    chosen_key = None
    if reward_cfg is not None and cfg.eval.win_rate_baseline == "chosen":
        chosen_key = summary.chosen_rewards_key(plan.prompts, plan.scoring["reward"])
    if not jobs and (chosen_key is None or summary.chosen_rewards_current(plan.eval_store, chosen_key)):
        return chosen_key
    connect(cfg.ray, cfg.run_dir, cfg.shared_paths())
    chunks = {job.target.name: sampled_chunks(job.target.name, f"{job.store.uri}/sampled.parquet") for job in jobs}
    ref_uris = reference_logps(cfg.scoring, EngineBase.of(cfg.model, cfg.data, cfg.eval, cfg.ray),
                               plan.layout.eval_reference, plan.eval_store, plan.reference,
                               [c for cs in chunks.values() for c in cs], plan.prompts, progress_factory)
    runner = RewardRunner(reward_cfg)  # after the reference scorers are gone: a reward model takes their place
    try:
        tok = ray.put(plan.tok)
        calls = {job.target.name: [runner.run(summary.finish_chunk, chunk, plan.prompts.files, ref_uris[chunk], tok,
                                              _part_uri(job, chunk.group)) for chunk in chunks[job.target.name]]
                 for job in jobs}
        total = sum(len(job_calls) for job_calls in calls.values())
        with progress_factory(total=total, desc="rewards, results", unit="chunk") as bar:
            for job in jobs:
                _finish(cfg, plan, job, calls[job.target.name], bar)
                faults.reach("eval_target_finished")
        if chosen_key is not None and not summary.chosen_rewards_current(plan.eval_store, chosen_key):
            ray.get(runner.run(summary.write_chosen_rewards, plan.prompts.files, tok,
                               f"{plan.eval_store.uri}/chosen_rewards.json", chosen_key))
        return chosen_key
    finally:
        runner.close()


def _part_uri(job: TargetJob, group: int) -> str:
    """Where a chunk's per-sample rows go before the target's are merged into samples.parquet."""
    return f"{job.store.uri}/samples-parts/{group:06d}.parquet"


def _finish(cfg: Config, plan: EvalPlan, job: TargetJob, calls: list[ray.ObjectRef], bar) -> None:
    """One target's results from its chunks' statistics: samples.parquet (merged from the chunks by a Ray task),
    then result.json (its commit point)."""
    stats = summary.ChunkStats()
    for call in calls:
        stats = stats.merge(ray.get(call))
        bar.update(1)
    preference = None
    if plan.held_out is not None and job.sampled_meta.get("held_out"):
        preference = ray.remote(summary.held_out_preference).options(num_cpus=0).remote(
            f"{job.store.uri}/held_out.parquet", plan.held_out.files, cfg.train.reward_beta)
    parts = [_part_uri(job, group) for group in range(len(calls))]
    ray.get(ray.remote(concat_files).options(num_cpus=0).remote(parts, f"{job.store.uri}/samples.parquet"))
    job.store.delete("samples-parts")
    stats_dict = summary.target_stats(stats, plan.prompts.count, job.sampled_meta,
                                      ray.get(preference) if preference is not None else None)
    target = job.target
    job.store.write_json("result.json", {"key": job.key, "settings_key": plan.settings_key, "name": target.name,
                                         "path": target.path, "step": target.step,
                                         "is_reference": target.is_reference, "stats": stats_dict})


# ---------------------------------------------------------------- summary and report


def _report(cfg: Config, plan: EvalPlan, evaluated: list[TargetJob], sampling: SamplingScheduler,
            chosen_key: str | None) -> EvalResult:
    """Summary rows of every target evaluated with these settings (win rates computed from the sample files by
    Ray tasks, and recorded), and the report over them and the failures."""
    jobs = summary.win_rate_jobs(plan.eval_store, plan.settings_key, cfg.eval.win_rate_baseline, chosen_key)
    if jobs:
        connect(cfg.ray, cfg.run_dir, cfg.shared_paths())
        task = ray.remote(summary.record_win_rate).options(num_cpus=1)
        ray.get([task.remote(job) for job in jobs])
    rows = summary.summary_rows(plan.eval_store, plan.settings_key, cfg.eval.win_rate_baseline, chosen_key)
    paths = {t.name: t.path for t in plan.targets}
    failures = {**plan.failures, **sampling.failures}
    failed = [{"name": name, "path": paths[name], "error": message} for name, message in failures.items()]
    settings = summary.report_settings(cfg.eval, cfg.scoring.engine, plan.prompts.count)
    report = write_report(plan.eval_store, rows, failed, settings)
    # W&B / MLflow, if logging.report_to has them
    log_evaluation(cfg.logging, cfg.run_dir, cfg.model_dump(mode="json"), rows, report.plots)
    return EvalResult(plan.eval_store.uri, [j.target.name for j in evaluated], reused=plan.reused, failures=failed,
                      report=str(report.report), rows=rows, prompts=plan.prompts.count,
                      prompt_rejects=plan.prompts.rejected, engine_starts=sampling.engine_starts)
