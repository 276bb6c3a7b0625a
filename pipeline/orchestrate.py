"""`dpo-pipeline plan` and `run`: the three stages in order, each skipped when its outputs exist for the same inputs.

    cache (train and eval splits) -> train -> eval

With a reference-free loss (`train.needs_reference` false: `sft`, `simpo`, `orpo` terms only) the train split is not
cached: training tokenizes it into token files (`pipeline/caches/tokens.py`), or reads a complete cache of the same
inputs if one exists. The eval split is still cached when `eval.preference_accuracy` is on (the default), since that
measure compares the checkpoints' implicit rewards with the reference's log-probs from the cache; with it off, no
reference is scored at all (training's eval split, under `train.eval_every`, is tokenized like the train split).

Reuse follows the stages' own content keys: a cache is complete under its key (its manifest exists); a training
run is finished when `<run_dir>/train.json` holds the key of its cache and weight-shaping settings; a checkpoint is
evaluated when its `result.json` holds its key. `plan` reads these and says what `run` would do, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.caches.layout import MANIFEST, CacheInputs, CacheSpec, resolve_inputs, status
from pipeline.caches.tokens import token_store
from pipeline.config import Config
from pipeline.dpo.memory import check_fits, model_shape, scorer_memory, training_memory
from pipeline.dpo.parallel import compute_dtype
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store
from stages import cache, train
from stages import evaluate as eval_stage  # `evaluate` is run()'s flag


@dataclass
class Step:
    stage: str
    action: str  # run | resume | reuse
    why: str


@dataclass
class RunSummary:
    steps: list[Step]
    caches: dict[str, str] = field(default_factory=dict)
    checkpoints: list[str] = field(default_factory=list)
    report: str | None = None
    rows: list[dict[str, Any]] = field(default_factory=list)
    failures: list[dict[str, str]] = field(default_factory=list)


def _splits(cfg: Config):
    return [("train", cfg.data.train)] + ([("eval", cfg.data.eval)] if cfg.data.eval else [])


def cached_splits(cfg: Config) -> tuple[str, ...]:
    """The splits whose reference cache `run` builds (see the module's docstring)."""
    if cfg.train.needs_reference:
        return ("train", "eval")
    return ("eval",) if cfg.eval.preference_accuracy else ()


def _plan_cache(cfg: Config) -> tuple[list[Step], dict[str, Any]]:
    steps, preps = [], {}
    for split, src in _splits(cfg):
        prep = preps[split] = resolve_inputs(CacheSpec.of(cfg), split, src)
        if split in cached_splits(cfg):
            steps.append(_cache_step(cfg, split, prep))
        elif split == "train" or cfg.train.eval_every:
            steps.append(_tokens_step(cfg, split, prep))
    return steps, preps


def _cache_step(cfg: Config, split: str, prep: CacheInputs) -> Step:
    store = RunLayout.of(cfg).cache(prep.key)
    found = status(store)
    if found.state == "complete":
        return Step(f"cache/{split}", "reuse", f"complete cache for these inputs: {store.uri} ({found.pairs} pairs)")
    if found.state == "resume":
        return Step(f"cache/{split}", "resume",
                    f"{found.done}/{len(prep.plan.shards)} shards already scored in {store.uri}")
    engine = ""
    if cfg.scoring.engine == "vllm" and cfg.scoring.use_gpu:
        tokens = min(cfg.data.max_length + 1, cfg.scoring.engine_kwargs.get("max_num_batched_tokens", 1 << 30))
        shape = model_shape(prep.model_dir, None, cfg.model.trust_remote_code)
        engine = f"; each engine: {scorer_memory(shape, cfg.model.dtype, cfg.scoring.tensor_parallel_size, tokens)}"
    return Step(f"cache/{split}", "run", f"no cache with key {prep.key}: {prep.plan.num_rows} rows to score with "
                                         f"{cfg.scoring.engine}{engine}")


def _tokens_step(cfg: Config, split: str, prep: CacheInputs) -> Step:
    """The split of a reference-free loss: what training will read, or tokenize first."""
    layout = RunLayout.of(cfg)
    cache, tokens = layout.cache(prep.key), token_store(layout, prep)
    cached = status(cache)
    if cached.state == "complete":
        return Step(f"tokens/{split}", "reuse", f"reference-free loss: the token ids of the complete cache "
                                                f"{cache.uri} ({cached.pairs} pairs)")
    tokenized = status(tokens)  # only when no complete cache serves: one lookup less on the plan's common path
    if tokenized.state == "complete":
        return Step(f"tokens/{split}", "reuse",
                    f"reference-free loss: token files {tokens.uri} ({tokenized.pairs} pairs)")
    if tokenized.state == "resume":
        return Step(f"tokens/{split}", "resume", f"reference-free loss: {tokenized.done}/{len(prep.plan.shards)} "
                                                 f"shards already tokenized in {tokens.uri}")
    return Step(f"tokens/{split}", "run", f"reference-free loss, no reference cache: training tokenizes "
                                          f"{prep.plan.num_rows} rows into {tokens.uri}")


def _ready_data(cfg: Config, prep: CacheInputs) -> Store | None:
    """The complete directory training would read for the train split (a cache, or token files), if any."""
    layout = RunLayout.of(cfg)
    stores = [layout.cache(prep.key)]
    if not cfg.train.needs_reference:
        stores.append(token_store(layout, prep))
    return next((s for s in stores if s.exists(MANIFEST)), None)  # its manifest is read once, by _plan_train


def _plan_train(cfg: Config, cache_key: str, ready: Store | None) -> Step:
    run = RunLayout.of(cfg).run  # a local path or a URI
    other = ""
    if run.exists("train.json"):
        rec = run.read_json("train.json")
        if rec.get("key") == train.train_key(cfg, cache_key):
            return Step("train", "reuse", f"finished with these inputs: {rec['steps']} steps, "
                                          f"{len(rec['checkpoints'])} checkpoint(s) in {run.uri}/checkpoints")
        other = " (warning: run_dir holds a run with other inputs or settings; use a new run_dir to start over)"
    states = [n for n in run.listdir("ray") if n.startswith("checkpoint_") and run.isdir(f"ray/{n}")]
    if states:
        return Step("train", "resume", f"from the training state {states[-1]} in {run.uri}/ray{other}")
    if ready:
        manifest = ready.read_json(MANIFEST)
        pairs = manifest["counts"]["pairs"]
        files = manifest["files"]
        _, _, total = train.plan_steps(cfg.train, [f["path"] for f in files], [f["rows"] for f in files])
        lora = cfg.train.lora
        what = f", LoRA rank {lora.rank} adapters" if lora else ""
        what += f", {_reference_free(cfg)}" if not cfg.train.needs_reference else f", loss {cfg.train.loss_summary}"
        return Step("train", "run", f"{total} steps on {cfg.train.parallel.num_workers} worker(s) in {_compute(cfg)}, "
                                    f"{pairs} pairs{what}")
    if not cfg.train.needs_reference:
        return Step("train", "run", f"after tokenizing: no training run for these inputs, {_reference_free(cfg)}")
    return Step("train", "run", f"after the cache, in {_compute(cfg)}: no training run for these inputs")


def _memory(cfg: Config, model_dir: str) -> str:
    """What each training worker will hold (`pipeline.dpo.memory`), worked out from the model's config.json."""
    shape = model_shape(model_dir, cfg.train.lora, cfg.model.trust_remote_code)
    memory = training_memory(shape, cfg.train, cfg.data.max_length, cfg.model.dtype)
    check_fits(memory, cfg.train.parallel.gpu_memory_gb)
    return memory.line()


def _compute(cfg: Config) -> str:
    """The training's compute dtype and device, as the plan shows them ("bfloat16 on GPUs")."""
    parallel = cfg.train.parallel
    return f"{str(compute_dtype(parallel)).removeprefix('torch.')} on {'GPUs' if parallel.use_gpu else 'CPUs'}"


def _reference_free(cfg: Config) -> str:
    return f"reference-free loss {cfg.train.loss_summary}: no reference model or cache"


def _plan_eval(cfg: Config, after: bool) -> Step:
    if after:
        return Step("eval", "run", f"after training: the reference and checkpoints ({cfg.eval.checkpoints})"
                                   if cfg.eval.include_reference_model else f"after training: {cfg.eval.checkpoints}")

    p = eval_stage.prepare(cfg)
    names = [j.target.name for j in p.jobs]
    failed = f"; unusable: {', '.join(p.failures)}" if p.failures else ""
    if not names:
        return Step("eval", "reuse", f"all {len(p.reused)} target(s) evaluated with these settings{failed}")
    kept = f"; {len(p.reused)} kept" if p.reused else ""
    return Step("eval", "run", f"{len(names)} to evaluate: {', '.join(names)}{kept}{failed}")


def plan(cfg: Config, evaluate: bool = True) -> list[Step]:
    """What `run` would do, stage by stage, without running anything (content hashes are computed)."""
    steps, preps = _plan_cache(cfg)
    train_step = _plan_train(cfg, preps["train"].key, _ready_data(cfg, preps["train"]))
    if train_step.action != "reuse":
        train_step.why += f"; memory {_memory(cfg, preps['train'].model_dir)}"
    if not evaluate:
        return steps + [train_step]
    upstream = any(s.action != "reuse" for s in steps) or train_step.action != "reuse"
    return steps + [train_step, _plan_eval(cfg, after=upstream)]


def run(cfg: Config, echo=print, evaluate: bool = True) -> RunSummary:
    """cache -> train -> eval on one Ray instance, skipping what `plan` finds done (a reference-free loss caches
    only what evaluation needs, see the module's docstring). `evaluate=False` stops after
    training (the sentiment experiment evaluates all its runs together)."""
    steps = plan(cfg, evaluate)
    for s in steps:
        echo(f"plan: {s.stage:<12} {s.action:<7} {s.why}")
    summary = RunSummary(steps)
    if cached_splits(cfg):  # cheap when every split is complete
        summary.caches = {r.split: r.uri for r in cache.run(cfg, only=cached_splits(cfg))}
    if next(s for s in steps if s.stage == "train").action != "reuse":
        summary.checkpoints = train.run(cfg).checkpoints
    else:
        summary.checkpoints = RunLayout.of(cfg).run.read_json("train.json")["checkpoints"]
    if not evaluate:
        return summary
    result = eval_stage.run(cfg)
    summary.report, summary.rows, summary.failures = result.report, result.rows, result.failures
    return summary
