"""The CLI's `plan` and `config` commands. (User errors and crashes: tests/faults.)"""

from __future__ import annotations

import yaml

from tests.faults.helpers import cli


def test_plan_command_says_what_run_would_do(tiny_model, tmp_path):
    proc = cli("plan", "configs/tiny.yaml", f"model.path={tiny_model}", f"run_dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["cache/train", "run"], ["cache/eval", "run"], ["train", "run"],
                                                 ["eval", "run"]]
    assert "rows to score with vllm" in lines[0] and not (tmp_path / "cache").exists()  # nothing was run


def test_config_command_prints_resolved_config(tiny_model):
    proc = cli("config", "configs/tiny.yaml", f"model.path={tiny_model}", "scoring.batch_size=7")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["scoring"]["batch_size"] == 7 and resolved["model"]["path"] == str(tiny_model)
    assert resolved["data"]["train"]["format"] == "auto"  # defaults are filled in
