"""The CLI's `plan`, `config` and `status` commands. (User errors and crashes: tests/faults.)"""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cli import main
from pipeline.config import load_config, to_yaml
from tests.faults.helpers import cli


@pytest.mark.subprocess
def test_plan_command_says_what_run_would_do(tiny_model, tmp_path):
    proc = cli("plan", "configs/tiny.yaml", f"model.path={tiny_model}", f"run_dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["cache/train", "run"], ["cache/eval", "run"], ["train", "run"],
                                                 ["eval", "run"]]
    assert "rows to score with vllm" in lines[0] and not (tmp_path / "cache").exists()  # nothing was run


@pytest.mark.subprocess
def test_config_command_prints_resolved_config(tiny_model):
    proc = cli("config", "configs/tiny.yaml", f"model.path={tiny_model}", "scoring.batch_size=7")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["scoring"]["batch_size"] == 7 and resolved["model"]["path"] == str(tiny_model)
    assert resolved["data"]["train"]["format"] == "auto"  # defaults are filled in


def test_status_of_a_run_in_training_and_of_no_run(tmp_path, capsys):
    """`status` reads the run_dir's files only (a run stopped at step 3 with a training state at step 2)."""
    run = tmp_path / "run"
    (run / "ray" / "checkpoint_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "config.json").write_text("{}")
    cfg = load_config("configs/tiny.yaml", ["train.loss=[{type: sigmoid, weight: 0.8}, {type: sft}]"])
    (run / "config.yaml").write_text(to_yaml(cfg))
    (run / "cache.json").write_text(json.dumps({"train": {"uri": "/c/abc", "counts": {"pairs": 24, "rejected": 1}}}))
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 0.7 - i / 100}) + "\n"
                                               for i in (1, 2, 3)) + '{"step": 4, "lo')  # cut short by a crash
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out
    assert "stage: training (loss 0.8×sigmoid + sft)" in out
    assert "cache (train): /c/abc (24 pairs, 1 rejected)" in out
    assert "training: 3 step(s) logged (last: loss 0.67); resumable from checkpoint_000002" in out
    assert "checkpoints: 1 (step_000002)" in out
    assert main(["status", str(tmp_path / "nothing")]) == 2
    assert "holds no run (no config.yaml)" in capsys.readouterr().err


def test_status_of_an_iterate_run_lists_its_rounds(tmp_path, capsys):
    """An `iterate` run_dir: round 1 trained, round 2's pairs written and its training at step 1."""
    run = tmp_path / "run"
    text = to_yaml(load_config("configs/tiny.yaml", []))
    r1, r2 = run / "round_1", run / "round_2"
    for r, pairs in ((r1, 40), (r2, 31)):
        (r / "pairs").mkdir(parents=True)
        (r / "pairs" / "manifest.json").write_text(json.dumps({"counts": {"pairs": pairs}}))
        (r / "config.yaml").write_text(text)
    (r1 / "checkpoints" / "step_000005").mkdir(parents=True)
    (r1 / "checkpoints" / "step_000005" / "config.json").write_text("{}")
    (r1 / "train.json").write_text(json.dumps({"steps": 5}))
    (r2 / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 0.69}) + "\n")
    (run / "round_3" / "pairs").mkdir(parents=True)  # sampling started: no manifest, no config yet
    assert main(["status", str(run)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1] == "stage: round 3 started"
    assert out[2] == f"round 1: 40 pairs, trained, 5 step(s), π_1: {r1}/checkpoints/step_000005"
    assert out[3:5] == ["round 2: 31 pairs, training, 1 step(s) logged", "round 3: pairs not written yet"]
