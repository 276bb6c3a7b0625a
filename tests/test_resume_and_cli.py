"""A driver killed mid-run resumes without redoing finished shards; user errors exit 2 with one line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from stages import cache
from tests.conftest import DATA, make_config, read_cache

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def _reap_session(sid: int) -> None:
    """Kill what a SIGKILLed driver left running (its local Ray instance's agents)."""
    import psutil

    for pid in psutil.pids():
        try:
            if os.getsid(pid) == sid:
                os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@pytest.mark.ray
def test_sigkill_mid_run_then_rerun_resumes_and_matches_uninterrupted(tiny_model, tmp_path, ray_local):
    lines = (DATA / "standard.jsonl").read_text().splitlines()
    big = tmp_path / "big.jsonl"
    big.write_text("".join(f"{line}\n" for _ in range(10) for line in lines))  # 240 rows -> 60 shards
    cfg = make_config(tiny_model, tmp_path / "resumed", "reference.engine=hf", "reference.shard_size=4",
                      "reference.batch_size=4", data=big)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))

    # Own session, so the Ray processes the driver starts can be found and reaped after the kill.
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache", str(cfg_file)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    markers: list[Path] = []
    while not markers and time.time() < deadline and driver.poll() is None:
        markers = list(Path(cfg.cache_dir).glob("*/.work/shard-*.json"))
        time.sleep(0.05)
    assert markers, "the driver finished or stalled before writing a shard"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    _reap_session(driver.pid)
    key_dir = markers[0].parents[1]
    done = len(list(key_dir.glob(".work/shard-*.json")))
    assert not (key_dir / "manifest.json").exists()  # an interrupted cache never looks complete
    assert 0 < done < 60

    (resumed,) = cache.run(cfg)
    assert not resumed.reused and resumed.shards_total == 60
    assert resumed.shards_computed == 60 - done  # finished shards were not redone
    (straight,) = cache.run(cfg.model_copy(update={"cache_dir": str(tmp_path / "straight" / "cache")}))
    a, b = read_cache(resumed), read_cache(straight)
    assert a.num_rows == b.num_rows == 240
    for col in ("id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert a.column(col) == b.column(col)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(a.column(f"ref_{side}_logps").to_numpy(), b.column(f"ref_{side}_logps").to_numpy(),
                                   atol=1e-5)
    assert not any(p.name.startswith(".") for p in Path(resumed.uri).rglob("*"))


def assert_user_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("overrides, needle", [
    (["data.trian.path=x"], "unknown config key 'data.trian': did you mean 'data.train'?"),
    (["data.max_prompt_length=500"], "max_prompt_length (500) must be smaller"),
    (["model.path=/no/such/model"], "model.path '/no/such/model' does not exist"),
    (["data.train.path=/no/such.jsonl"], "data file '/no/such.jsonl' not found"),
    (["bad-override"], "is not KEY=VALUE"),
])
def test_user_errors_exit_2_with_one_line(overrides, needle, tiny_model):
    # Later overrides win, so each case's override replaces the valid tiny model path where it names one.
    assert_user_error(cli("cache", "configs/tiny.yaml", f"model.path={tiny_model}", *overrides), needle)


@pytest.mark.parametrize("overrides, needle", [
    (["eval.checkpoints=every:0"], "checkpoints must be all, last, every:K"),
    (["eval.reward.type=callable"], "reward type 'callable' needs eval.reward.function"),
    (["eval.preference_accuracy=false"], "no checkpoints in"),
    ([], "no complete reference cache for the eval split"),  # preference accuracy needs the eval cache
])
def test_eval_user_errors_exit_2_with_one_line(overrides, needle, tiny_model, tmp_path):
    proc = cli("eval", "configs/tiny.yaml", f"model.path={tiny_model}", f"run_dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}", *overrides)
    assert_user_error(proc, needle)


def test_plan_command_says_what_run_would_do(tiny_model, tmp_path):
    proc = cli("plan", "configs/tiny.yaml", f"model.path={tiny_model}", f"run_dir={tmp_path / 'run'}",
               f"cache_dir={tmp_path / 'cache'}")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[:2] for ln in lines] == [["cache/train", "run"], ["cache/eval", "run"], ["train", "run"],
                                                 ["eval", "run"]]
    assert "rows to score with vllm" in lines[0] and not (tmp_path / "cache").exists()  # nothing was run


def test_missing_config_file_exits_2():
    assert_user_error(cli("cache", "no/such/config.yaml"), "config file 'no/such/config.yaml' not found")


def test_config_command_prints_resolved_config(tiny_model):
    proc = cli("config", "configs/tiny.yaml", f"model.path={tiny_model}", "reference.batch_size=7")
    assert proc.returncode == 0, proc.stderr
    resolved = yaml.safe_load(proc.stdout)
    assert resolved["reference"]["batch_size"] == 7 and resolved["model"]["path"] == str(tiny_model)
    assert resolved["data"]["train"]["format"] == "auto"  # defaults are filled in
