"""`dpo-pipeline demo`: the DPO paper's controlled sentiment experiment (Rafailov et al. 2023, §6.1, Fig. 2) in
miniature, end to end on a CPU, with a ground-truth reward.

    π_SFT: a tiny Llama trained on generated reviews (pipeline/demo/sentiment.py)           model.path
    -> preference pairs the paper's way: completions sampled from π_SFT with vLLM (stage 3's engine), ranked by
       the ground-truth reward, best vs worst per prompt                                data.train / data.eval
    -> per variant (DPO at several β; Preferred-FT): cache -> train                    <run_dir>/<variant>/
    -> one evaluation of π_SFT and every checkpoint of every variant                    <run_dir>/eval/
    -> the reward-KL frontier of all runs, and reward vs step                           <run_dir>/report.md

Every step is skipped when its outputs exist for the same inputs (stamps and the stages' content keys), so a
second `demo` only reads what the first wrote.
"""

from __future__ import annotations

import io
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import ray
from matplotlib.figure import Figure
from transformers.utils import logging as hf_logging

from pipeline import iterate, orchestrate
from pipeline.config import Config, load_config
from pipeline.data.models import load_tokenizer
from pipeline.demo import sentiment
from pipeline.demo.sentiment import SftSpec
from pipeline.engines.actors import CheckpointEngine, sample_seed, stop_engines
from pipeline.engines.scorers import actor_options, scorer_kwargs
from pipeline.errors import UserError
from pipeline.evaluation.report import format_mean_se, format_number
from pipeline.runtime.console import progress_bar
from pipeline.runtime.session import init_ray
from pipeline.store.fingerprint import model_files_hash, sha256_json, tokenizer_files_hash
from pipeline.store.storage import Store
from stages import evaluate


@dataclass(frozen=True)
class ExperimentSpec:
    """The sweep and the pair data. Pair settings are part of the pairs' stamp."""

    betas: tuple[float, ...] = (0.1, 0.5, 2.0)
    preferred_ft: bool = True
    train_prompts: int = 336  # (512 before the iterative arm: cut to keep `make demo` within 15 min on 2 cores)
    heldout_prompts: int = 128
    samples_per_prompt: int = 4  # as in the paper: several completions per prefix, ranked by the reward
    all_pairs: bool = True  # train: every two completions with different rewards make a pair; else best vs worst
    max_new_tokens: int = 48
    seed: int = 0
    # The iterative arm (`dpo-pipeline iterate`, configs/sentiment.yaml's `pairs` and `iterate`): R rounds, each on
    # a third of the training prompts with pairs sampled from the last round's policy; 0: no such arm.
    iterative_rounds: int = 3
    iterative_beta: float = 0.5
    variants: dict[str, list[str]] = field(default_factory=dict)  # filled from the fields above

    def __post_init__(self):
        v = {f"dpo-beta{b:g}": [f"train.loss.beta={b}"] for b in self.betas}
        if self.preferred_ft:
            v["preferred-ft"] = ["train.loss.type=sft"]
        object.__setattr__(self, "variants", v)

    @property
    def arms(self) -> list[str]:
        """Every run of the experiment: the variants (offline pairs from π_SFT), then the iterative arm."""
        return list(self.variants) + (["iterative"] if self.iterative_rounds else [])


@dataclass
class ExperimentResult:
    report: str
    rows: list[dict[str, Any]]
    checks: dict[str, Any]
    seconds: float


# ---------------------------------------------------------------- pairs


def _pairs_stamp(cfg: Config, spec: ExperimentSpec) -> dict[str, Any]:
    return {"sft": model_files_hash(cfg.model.path), "tokenizer": tokenizer_files_hash(cfg.model.path),
            "pairs": {k: v for k, v in asdict(spec).items()
                      if k not in ("betas", "preferred_ft", "variants", "iterative_rounds", "iterative_beta")}}


