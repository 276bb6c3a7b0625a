"""`dpo-pipeline iterate`: iterative (on-policy) DPO, built from the stages. Round r = 1..R (`iterate.rounds`):

    pairs      K completions per prompt sampled from π_{r-1} (π_0 = `model.path`), scored by the reward, paired by
               `pairs.rule` (stages/pairs.py)                                          <run_dir>/round_<r>/pairs/
    cache      the reference log-probs of those pairs: π_ref = `model.path` (`iterate.reference: initial`) or
               π_{r-1} (`previous`)                                                    <cache_dir>/<key>/
    train      DPO from π_{r-1} (`train.init_from`) against that reference                <run_dir>/round_<r>/
    evaluate   π_r, the round's final checkpoint, beside the earlier rounds and `model.path` (the KL is always to
               `model.path`, so the rounds are comparable)                             <run_dir>/eval/

Prompts: `iterate.prompts: split` gives round r the r-th of R consecutive parts of the prompts (the rounds together
see each prompt once, as one offline round); `all` gives every round every prompt, with its own sampling seed
(`pairs.seed` + r - 1). Every stage is keyed by its inputs, so a rerun reuses what is done and continues at the
first unfinished stage of the first unfinished round; `plan` says which, round by round.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pipeline import faults, orchestrate
from pipeline.config import Config, DataSource
from pipeline.errors import UserError
from pipeline.orchestrate import Step
from pipeline.store.layout import RunLayout
from stages import evaluate as eval_stage
from stages import pairs as pairs_stage


@dataclass
class IterateSummary:
    """What `run` did: per round its pairs dataset and counts, its final checkpoint; the evaluation rows."""

    rounds: list[dict[str, Any]] = field(default_factory=list)
    rows: list[dict[str, Any]] = field(default_factory=list)
    report: str | None = None
    failures: list[dict[str, str]] = field(default_factory=list)


def round_dir(cfg: Config, r: int) -> str:
    return RunLayout.of(cfg).round(r).uri


def final_checkpoint(cfg: Config, r: int) -> str | None:
    """Round r's policy π_r (its last checkpoint), once the round's training has finished; else None."""
    store = RunLayout.of(cfg).round(r)
    if not store.exists("train.json"):
        return None
    checkpoints = store.read_json("train.json")["checkpoints"]
    return checkpoints[-1] if checkpoints else None


def part(cfg: Config, r: int) -> tuple[int, int] | None:
    """The part of the prompts round r samples (`iterate.prompts`)."""
    return (r - 1, cfg.iterate.rounds) if cfg.iterate.prompts == "split" else None


def round_config(cfg: Config, r: int, policy: str | None) -> Config:
    """The config the stages see in round r, given π_{r-1} (`policy`; None in round 1: `model.path`)."""
    d = round_dir(cfg, r)
    reference = policy if cfg.iterate.reference == "previous" and policy is not None else cfg.model.path
    model = cfg.model if reference == cfg.model.path else cfg.model.model_copy(update={"path": reference,
                                                                                         "revision": None})
    # The prompts: `pairs.prompts`, else the configured data.train (which the round's pairs replace below).
    pairs = cfg.pairs.model_copy(update={"model": policy, "output_dir": f"{d}/pairs", "seed": cfg.pairs.seed + (r - 1),
                                         "prompts": cfg.pairs.prompts or cfg.data.train})
    data = cfg.data.model_copy(update={"train": DataSource(path=f"{d}/pairs/pairs.{cfg.pairs.output_format}")})
    train = cfg.train.model_copy(update={"init_from": policy if policy not in (None, reference) else None})
    return cfg.model_copy(update={"run_dir": d, "model": model, "pairs": pairs, "data": data, "train": train})


def eval_config(cfg: Config, rounds: int) -> Config:
    """Evaluation of the first `rounds` rounds' policies, against `model.path`, in `<run_dir>/eval`."""
    targets = {f"round_{r}": final_checkpoint(cfg, r) for r in range(1, rounds + 1)}
    return cfg.model_copy(update={"eval": cfg.eval.model_copy(update={"checkpoints": targets})})


def check(cfg: Config) -> None:
    if cfg.train.lora is not None:
        raise UserError("iterate trains each round from the previous round's full model; train.lora is not "
                        "supported there yet: drop train.lora (or merge adapters between rounds by hand)")
    if cfg.pairs.reward is None and cfg.eval.reward is None:
        raise UserError("iterate needs a reward to rank each round's samples; set pairs.reward (or eval.reward)")


def plan(cfg: Config) -> list[Step]:
    """What `run` would do, round by round: rounds whose π_{r-1} is not trained yet wait for it."""
    check(cfg)
    steps: list[Step] = []
    for r in range(1, cfg.iterate.rounds + 1):
        policy = None if r == 1 else final_checkpoint(cfg, r - 1)
        if r > 1 and policy is None:
            steps.append(Step(f"round {r}", "run", f"after round {r - 1}: pairs from π_{r - 1}, cache, train"
                                                   + (", evaluate" if cfg.iterate.evaluate else "")))
            continue
        rcfg = round_config(cfg, r, policy)
        action, why = pairs_stage.describe(rcfg, part(cfg, r))
        steps.append(Step(f"round {r}/pairs", action, why))
        if action != "reuse":
            steps.append(Step(f"round {r}/train", "run", "after its pairs: cache, then training from "
                                                         f"{policy or cfg.model.path}"))
            continue
        steps += [Step(f"round {r}/{s.stage}", s.action, s.why) for s in orchestrate.plan(rcfg, evaluate=False)]
    return steps


def run(cfg: Config, echo=print) -> IterateSummary:
    """Rounds 1..R, each stage skipped when its outputs exist for the same inputs."""
    check(cfg)
    summary = IterateSummary()
    rounds = cfg.iterate.rounds
    for r in range(1, rounds + 1):
        policy = None if r == 1 else final_checkpoint(cfg, r - 1)
        rcfg = round_config(cfg, r, policy)
        echo(f"\n[round {r}/{rounds}] pairs from {policy or cfg.model.path}")
        made = pairs_stage.run(rcfg, part(cfg, r))
        c = made.counts
        echo(f"pairs {'kept' if made.reused else 'written'}: {c['pairs']} from {c['prompts']} prompts "
             f"(reward {_number(c['reward_mean'])}; chosen {_number(c['chosen_reward_mean'])}, rejected "
             f"{_number(c['rejected_reward_mean'])})")
        trained = orchestrate.run(rcfg, echo=echo, evaluate=False)
        summary.rounds.append({"round": r, "pairs": made.dataset, "counts": c, "caches": trained.caches,
                               "checkpoint": trained.checkpoints[-1] if trained.checkpoints else None})
        if cfg.iterate.evaluate:
            result = eval_stage.run(eval_config(cfg, r))
            summary.rows, summary.report, summary.failures = result.rows, result.report, result.failures
        faults.reach("iterate_round_done")
    return summary


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
