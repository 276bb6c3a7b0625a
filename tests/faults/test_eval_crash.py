"""Case 5: a crash in evaluation. The samples and results of finished checkpoints survive a crash; a rerun
samples and evaluates only what is missing."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline.faults import InjectedFault
from stages import evaluate
from tests.conftest import make_config
from tests.faults.helpers import fault
from tests.test_eval_stage import _checkpoint

pytestmark = [pytest.mark.ray, pytest.mark.vllm, pytest.mark.extended]  # long scenarios: `make test-extended`
pytest.importorskip("vllm")


# Both tests evaluate with these settings; the first in one chunk (6 prompts), the second in chunks of 2.
SETTINGS = ["eval.include_reference_model=false", "eval.preference_accuracy=false", "eval.num_prompts=6",
            "eval.samples_per_prompt=2", "eval.max_new_tokens=8", "eval.engine_kwargs={enforce_eager: true}",
            "scoring.engine=hf"]


@pytest.fixture(scope="module")
def one_chunk(tmp_path_factory):
    """The first test's run directory: its step_000001 (seed 1) was sampled in one chunk, uninterrupted (the second
    test's reference)."""
    return tmp_path_factory.mktemp("one-chunk")


def test_finished_checkpoints_survive_a_crash_and_a_rerun_does_only_the_rest(tiny_model, one_chunk, ray_local,
                                                                            monkeypatch):
    tmp_path = one_chunk
    cfg = make_config(tiny_model, tmp_path, *SETTINGS, "eval.batch_prompts=6")
    ckpts = Path(cfg.run_dir) / "checkpoints"
    for step in (1, 2):
        _checkpoint(tiny_model, ckpts / f"step_00000{step}", seed=step)
    eval_dir = Path(cfg.run_dir) / "eval"

    # 1. The driver dies once step 1 is sampled (both share one engine, step 1 first).
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("eval_target_sampled", tmp_path / "t1", action="raise"))
    with pytest.raises(InjectedFault):
        evaluate.run(cfg)
    assert (eval_dir / "step_000001/sampled.json").exists() and not (eval_dir / "step_000002").joinpath(
        "sampled.json").exists()
    sampled_1 = (eval_dir / "step_000001/sampled.parquet").stat().st_mtime_ns

    # 2. The rerun samples step 2 only; the driver dies again once step 1's result is written.
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("eval_target_finished", tmp_path / "t2", action="raise"))
    with pytest.raises(InjectedFault):
        evaluate.run(cfg)
    assert (eval_dir / "step_000001/sampled.parquet").stat().st_mtime_ns == sampled_1  # not sampled again
    assert (eval_dir / "step_000001/result.json").exists() and not (eval_dir / "step_000002/result.json").exists()
    result_1 = (eval_dir / "step_000001/result.json").stat().st_mtime_ns

    # 3. The last rerun starts no engine: step 1 is kept, step 2 is finished from its saved samples.
    monkeypatch.delenv("DPO_PIPELINE_FAULT")
    r = evaluate.run(cfg)
    assert r.reused == ["step_000001"] and r.evaluated == ["step_000002"] and r.engine_starts == 0
    assert (eval_dir / "step_000001/result.json").stat().st_mtime_ns == result_1
    assert [row["name"] for row in r.rows] == ["step_000001", "step_000002"] and not r.failures
    assert all(row["kl_mean"] is not None for row in r.rows)


def test_a_crash_mid_target_keeps_its_written_chunks_and_the_samples_are_those_of_one_run(tiny_model, tmp_path,
                                                                                         ray_local, monkeypatch,
                                                                                         one_chunk):
    """Chunks of 2 prompts: the driver dies after the first chunk, then after the second; each rerun samples only
    the chunks not written. The final samples equal those of an uninterrupted run in one chunk: the first test's
    samples of the same checkpoint (its step_000001), or a run of its own when this test runs alone."""
    cfg = make_config(tiny_model, tmp_path, *SETTINGS, "eval.batch_prompts=2")
    ckpt = _checkpoint(tiny_model, Path(cfg.run_dir) / "checkpoints" / "step_000001", seed=1)
    target = Path(cfg.run_dir) / "eval" / "step_000001"

    def written() -> dict[str, int]:
        return {p.name: p.stat().st_mtime_ns for p in (target / "sampled-parts").rglob("*.parquet")}

    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("eval_chunk_sampled", tmp_path / "t1", action="raise"))
    with pytest.raises(InjectedFault):
        evaluate.run(cfg)
    first = written()
    assert len(first) == 1
    # A new injection counts its own reaches: the rerun's first chunk written (the run's second) is the first.
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("eval_chunk_sampled", tmp_path / "t2", action="raise"))
    with pytest.raises(InjectedFault):
        evaluate.run(cfg)
    second = written()
    assert len(second) == 2 and all(second[name] == mtime for name, mtime in first.items())  # not sampled again

    monkeypatch.delenv("DPO_PIPELINE_FAULT")
    r = evaluate.run(cfg)
    assert r.evaluated == ["step_000001"] and not (target / "sampled-parts").exists()
    resumed = pq.read_table(target / "samples.parquet")
    assert resumed.column("prompt_index").to_pylist() == [i for i in range(6) for _ in range(2)]
    once_file = one_chunk / "run" / "eval" / "step_000001" / "samples.parquet"
    if not once_file.exists():
        whole = make_config(tiny_model, one_chunk, *SETTINGS, "eval.batch_prompts=6", f"eval.checkpoints=[{ckpt}]")
        evaluate.run(whole)
    once = pq.read_table(once_file)
    assert once.num_rows == 12
    assert resumed.column("completion_ids").to_pylist() == once.column("completion_ids").to_pylist()