def build_pairs(cfg: Config, spec: ExperimentSpec, log=print) -> None:
    """Preference pairs the paper's way: `samples_per_prompt` completions per prompt sampled from π_SFT, ranked by
    the ground-truth reward. Training pairs: every two completions with different rewards (`all_pairs`; else the
    best against the worst); held-out pairs: the best against the worst, one per prompt. Written to `data.train`
    and `data.eval`, and the training prompts alone to `pairs.prompts` (the iterative arm samples its own pairs
    from them), then `PAIRS.json` (the stamp, last): skipped when the stamp matches."""
    train_path, eval_path = Path(cfg.data.train.path), Path(cfg.data.eval.path)
    prompts_path = Path(cfg.pairs.prompts.path) if cfg.pairs.prompts else None
    stamp_path = train_path.parent / "PAIRS.json"
    stamp = sha256_json(_pairs_stamp(cfg, spec))
    if stamp_path.is_file() and json.loads(stamp_path.read_text())["stamp"] == stamp \
            and train_path.is_file() and eval_path.is_file() and (prompts_path is None or prompts_path.is_file()):
        return
    tok = load_tokenizer(cfg.model.path)
    prompts = sentiment.prompts(spec.train_prompts, spec.seed + 1) + \
        sentiment.prompts(spec.heldout_prompts, spec.seed + 2)
    t0 = time.perf_counter()
    table = _sample(cfg, spec, [tok(p)["input_ids"] for p in prompts], tok.eos_token_id,
                    str(train_path.parent / "sampling-engine.log"))
    completions = tok.batch_decode(table.column("completion_ids").to_pylist(), skip_special_tokens=True)
    # A completion cut at max_new_tokens is dropped: the pipeline appends EOS to a response, which must be true.
    by_prompt: dict[int, list[tuple[float, str]]] = {}
    for pi, text, reason in zip(table.column("prompt_index").to_pylist(), completions,
                                table.column("finish_reason").to_pylist()):
        if reason == "stop":
            by_prompt.setdefault(pi, []).append((sentiment.reward(text), text))
    rows: dict[str, list[str]] = {"train": [], "eval": []}
    for pi in sorted(by_prompt):
        split = "train" if pi < spec.train_prompts else "eval"
        # Held out: one pair per prompt, so that the evaluation samples each prompt once.
        for k, (chosen, rejected) in enumerate(_pairs(by_prompt[pi], spec.all_pairs and split == "train")):
            rows[split].append(json.dumps({"id": f"{pi}-{k}", "prompt": prompts[pi], "chosen": chosen,
                                           "rejected": rejected}))
    if not rows["train"] or not rows["eval"]:
        raise UserError(f"π_SFT gave no usable pairs ({len(by_prompt)} of {len(prompts)} prompts had a completion "
                        f"that ended within {spec.max_new_tokens} tokens): train π_SFT longer or raise "
                        f"max_new_tokens")
    for split, path in (("train", train_path), ("eval", eval_path)):
        path.write_text("".join(r + "\n" for r in rows[split]))
    if prompts_path is not None:
        prompts_path.write_text("".join(json.dumps({"id": str(pi), "prompt": prompts[pi]}) + "\n"
                                        for pi in range(spec.train_prompts)))
    rewards = [s for v in by_prompt.values() for s, _ in v]
    record = {"stamp": stamp, "pairs": {k: len(v) for k, v in rows.items()}, "samples": len(table),
              "finished": len(rewards), "sft_reward_mean": float(np.mean(rewards)),
              "seconds": round(time.perf_counter() - t0, 1)}
    stamp_path.write_text(json.dumps(record, indent=2) + "\n")
    log(f"pairs: {record['pairs']['train']} train, {record['pairs']['eval']} held out, from {len(table)} samples "
        f"of π_SFT (mean reward {record['sft_reward_mean']:.3f}) in {record['seconds']} s")


