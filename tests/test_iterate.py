"""Iterative DPO (pipeline/iterate.py): each round's config, and what `run` does round by round (the stages
stand-ins). Two real rounds end to end are the demo's iterative arm (tests/test_experiment.py, extended tier):
killed between the rounds, a rerun continues at round 2's first stage; with `reference: previous` round 2's cached
log-probs are those of π_1 (a transformers forward of round 1's checkpoint) and its training starts at π_1 (step
1's loss is ln 2)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pipeline import iterate
from tests.conftest import make_config

ROUNDS = ["iterate.rounds=2", "pairs.samples_per_prompt=4", "pairs.rule=all_pairs", "pairs.max_new_tokens=8",
          "pairs.keep_truncated=true", "pairs.engine_kwargs={enforce_eager: true}",
          "pairs.reward={type: rule, rule: length}"]


def test_each_round_samples_the_last_policy_and_trains_from_it(tmp_path):
    cfg = make_config(Path("/models/base"), tmp_path, *ROUNDS, "iterate.rounds=3", "pairs.seed=5")
    first = iterate.round_config(cfg, 1, None)
    assert (first.model.path, first.pairs.model, first.train.init_from) == ("/models/base", None, None)
    assert first.run_dir == f"{tmp_path / 'run'}/round_1" and first.pairs.seed == 5
    assert first.data.train.path == f"{tmp_path / 'run'}/round_1/pairs/pairs.parquet"
    assert first.pairs.prompts == cfg.data.train  # the prompts: the configured data, not the round's pairs
    second = iterate.round_config(cfg, 2, "/runs/r1/step_2")
    # `initial`: π_ref stays model.path; the policy starts at π_1, the samples come from π_1.
    assert (second.model.path, second.pairs.model, second.train.init_from) == ("/models/base", "/runs/r1/step_2",
                                                                               "/runs/r1/step_2")
    assert second.pairs.seed == 6 and second.pairs.output_dir == f"{tmp_path / 'run'}/round_2/pairs"
    assert [iterate.part(cfg, r) for r in (1, 2, 3)] == [(0, 3), (1, 3), (2, 3)]
    # `previous`: π_ref is π_1 too, and the policy starts at it (no separate init).
    prev = make_config(Path("/models/base"), tmp_path, *ROUNDS, "iterate.reference=previous")
    second = iterate.round_config(prev, 2, "/runs/r1/step_2")
    assert (second.model.path, second.train.init_from) == ("/runs/r1/step_2", None)
    assert iterate.part(make_config(Path("/m"), tmp_path, "iterate.prompts=all"), 2) is None
    # Evaluation: every round's policy against model.path, in the top run_dir.
    assert iterate.eval_config(prev, 1).model.path == "/models/base"


def test_with_evaluate_each_round_evaluates_every_round_so_far(tmp_path, monkeypatch):
    """`iterate.evaluate: true` (the default): after round r, one evaluation of π_1..π_r against model.path in the
    top run_dir, reusing what earlier rounds evaluated (the evaluation stage's own reuse); the summary carries the
    last one's rows. The stages are stand-ins: the two rounds end to end run in tests/test_experiment.py (the demo's
    iterative arm: killed between rounds, resumed, round 2 referenced to π_1)."""
    cfg = make_config(Path("/models/base"), tmp_path, *ROUNDS)
    calls: list[tuple[str, Any]] = []

    def pairs_run(rcfg, part):
        calls.append(("pairs", rcfg.run_dir))
        return SimpleNamespace(counts={"pairs": 3, "prompts": 2, "reward_mean": 1.0, "chosen_reward_mean": 2.0,
                                       "rejected_reward_mean": 0.0}, reused=False, dataset=rcfg.data.train.path)

    def train_run(rcfg, echo, evaluate):
        assert evaluate is False  # a round's run never evaluates on its own
        calls.append(("train", rcfg.run_dir))
        ckpt = Path(rcfg.run_dir) / "checkpoints" / "step_000002"
        Path(rcfg.run_dir).mkdir(parents=True, exist_ok=True)
        (Path(rcfg.run_dir) / "train.json").write_text(json.dumps({"checkpoints": [str(ckpt)]}))
        return SimpleNamespace(caches={"train": "cache-key"}, checkpoints=[str(ckpt)])

    def eval_run(ecfg):
        calls.append(("eval", (ecfg.run_dir, ecfg.model.path, dict(ecfg.eval.checkpoints))))
        rows = [{"name": "reference"}] + [{"name": n} for n in ecfg.eval.checkpoints]
        return SimpleNamespace(rows=rows, report=f"{ecfg.run_dir}/eval/report.md", failures=[])

    monkeypatch.setattr(iterate.pairs_stage, "run", pairs_run)
    monkeypatch.setattr(iterate.orchestrate, "run", train_run)
    monkeypatch.setattr(iterate.eval_stage, "run", eval_run)
    summary = iterate.run(cfg, echo=lambda line: None)
    run_dir = str(tmp_path / "run")
    pi = [f"{run_dir}/round_{r}/checkpoints/step_000002" for r in (1, 2)]
    assert calls == [("pairs", f"{run_dir}/round_1"), ("train", f"{run_dir}/round_1"),
                     ("eval", (run_dir, "/models/base", {"round_1": pi[0]})),
                     ("pairs", f"{run_dir}/round_2"), ("train", f"{run_dir}/round_2"),
                     ("eval", (run_dir, "/models/base", {"round_1": pi[0], "round_2": pi[1]}))]
    assert [r["name"] for r in summary.rows] == ["reference", "round_1", "round_2"]
    assert [r["checkpoint"] for r in summary.rounds] == pi and summary.report == f"{run_dir}/eval/report.md"
    calls.clear()
    monkeypatch.setattr(cfg.iterate, "evaluate", False)  # the demo's arm: evaluated with the other runs
    iterate.run(cfg, echo=lambda line: None)
    assert [kind for kind, _ in calls] == ["pairs", "train", "pairs", "train"]
