"""Iterative DPO (pipeline/iterate.py): each round's config (fast), and two rounds on the tiny model end to end
(extended tier): killed between the rounds, a rerun continues at round 2's first stage; with `reference: previous`
round 2's cached log-probs are those of π_1 (a transformers forward of round 1's checkpoint) and its training
starts at π_1 (step 1's loss is ln 2)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from pipeline import iterate
from pipeline.runtime.faults import InjectedFault
from pipeline.store.run_status import run_status, status_lines
from tests.conftest import DATA, make_config, read_cache, sequence_logps
from tests.faults.helpers import fault

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


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.extended
def test_two_rounds_resume_between_rounds_and_round_two_is_referenced_to_pi_1(tiny_model, tmp_path, ray_local,
                                                                             monkeypatch):
    pytest.importorskip("vllm")
    cfg = make_config(tiny_model, tmp_path, *ROUNDS, "iterate.reference=previous", "pairs.num_prompts=12",
                      "scoring.engine=hf", "train.max_steps=2", "train.global_batch_pairs=2",
                      "train.micro_batch_pairs=2", "train.optim.lr=1e-3", "eval.num_prompts=2",
                      "eval.max_new_tokens=4", "eval.engine_kwargs={enforce_eager: true}",
                      "eval.reward={type: rule, rule: length}", "eval.preference_accuracy=false",
                      data=DATA / "conversational.jsonl")
    run_dir = Path(cfg.run_dir)

    # 1. Killed once round 1 is done (evaluated too).
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("iterate_round_done", tmp_path / "t1", action="raise"))
    with pytest.raises(InjectedFault):
        iterate.run(cfg, echo=lambda line: None)
    assert (run_dir / "round_1/train.json").is_file() and not (run_dir / "round_2").exists()
    monkeypatch.delenv("DPO_PIPELINE_FAULT")
    done = {p: (run_dir / p).stat().st_mtime_ns for p in ("round_1/pairs/manifest.json", "round_1/train.json",
                                                          "eval/round_1/result.json")}
    st = run_status(str(run_dir))
    assert st.stage == "round 1 trained" and [r["round"] for r in st.rounds] == [1]
    assert st.rounds[0]["pairs"] == json.loads((run_dir / "round_1/pairs/manifest.json").read_text())["counts"]["pairs"]
    assert [row["name"] for row in st.evaluated] == ["reference", "round_1"]
    assert any(line.startswith("round 1: ") and "trained, 2 step(s), π_1: " in line for line in status_lines(st))
    plan = {s.stage: s.action for s in iterate.plan(cfg)}
    assert plan["round 1/pairs"] == plan["round 1/train"] == plan["round 1/cache/train"] == "reuse"
    assert plan["round 2/pairs"] == "run"

    # 2. The rerun keeps round 1 and runs round 2.
    s = iterate.run(cfg, echo=lambda line: None)
    assert {p: (run_dir / p).stat().st_mtime_ns for p in done} == done
    assert [r["round"] for r in s.rounds] == [1, 2] and all(r["counts"]["pairs"] > 0 for r in s.rounds)
    assert [row["name"] for row in s.rows] == ["reference", "round_1", "round_2"] and not s.failures
    assert run_status(str(run_dir)).stage == "round 2 trained"
    pi_1 = iterate.final_checkpoint(cfg, 1)
    assert s.rounds[1]["checkpoint"] == iterate.final_checkpoint(cfg, 2) and pi_1 != s.rounds[1]["checkpoint"]
    # Round 2's pairs were sampled from π_1, and its reference is π_1: cached log-probs = a forward of π_1.
    manifest = json.loads((run_dir / "round_2/pairs/manifest.json").read_text())
    assert manifest["model"] == pi_1
    cached = read_cache(type("C", (), {"uri": s.rounds[1]["caches"]["train"]})).slice(0, 4).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(pi_1, dtype="float32")
    seqs = [row["prompt_input_ids"] + row["chosen_input_ids"] for row in cached]
    expected = sequence_logps(model, seqs, [len(row["prompt_input_ids"]) for row in cached])
    assert [row["ref_chosen_logps"] for row in cached] == pytest.approx(expected, abs=1e-3)
    # Round 2 starts its policy at π_1, its reference: the first step's loss is ln 2.
    first = json.loads((run_dir / "round_2/metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-4)