def _sample(cfg: Config, spec: ExperimentSpec, ids: list[list[int]], eos: int, log_path: str):
    """Completions of every prompt from π_SFT: stage 3's vLLM engine in a Ray actor, per-prompt seeds."""
    init_ray(cfg.ray, cfg.run_dir)
    kwargs = scorer_kwargs("vllm", cfg.eval, cfg.model.path, cfg.model.dtype,
                           cfg.data.max_prompt_length + spec.max_new_tokens)
    kwargs["seed"] = spec.seed
    Path(log_path).parent.mkdir(parents=True, exist_ok=True)
    actor = ray.remote(CheckpointEngine).options(**actor_options(cfg.eval)).remote(kwargs, log_path)
    params = dict(n=spec.samples_per_prompt, temperature=1.0, top_p=1.0, max_tokens=spec.max_new_tokens,
                  stop_token_ids=[eos])
    parts = []
    try:
        with progress_bar(len(ids) * spec.samples_per_prompt, "sampling pairs from π_SFT (vLLM)", "sample") as bar:
            for lo in range(0, len(ids), 256):
                chunk = ids[lo:lo + 256]
                seeds = [sample_seed(spec.seed, i) for i in range(lo, lo + len(chunk))]
                parts.append(ray.get(actor.sample.remote(chunk, seeds, params, lo))["table"])
                bar.update(len(parts[-1]))
    except BaseException:  # an error or an interrupt: a call may be running; the engine goes at once
        stop_engines([actor], timeout_s=0)
        raise
    stop_engines([actor])
    return pa.concat_tables(parts)


def _pairs(scored: list[tuple[float, str]], all_pairs: bool) -> list[tuple[str, str]]:
    """(chosen, rejected) texts from one prompt's (reward, completion) samples: every two with different rewards
    (the higher one chosen), or only the best against the worst. Equal rewards make no pair."""
    if all_pairs:
        return [(a[1], b[1]) if a[0] > b[0] else (b[1], a[1])
                for i, a in enumerate(scored) for b in scored[i + 1:] if a[0] != b[0]]
    ranked = sorted(scored, key=lambda s: s[0])  # stable: ties keep sampling order
    return [(ranked[-1][1], ranked[0][1])] if ranked[-1][0] > ranked[0][0] else []


# ---------------------------------------------------------------- the experiment


def run(config: str, overrides: list[str] | None = None, spec: ExperimentSpec = ExperimentSpec(),
        sft: SftSpec = SftSpec(), echo=print) -> ExperimentResult:
    """Build π_SFT and the pairs, train every variant, evaluate everything together, write the frontier report."""
    t0 = time.perf_counter()
    overrides = list(overrides or [])
    base = load_config(config, overrides)
    if base.data.eval is None:
        raise UserError("the sentiment demo needs data.eval (held-out prompts); set it as in configs/sentiment.yaml")
    r = base.eval.reward
    if r is None or r.type != "rule" or r.rule != "lexicon" or sorted(r.positive) != sorted(sentiment.POSITIVE) \
            or sorted(r.negative) != sorted(sentiment.NEGATIVE):
        raise UserError("eval.reward must be the demo's ground truth (the lexicon rule with "
                        "pipeline/demo/sentiment.py's "
                        "POSITIVE and NEGATIVE words); keep configs/sentiment.yaml's eval.reward")
    hf_logging.disable_progress_bar()  # (transformers' "Writing model shards" bars: ours say what is built)
    echo(f"π_SFT: {sentiment.build_sft_model(base.model.path, sft, log=echo)}")
    build_pairs(base, spec, log=echo)
    targets: dict[str, str] = {}
    variant_of: dict[str, str] = {}
    for name, extra in spec.variants.items():
        cfg = load_config(config, overrides + extra + [f"run_dir={Path(base.run_dir) / name}"])
        echo(f"\n[{name}] {' '.join(extra)}")
        summary = orchestrate.run(cfg, echo=echo, evaluate=False)
        for ckpt in summary.checkpoints:
            step = int(Path(ckpt).name.removeprefix("step_"))
            targets[f"{name}-step{step}"] = ckpt
            variant_of[f"{name}-step{step}"] = name
    steps_of = _iterative_arm(config, overrides, base, spec, targets, variant_of, echo)
    echo(f"\nevaluation: π_SFT and {len(targets)} checkpoint(s)")
    base.eval.checkpoints = targets
    result = evaluate.run(base)
    if result.failures:
        raise UserError(f"{len(result.failures)} checkpoint(s) failed evaluation ({result.failures[0]['name']}: "
                        f"{result.failures[0]['error']}); see {result.report}")
    variant_of["reference"] = "π_SFT"
    # The eval report also keeps targets of earlier sweeps with these settings; the experiment is this sweep's.
    rows = [{**r, "variant": variant_of[r["name"]], "step": steps_of.get(r["name"], r["step"])}
            for r in result.rows if r["name"] in variant_of]
    checks = frontier_checks(rows, spec)
    report = write_experiment_report(base.run_dir, rows, checks, spec)
    return ExperimentResult(str(report), rows, checks, time.perf_counter() - t0)


