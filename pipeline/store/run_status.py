"""Where a run stands, from the files in its run_dir alone (`dpo-pipeline status RUN_DIR`): no Ray, no config.

What each stage leaves behind: `config.yaml` (any command), `cache.json` (the cache stage), `metrics.jsonl` or, at
a URI run_dir while training, `metrics-parts/` (logged steps), `ray/checkpoint_*` (training states), `train.json`
(a finished training run, written last), `checkpoints/step_*` (exports), `eval/summary.json` (evaluated targets) and
`eval/report.md`; logs: `run.log`, `logs/*.log` (Ray's, Ray Train's, vLLM's), `eval/<target>/engine.log`.
An `iterate` run_dir holds one such run per round (`round_<r>/`, with the round's pairs in `round_<r>/pairs/`,
whose `manifest.json` is written last) and the evaluation of every round in `eval/`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import yaml
from pydantic import ValidationError

from pipeline.config import TrainConfig
from pipeline.errors import UserError
from pipeline.store.checkpoints import list_checkpoints
from pipeline.store.storage import Store


@dataclass
class RunStatus:
    run_dir: str
    stage: str  # started | cached | training | trained | evaluated
    loss: str | None = None
    caches: dict[str, dict[str, Any]] = field(default_factory=dict)  # split -> {uri, pairs, rejected}
    steps_logged: int = 0
    steps_total: int | None = None  # known once training finished
    last_metrics: dict[str, Any] = field(default_factory=dict)
    training_states: list[str] = field(default_factory=list)
    checkpoints: list[str] = field(default_factory=list)
    evaluated: list[dict[str, Any]] = field(default_factory=list)  # summary rows
    failures: list[dict[str, Any]] = field(default_factory=list)
    report: str | None = None
    logs: list[str] = field(default_factory=list)
    rounds: list[dict[str, Any]] = field(default_factory=list)  # iterate: {round, pairs, status: RunStatus | None}


def _metrics_rows(store: Store) -> list[dict[str, Any]]:
    if store.exists("metrics.jsonl"):
        data = store.read_bytes("metrics.jsonl")
    else:  # a URI run_dir still training: its uploaded parts
        parts = sorted(n for n in store.listdir("metrics-parts") if n.endswith(".jsonl"))
        data = b"".join(store.read_bytes(f"metrics-parts/{n}") for n in parts)
    rows = []
    for line in data.decode().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut short by a crash
            pass
    return rows


def _loss_summary(config: dict[str, Any]) -> str | None:
    """`TrainConfig.loss_summary` of the run's train section; None if it does not validate (another version's)."""
    try:
        return TrainConfig.model_validate(config.get("train") or {}).loss_summary
    except ValidationError:
        return None


def run_status(run_dir: str) -> RunStatus:
    """The run's state from its files; a run_dir no command has written to is a UserError."""
    store = Store(run_dir)
    rounds = _rounds(store)
    if not store.exists("config.yaml") and not rounds:
        raise UserError(f"{run_dir!r} holds no run (no config.yaml); give the run_dir of a config that a "
                        f"`dpo-pipeline` command has run")
    config = (yaml.safe_load(store.read_bytes("config.yaml")) or {}) if store.exists("config.yaml") else {}
    s = RunStatus(store.uri, "started", _loss_summary(config) if config else None, rounds=rounds)
    if store.exists("cache.json"):
        s.stage = "cached"
        for split, r in store.read_json("cache.json").items():
            counts = r.get("counts") or {}
            s.caches[split] = {"uri": r.get("uri"), "pairs": counts.get("pairs"), "rejected": counts.get("rejected")}
    rows = _metrics_rows(store)
    s.training_states = sorted(n for n in store.listdir("ray") if n.startswith("checkpoint_"))
    if rows or s.training_states:
        s.stage = "training"
        s.steps_logged = max(r.get("step", 0) for r in rows) if rows else 0
        s.last_metrics = rows[-1] if rows else {}
    if store.exists("train.json"):
        s.stage = "trained"
        s.steps_total = store.read_json("train.json").get("steps")
    s.checkpoints = list_checkpoints(store)
    if store.exists("eval/summary.json"):
        summary = store.read_json("eval/summary.json")
        s.evaluated, s.failures = summary.get("checkpoints", []), summary.get("failures", [])
        s.stage = "evaluated"
    if store.exists("eval/report.md"):
        s.report = f"{store.uri}/eval/report.md"
    s.logs = [f"{store.uri}/run.log"] if store.exists("run.log") else []
    s.logs += [f"{store.uri}/logs/{n}" for n in sorted(store.listdir("logs")) if n.endswith(".log")]
    s.logs += [f"{store.uri}/eval/{n}/engine.log" for n in store.listdir("eval")
               if store.exists(f"eval/{n}/engine.log")]
    if rounds:  # iterate: where its last round stands
        last = rounds[-1]
        s.stage = f"round {last['round']} " + (last["status"].stage if last["status"] else
                                                 "pairs written" if last["pairs"] is not None else "started")
    return s


def _rounds(store: Store) -> list[dict[str, Any]]:
    """An `iterate` run's rounds, in order: the pairs each made (None until written) and its run's status."""
    numbers = sorted(int(n.removeprefix("round_")) for n in store.listdir("")
                     if n.startswith("round_") and n.removeprefix("round_").isdigit())
    rounds = []
    for r in numbers:
        sub = store.child(f"round_{r}")
        pairs = sub.read_json("pairs/manifest.json")["counts"]["pairs"] if sub.exists("pairs/manifest.json") else None
        rounds.append({"round": r, "pairs": pairs,
                       "status": run_status(sub.uri) if sub.exists("config.yaml") else None})
    return rounds


def _round_line(r: dict[str, Any]) -> str:
    st: RunStatus | None = r["status"]
    pairs = "pairs not written yet" if r["pairs"] is None else f"{r['pairs']} pairs"
    if st is None:
        return f"round {r['round']}: {pairs}"
    steps = (f"{st.steps_total} step(s)" if st.steps_total is not None else f"{st.steps_logged} step(s) logged")
    final = f", π_{r['round']}: {st.checkpoints[-1]}" if st.stage == "trained" and st.checkpoints else ""
    return f"round {r['round']}: {pairs}, {st.stage}, {steps}{final}"


def _fmt(v, se=None) -> str:
    if v is None:
        return "n/a"
    return f"{v:.4g}" + (f" ± {se:.2g}" if se is not None else "")


def headline(row: dict[str, Any]) -> str:
    """One evaluated target's figures, for the terminal."""
    return (f"reward {_fmt(row.get('reward_mean'), row.get('reward_se'))}, "
            f"KL {_fmt(row.get('kl_mean'), row.get('kl_se'))}, win rate {_fmt(row.get('win_rate'))}, "
            f"preference accuracy {_fmt(row.get('pref_accuracy'))}")


def status_lines(s: RunStatus) -> list[str]:
    """The status as the terminal shows it."""
    lines = [f"run: {s.run_dir}", f"stage: {s.stage}" + (f" (loss {s.loss})" if s.loss else "")]
    lines += [_round_line(r) for r in s.rounds]
    for split, c in s.caches.items():
        lines.append(f"cache ({split}): {c['uri']} ({c['pairs']} pairs, {c['rejected']} rejected)")
    if s.stage == "training":
        m = s.last_metrics
        figures = ", ".join(f"{k} {m[k]:.4g}" for k in ("loss", "rewards/accuracies") if isinstance(m.get(k), float))
        lines.append(f"training: {s.steps_logged} step(s) logged" + (f" (last: {figures})" if figures else "")
                     + (f"; resumable from {s.training_states[-1]}" if s.training_states else
                        "; no training state saved yet"))
    elif s.steps_total is not None:
        lines.append(f"training: finished, {s.steps_total} step(s)")
    if s.checkpoints:
        names = [c.rsplit("/", 1)[-1] for c in s.checkpoints]
        lines.append(f"checkpoints: {len(names)} ({', '.join(names)})")
    for row in s.evaluated:
        lines.append(f"  [{row.get('name')}] {headline(row)}")
    for f in s.failures:
        lines.append(f"  [{f.get('name')}] FAILED: {f.get('error')}")
    if s.report:
        lines.append(f"report: {s.report}")
    if s.logs:
        lines.append(f"logs: {', '.join(s.logs)}")
    return lines
