"""`dpo-pipeline plan` and `run`: the three stages in order, each skipped when its outputs exist for the same inputs.

    cache (train and eval splits) -> train -> eval

Reuse follows the stages' own content keys: a cache is complete under its key (its manifest exists); a training
run is finished when `<run_dir>/train.json` holds the key of its cache and weight-shaping settings; a checkpoint is
evaluated when its `result.json` holds its key. `plan` reads these and says what `run` would do, and why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline.config import Config
from pipeline.store.cache_layout import resolve_inputs
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


def _plan_cache(cfg: Config) -> tuple[list[Step], dict[str, Any]]:
    steps, preps = [], {}
    for split, src in _splits(cfg):
        prep = preps[split] = resolve_inputs(cfg, split, src)
        store = Store(cfg.cache_dir).child(prep.key)
        if store.exists("manifest.json"):
            pairs = store.read_json("manifest.json")["counts"]["pairs"]
            steps.append(Step(f"cache/{split}", "reuse", f"complete cache for these inputs: {store.uri} "
                                                         f"({pairs} pairs)"))
        elif store.exists(".work/plan.json"):
            done = sum(n.startswith("shard-") for n in store.listdir(".work"))
            steps.append(Step(f"cache/{split}", "resume", f"{done}/{len(prep.plan.shards)} shards already scored "
                                                          f"in {store.uri}"))
        else:
            steps.append(Step(f"cache/{split}", "run", f"no cache with key {prep.key}: {prep.plan.num_rows} rows "
                                                       f"to score with {cfg.scoring.engine}"))
    return steps, preps


def _plan_train(cfg: Config, cache_key: str, cache_ready: bool) -> Step:
    run = Store(cfg.run_dir)  # a local path or a URI
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
    if cache_ready:
        manifest = Store(cfg.cache_dir).child(cache_key).read_json("manifest.json")
        pairs = manifest["counts"]["pairs"]
        files = manifest["files"]
        _, _, total = train.plan_steps(cfg, [f["path"] for f in files], [f["rows"] for f in files])
        lora = cfg.train.lora
        what = f", LoRA rank {lora.rank} adapters" if lora else ""
        return Step("train", "run", f"{total} steps on {cfg.train.parallel.num_workers} worker(s), {pairs} pairs{what}")
    return Step("train", "run", "after the cache: no training run for these inputs")


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
    cache_ready = steps[0].action == "reuse"
    train_step = _plan_train(cfg, preps["train"].key, cache_ready)
    if not evaluate:
        return steps + [train_step]
    upstream = any(s.action != "reuse" for s in steps) or train_step.action != "reuse"
    return steps + [train_step, _plan_eval(cfg, after=upstream)]


def run(cfg: Config, echo=print, evaluate: bool = True) -> RunSummary:
    """cache -> train -> eval on one Ray instance, skipping what `plan` finds done. `evaluate=False` stops after
    training (the sentiment experiment evaluates all its runs together)."""
    steps = plan(cfg, evaluate)
    for s in steps:
        echo(f"plan: {s.stage:<12} {s.action:<7} {s.why}")
    summary = RunSummary(steps)
    summary.caches = {r.split: r.uri for r in cache.run(cfg)}  # cheap when every split is complete
    if next(s for s in steps if s.stage == "train").action != "reuse":
        summary.checkpoints = train.run(cfg).checkpoints
    else:
        summary.checkpoints = Store(cfg.run_dir).read_json("train.json")["checkpoints"]
    if not evaluate:
        return summary
    result = eval_stage.run(cfg)
    summary.report, summary.rows, summary.failures = result.report, result.rows, result.failures
    return summary
