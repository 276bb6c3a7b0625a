"""Case 3: a crash in the cache stage. A SIGKILLed driver's rerun recomputes only the shards in flight and ends
with the values of an uninterrupted run; in that rerun, a scorer actor that dies is restarted by Ray Data and its
batch retried, and a writer task that dies between a shard's file and its marker is retried."""

from __future__ import annotations

import os
import random
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
from tests.faults.helpers import ROOT, fault, reap_session

pytestmark = [pytest.mark.ray, pytest.mark.extended]  # a long scenario: `make test-extended` (CI runs it)
COPIES = 2  # of standard.jsonl (24 rows): 48 rows, 12 shards of 4; enough to kill mid-run
SHARDS = 6 * COPIES


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> Path:
    lines = (DATA / "standard.jsonl").read_text().splitlines()
    path = tmp_path_factory.mktemp("data") / "big.jsonl"
    path.write_text("".join(f"{line}\n" for _ in range(COPIES) for line in lines))
    return path


def config(tiny_model, root: Path, big: Path):
    return make_config(tiny_model, root, "scoring.engine=hf", "scoring.shard_size=4", "scoring.batch_size=4",
                       data=big)


@pytest.fixture(scope="module")
def straight(tiny_model, tmp_path_factory, big, ray_local):
    """The uninterrupted run every interrupted one must equal."""
    (r,) = cache.run(config(tiny_model, tmp_path_factory.mktemp("straight"), big))
    return read_cache(r)


def assert_same_cache(a, b) -> None:
    assert a.num_rows == b.num_rows == 24 * COPIES
    for col in ("id", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"):
        assert a.column(col) == b.column(col)
    for side in ("chosen", "rejected"):
        np.testing.assert_allclose(a.column(f"ref_{side}_logps").to_numpy(), b.column(f"ref_{side}_logps").to_numpy(),
                                   atol=1e-5)


def test_sigkill_then_a_rerun_with_dying_scorer_and_writer_resumes_and_matches_uninterrupted(
        tiny_model, tmp_path, big, straight, monkeypatch):
    """The driver is SIGKILLed at a random moment; its rerun computes only the shards not finished, and survives two
    faults of its own: the scorer actor exits on its 5th batch (Ray Data restarts it and retries the batch), and a
    writer task exits with its second shard's file written but no marker (the task is retried). The result equals an
    uninterrupted run. (One rerun carries both cases, which need a cache run each otherwise.)"""
    cfg = config(tiny_model, tmp_path, big)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    seed = random.randrange(1 << 30)
    wait_for = random.Random(seed).randint(1, SHARDS // 2 - 1)  # finished shards before the kill
    # Own session, so the Ray processes the driver starts can be found and reaped after the kill.
    driver = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "cache", str(cfg_file)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 300
    markers: list[Path] = []
    while len(markers) < wait_for and time.time() < deadline and driver.poll() is None:
        markers = list(Path(cfg.cache_dir).glob("*/.work/shard-*.json"))
        time.sleep(0.02)
    assert markers, f"the driver finished or stalled before writing a shard (seed {seed})"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    reap_session(driver.pid)
    key_dir = markers[0].parents[1]
    done = len(list(key_dir.glob(".work/shard-*.json")))
    assert not (key_dir / "manifest.json").exists()  # an interrupted cache never looks complete
    # A shard or two may finish between the last look and the kill; the rerun still scores >= 5 shards of one
    # batch each, so the scorer's 5th batch comes.
    assert 0 < done <= SHARDS - 5, f"seed {seed}"

    actor, writer = tmp_path / "actor-token", tmp_path / "writer-token"
    monkeypatch.setenv("DPO_PIPELINE_FAULT", ";".join([fault("scorer_batch", actor, nth=5),
                                                       fault("shard_written", writer, nth=2)]))
    (resumed,) = cache.run(cfg)
    assert not actor.exists() and not writer.exists()  # both faults fired
    assert not resumed.reused and resumed.shards_total == SHARDS
    assert resumed.shards_computed == SHARDS - done, f"seed {seed}"  # finished shards were not redone
    assert_same_cache(read_cache(resumed), straight)
    assert not any(p.name.startswith(".") for p in Path(resumed.uri).rglob("*"))