def _iterative_arm(config: str, overrides: list[str], base: Config, spec: ExperimentSpec, targets: dict[str, str],
                   variant_of: dict[str, str], echo) -> dict[str, int]:
    """`iterate` under <run_dir>/iterative (evaluated with the other runs): each round's final policy becomes a
    target. Returns each target's step counted over the rounds."""
    if not spec.iterative_rounds:
        return {}
    offline_steps = max(int(Path(c).name.removeprefix("step_")) for c in targets.values())
    cfg = iterative_config(config, overrides, spec, offline_steps)
    echo(f"\n[iterative] train.loss.beta={spec.iterative_beta} iterate.rounds={spec.iterative_rounds} "
         f"train.max_steps={cfg.train.max_steps} train.epochs={cfg.train.epochs}, "
         f"iterate.reference={cfg.iterate.reference}")
    steps, steps_of = 0, {}
    for rnd in iterate.run(cfg, echo=echo).rounds:
        steps += int(Path(rnd["checkpoint"]).name.removeprefix("step_"))
        name = f"iterative-round{rnd['round']}"
        targets[name], variant_of[name], steps_of[name] = rnd["checkpoint"], "iterative", steps
    return steps_of


def iterative_config(config: str, overrides: list[str], spec: ExperimentSpec, offline_steps: int) -> Config:
    """The iterative arm's `iterate` config, under <run_dir>/iterative: as many steps as each offline run, split
    evenly over the rounds (a round may pass over its pairs more than once: on-policy samples tie more often, so a
    round's third of the prompts gives fewer pairs)."""
    base = load_config(config, overrides)
    per_round = max(1, offline_steps // spec.iterative_rounds)
    extra = [f"train.loss.beta={spec.iterative_beta}", f"iterate.rounds={spec.iterative_rounds}",
             f"train.max_steps={per_round}", "train.epochs=3"]
    # Each round caches its own pairs: the transformers scorer (the same log-probs, tested) spares the three vLLM
    # engine starts, ~25 s each on 2 cores.
    return load_config(config, overrides + extra + ["iterate.evaluate=false", "scoring.engine=hf",
                                                    f"run_dir={Path(base.run_dir) / 'iterative'}"])


def _final(rows: list[dict[str, Any]], variant: str) -> dict[str, Any]:
    return max((r for r in rows if r["variant"] == variant), key=lambda r: r["step"] or 0)


def frontier_at(points: list[tuple[float, float]], kl: float) -> float | None:
    """The best reward reachable at no more than `kl`, from measured (KL, reward) points and their mixtures: a
    policy that answers each prompt with π_a with probability λ and π_b otherwise has the mixed reward λ·r_a +
    (1−λ)·r_b and, KL being convex, no more than the mixed KL. So the frontier is at least the upper concave
    envelope of the points (None when no point has so little KL)."""
    best = max((r for k, r in points if k <= kl), default=None)
    for ka, ra in points:
        for kb, rb in points:
            if ka <= kl < kb:  # the segment from a (inside) to b (beyond), at kl
                mix = ra + (rb - ra) * (kl - ka) / (kb - ka)
                best = mix if best is None else max(best, mix)
    return best


def frontier_checks(rows: list[dict[str, Any]], spec: ExperimentSpec) -> dict[str, Any]:
    """The demo's two claims, measured: DPO raises the ground-truth reward above π_SFT's by more than 3 standard
    errors, and at Preferred-FT's KL the DPO frontier (the best reward at no more KL over every DPO checkpoint, π_SFT
    and their mixtures: `frontier_at`) is at least Preferred-FT's final reward."""
    sft = next(r for r in rows if r["variant"] == "π_SFT")
    dpo = [v for v in spec.variants if v.startswith("dpo-")]
    finals = {v: _final(rows, v) for v in spec.variants}
    best = max(dpo, key=lambda v: finals[v]["reward_mean"])
    b = finals[best]
    se = np.hypot(b["reward_se"] or 0.0, sft["reward_se"] or 0.0)
    checks: dict[str, Any] = {
        "sft_reward": sft["reward_mean"], "best_dpo": best, "best_dpo_reward": b["reward_mean"],
        "best_dpo_kl": b["kl_mean"], "dpo_gain": b["reward_mean"] - sft["reward_mean"],
        "dpo_gain_in_se": (b["reward_mean"] - sft["reward_mean"]) / se if se else None}
    checks["dpo_above_sft"] = bool(checks["dpo_gain_in_se"] is not None and checks["dpo_gain_in_se"] > 3)
    if "preferred-ft" in finals:
        p = finals["preferred-ft"]
        pts = [r for r in rows if r["variant"] in dpo or r["variant"] == "π_SFT"]
        at_kl = frontier_at([(r["kl_mean"], r["reward_mean"]) for r in pts], p["kl_mean"])
        checks.update({"preferred_ft_reward": p["reward_mean"], "preferred_ft_kl": p["kl_mean"],
                       "dpo_frontier_reward_at_preferred_ft_kl": at_kl,
                       "dpo_at_least_preferred_ft": bool(at_kl >= p["reward_mean"])})
    if any(r["variant"] == "iterative" for r in rows):
        offline = [r for r in rows if r["variant"] in dpo or r["variant"] == "π_SFT"]
        checks.update(_iterative_checks(rows, spec, offline))
    return checks


def _iterative_checks(rows: list[dict[str, Any]], spec: ExperimentSpec, offline: list[dict[str, Any]]) -> dict:
    """The iterative arm against offline DPO: its final reward and KL, the offline run of its β, and the best reward
    offline DPO (its checkpoints, π_SFT and their mixtures) reaches at no more KL than the iterative arm's."""
    it = _final(rows, "iterative")
    same = f"dpo-beta{spec.iterative_beta:g}"
    o = _final(rows, same) if same in spec.variants else None
    at_kl = frontier_at([(r["kl_mean"], r["reward_mean"]) for r in offline], it["kl_mean"])
    return {"iterative_reward": it["reward_mean"], "iterative_reward_se": it["reward_se"],
            "iterative_kl": it["kl_mean"], "iterative_steps": it["step"], "offline_same_beta": same if o else None,
            "offline_steps": max(r["step"] or 0 for r in offline),
            "offline_same_beta_reward": o["reward_mean"] if o else None,
            "offline_same_beta_kl": o["kl_mean"] if o else None,
            "offline_frontier_reward_at_iterative_kl": at_kl,
            "iterative_above_offline_frontier": bool(at_kl is not None and it["reward_mean"] > at_kl)}


def write_experiment_report(run_dir: str, rows: list[dict[str, Any]], checks: dict[str, Any],
                            spec: ExperimentSpec) -> str:
    """report.md with the frontier and reward-vs-step plots of every variant, and experiment.json; returns the
    report's path (or URI)."""
    store = Store(run_dir)
    for name, fig in (("frontier.png", _frontier_plot(rows, spec)), ("reward_vs_step.png", _step_plot(rows, spec))):
        buf = io.BytesIO()
        fig.savefig(buf, format="png", dpi=120, bbox_inches="tight")
        store.write_bytes(name, buf.getvalue())
    sft = next(r for r in rows if r["variant"] == "π_SFT")
    lines = ["# Controlled sentiment generation (DPO paper §6.1, in miniature)", "",
             "Ground-truth reward: positive minus negative lexicon words in the completion. π_SFT = π_ref.", "",
             "| run | β | step | reward | KL [nats] | win rate vs π_SFT | pref. accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|",
             f"| π_SFT | — | 0 | {format_mean_se(sft['reward_mean'], sft['reward_se'])} | "
             f"{format_mean_se(sft['kl_mean'], sft['kl_se'])} | — | — |"]
    for v in spec.arms:
        f = _final(rows, v)
        beta = v.removeprefix("dpo-beta") if v.startswith("dpo-") else \
            f"{spec.iterative_beta:g}" if v == "iterative" else "—"
        lines.append(f"| {v} | {beta} | {f['step']} | {format_mean_se(f['reward_mean'], f['reward_se'])} | "
                     f"{format_mean_se(f['kl_mean'], f['kl_se'])} | "
                     f"{format_mean_se(f['win_rate'], f['win_rate_se'])} | {format_number(f['pref_accuracy'])} |")
    c = checks
    lines += ["", "## What it shows", "",
              f"- DPO raises the mean reward from {c['sft_reward']:.3f} (π_SFT) to {c['best_dpo_reward']:.3f} "
              f"({c['best_dpo']}, KL {c['best_dpo_kl']:.2f} nats): +{c['dpo_gain']:.3f}, "
              f"{c['dpo_gain_in_se']:.1f} standard errors. "
              + ("**Holds.**" if c["dpo_above_sft"] else "**Does not hold in this run.**")]
    if "preferred_ft_reward" in c:
        lines.append(f"- Preferred-FT reaches {c['preferred_ft_reward']:.3f} at KL {c['preferred_ft_kl']:.2f}; the "
                     f"DPO frontier at that KL reaches {c['dpo_frontier_reward_at_preferred_ft_kl']:.3f}. "
                     + ("**DPO ≥ Preferred-FT holds.**" if c["dpo_at_least_preferred_ft"] else
                        "**DPO ≥ Preferred-FT does not hold in this run.**"))
    if "iterative_reward" in c:
        lines.append(_iterative_line(c, spec))
    lines += ["", "![reward vs KL frontier](frontier.png)", "", "![reward vs step](reward_vs_step.png)", "",
              "Every checkpoint: [eval/report.md](eval/report.md); per-sample completions in "
              "`eval/<checkpoint>/samples.parquet`.", ""]
    store.write_json("experiment.json", {"checks": checks, "spec": asdict(spec), "rows": rows})
    store.write_bytes("report.md", "\n".join(lines).encode())
    return f"{store.uri}/report.md"


def _iterative_line(c: dict[str, Any], spec: ExperimentSpec) -> str:
    line = (f"- Iterative DPO ({spec.iterative_rounds} rounds at β {spec.iterative_beta:g}, each on its own third of "
            f"the prompts, pairs sampled from the last round's policy; {c['iterative_steps']} steps in all, "
            f"each offline run {c['offline_steps']}) reaches "
            f"{c['iterative_reward']:.3f} at KL {c['iterative_kl']:.2f}")
    if c["offline_same_beta"]:
        line += (f"; offline DPO at the same β ({c['offline_same_beta']}): {c['offline_same_beta_reward']:.3f} at KL "
                 f"{c['offline_same_beta_kl']:.2f}")
    if c["offline_frontier_reward_at_iterative_kl"] is None:
        return line + "; no offline DPO checkpoint has so little KL. "
    return line + (f"; the offline DPO frontier at its KL reaches {c['offline_frontier_reward_at_iterative_kl']:.3f}. "
                   + ("**On-policy rounds reach more reward at the same KL in this run.**"
                      if c["iterative_above_offline_frontier"] else
                      "**On-policy rounds do not reach more reward at the same KL in this run.**"))


def _series(rows, spec):
    sft = next(r for r in rows if r["variant"] == "π_SFT")
    for v in spec.arms:
        yield v, [sft] + sorted((r for r in rows if r["variant"] == v), key=lambda r: r["step"] or 0)


def _frontier_plot(rows, spec):
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for v, pts in _series(rows, spec):
        ax.errorbar([r["kl_mean"] for r in pts], [r["reward_mean"] for r in pts],
                    yerr=[r["reward_se"] or 0 for r in pts], marker="o", capsize=2, label=v,
                    linestyle="--" if v == "preferred-ft" else "-")
    sft = next(r for r in rows if r["variant"] == "π_SFT")
    ax.plot([sft["kl_mean"]], [sft["reward_mean"]], "k*", markersize=12, label="π_SFT")
    ax.set(xlabel="KL(π‖π_SFT) per sample [nats]", ylabel="mean ground-truth reward",
           title="Reward vs KL frontier (each line: one run, in step order)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def _step_plot(rows, spec):
    fig = Figure(figsize=(6.5, 4.5))
    ax = fig.add_subplot()
    for v, pts in _series(rows, spec):
        ax.errorbar([r["step"] or 0 for r in pts], [r["reward_mean"] for r in pts],
                    yerr=[r["reward_se"] or 0 for r in pts], marker="o", capsize=2, label=v)
    ax.set(xlabel="training step", ylabel="mean ground-truth reward", title="Reward vs training step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig
