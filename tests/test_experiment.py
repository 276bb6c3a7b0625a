"""`dpo-pipeline demo` end to end, shrunk: π_SFT built and fine-tuned, pairs sampled with vLLM and ranked, one DPO
variant and Preferred-FT trained, the iterative arm's two rounds (`iterate`, `reference: previous`: killed between
the rounds, the rerun continues at round 2, whose reference and starting policy are π_1), everything evaluated on one
engine, the frontier report; then a run that computes nothing. (The full-size experiment and its figures: `make
demo`, README.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from pipeline import iterate
from pipeline.caches.layout import CacheSpec, find_cache
from pipeline.demo import experiment, sentiment
from pipeline.demo.experiment import ExperimentSpec
from pipeline.demo.sentiment import SftSpec
from pipeline.faults import InjectedFault
from pipeline.iterate import round_config
from pipeline.store.run_status import run_status, status_lines
from tests.conftest import read_cache, sequence_logps
from tests.faults.helpers import fault

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.extended]
pytest.importorskip("vllm")

CONFIG = str(Path(__file__).parent.parent / "configs" / "sentiment.yaml")
SPEC = ExperimentSpec(betas=(0.5,), train_prompts=24, heldout_prompts=8, samples_per_prompt=4, max_new_tokens=48,
                      iterative_rounds=2)
SFT = SftSpec(hidden_size=64, intermediate_size=128, num_layers=2, num_heads=2, num_kv_heads=1, reviews=3000,
              epochs=2)


def test_demo_builds_trains_evaluates_then_reuses_everything(tmp_path, ray_local, monkeypatch):
    build = tmp_path / "build"
    overrides = [f"model.path={build / 'sft'}", f"data.train.path={build / 'pairs.jsonl'}",
                 f"data.eval.path={build / 'heldout.jsonl'}", f"pairs.prompts.path={build / 'prompts.jsonl'}",
                 f"cache_dir={tmp_path / 'cache'}",
                 f"run_dir={tmp_path / 'runs'}", "scoring.engine=hf", "train.parallel.num_workers=1",
                 "train.parallel.num_cpus_per_worker=1", "train.global_batch_pairs=8", "train.micro_batch_pairs=8",
                 "train.max_steps=4", "train.checkpoint.every=2", "train.eval_every=null", "train.log_every=1",
                 "eval.num_prompts=6",
                 "eval.num_actors=1"]
    lines: list[str] = []
    iterative = experiment.iterative_config(CONFIG, overrides, SPEC, offline_steps=4)
    arm = Path(iterative.run_dir)

    # Killed once the iterative arm's round 1 is done (the offline variants are trained by then).
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("iterate_round_done", tmp_path / "token", action="raise"))
    with pytest.raises(InjectedFault):
        experiment.run(CONFIG, overrides, SPEC, SFT, echo=lines.append)
    monkeypatch.delenv("DPO_PIPELINE_FAULT")
    assert (arm / "round_1/train.json").is_file() and not (arm / "round_2").exists()
    done = {p: (arm / p).stat().st_mtime_ns for p in ("round_1/pairs/manifest.json", "round_1/train.json")}
    st = run_status(str(arm))
    assert st.stage == "round 1 trained" and [r["round"] for r in st.rounds] == [1]
    assert st.rounds[0]["pairs"] == json.loads((arm / "round_1/pairs/manifest.json").read_text())["counts"]["pairs"]
    assert any(line.startswith("round 1: ") and "trained, 2 step(s), π_1: " in line for line in status_lines(st))
    plan = {s.stage: s.action for s in iterate.plan(iterative)}
    assert plan["round 1/pairs"] == plan["round 1/train"] == plan["round 1/cache/train"] == "reuse"
    assert plan["round 2/pairs"] == "run"

    # The rerun keeps what is done (round 1 among it) and runs round 2 and the rest.
    first = experiment.run(CONFIG, overrides, SPEC, SFT, echo=lines.append)
    assert {p: (arm / p).stat().st_mtime_ns for p in done} == done
    assert run_status(str(arm)).stage == "round 2 trained"

    # Pairs the paper's way: chosen scores higher than rejected under the ground truth, same prompt.
    rows = [json.loads(ln) for ln in (build / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) >= 10
    assert all(sentiment.reward(r["chosen"]) > sentiment.reward(r["rejected"]) for r in rows)
    record = json.loads((build / "PAIRS.json").read_text())
    assert record["samples"] == (24 + 8) * 4 and record["pairs"]["train"] == len(rows)

    # π_SFT, both variants' checkpoints (steps 2 and 4) and each round's policy, under their report names.
    names = sorted(r["name"] for r in first.rows)
    assert names == ["dpo-beta0.5-step2", "dpo-beta0.5-step4", "iterative-round1", "iterative-round2",
                     "preferred-ft-step2", "preferred-ft-step4", "reference"]
    # The iterative arm: as many steps as each offline run, half per round; round 2 sampled its pairs from round 1's
    # policy.
    rounds = {r["name"]: r for r in first.rows if r["variant"] == "iterative"}
    assert (rounds["iterative-round1"]["step"], rounds["iterative-round2"]["step"]) == (2, 4)
    assert first.checks["offline_steps"] == first.checks["iterative_steps"] == 4
    manifest = json.loads((arm / "round_2" / "pairs" / "manifest.json").read_text())
    pi_1 = iterate.final_checkpoint(iterative, 1)
    assert manifest["model"] == rounds["iterative-round1"]["path"] == pi_1 != iterate.final_checkpoint(iterative, 2)
    assert all(json.loads((arm / f"round_{r}/pairs/manifest.json").read_text())["counts"]["pairs"] > 0
               for r in (1, 2))
    # `reference: previous`: round 2's cached log-probs are π_1's (a transformers forward of round 1's checkpoint),
    # and its policy starts at π_1 (step 1's loss is ln 2).
    cached = read_cache(find_cache(CacheSpec.of(round_config(iterative, 2, pi_1)), "train")).slice(0, 4).to_pylist()
    model = AutoModelForCausalLM.from_pretrained(pi_1, dtype="float32")
    expected = sequence_logps(model, [row["prompt_input_ids"] + row["chosen_input_ids"] for row in cached],
                              [len(row["prompt_input_ids"]) for row in cached])
    assert [row["ref_chosen_logps"] for row in cached] == pytest.approx(expected, abs=1e-3)
    step_1 = json.loads((arm / "round_2/metrics.jsonl").read_text().splitlines()[0])
    assert step_1["step"] == 1 and step_1["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert "| iterative | 0.5 |" in Path(first.report).read_text() and "iterative_reward" in first.checks
    by_name = {r["name"]: r for r in first.rows}
    assert by_name["reference"]["variant"] == "π_SFT" and by_name["preferred-ft-step4"]["step"] == 4
    assert abs(by_name["reference"]["kl_mean"]) < 1e-2  # π_SFT against itself
    for key in ("dpo_above_sft", "dpo_at_least_preferred_ft", "sft_reward", "best_dpo_reward"):
        assert key in first.checks
    report = Path(first.report).read_text()
    assert "| preferred-ft |" in report and "| dpo-beta0.5 | 0.5 | 4 |" in report
    for png in ("frontier.png", "reward_vs_step.png"):
        assert (tmp_path / "runs" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((tmp_path / "runs" / "experiment.json").read_text())
    assert saved["checks"] == first.checks

    # Second run: every stamp and content key matches, nothing is rebuilt, retrained or re-evaluated.
    watched = [build / "sft" / "model.safetensors", build / "pairs.jsonl",
               tmp_path / "runs" / "dpo-beta0.5" / "train.json",
               tmp_path / "runs" / "iterative" / "round_2" / "train.json",
               tmp_path / "runs" / "eval" / "preferred-ft-step4" / "result.json"]
    before = [p.stat().st_mtime_ns for p in watched]
    second = experiment.run(CONFIG, overrides, SPEC, SFT, echo=lines.append)
    assert [p.stat().st_mtime_ns for p in watched] == before
    assert second.checks == first.checks
