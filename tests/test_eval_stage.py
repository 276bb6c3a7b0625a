"""Stage 3 on the tiny model: two checkpoints and the reference, then a third added incrementally.

One module-scoped scenario keeps the number of vLLM engines (each a slow start on CPU) low: run 1 evaluates the
reference, step 1, step 2 and a broken step 3 on two engines (the reference and step 1 start them; step 2 and
step 3 are swapped into whichever finishes first); run 2, after step 3 is removed and step 4 (a byte copy of
step 1) added, evaluates step 4 only, on a fresh engine. Values are checked against independent transformers
forwards.
"""

from __future__ import annotations

import contextlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.data.models import load_tokenizer
from pipeline.evaluation.inputs import Prompts, read_prompts
from pipeline.evaluation.summary import ChunkStats
from pipeline.store.storage import Store
from stages import cache, evaluate
from tests.conftest import DATA, copy_cache, engine_processes, engines_at_kill, make_config, read_cache, sequence_logps

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
pytest.importorskip("vllm")


def _checkpoint(tiny_model: Path, out: Path, seed: int) -> Path:
    """The tiny model with seeded noise on every weight: a stand-in for a training checkpoint."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(out)
    return out


def _seq_logps(model_dir: str, sequences: list[list[int]], starts: list[int]) -> np.ndarray:
    return sequence_logps(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), sequences, starts)


@pytest.fixture(scope="module")
def scenario(tiny_model, tmp_path_factory, standard_cache):
    root = tmp_path_factory.mktemp("eval")
    copy_cache(standard_cache, root)
    cfg = make_config(
        tiny_model, root, "scoring.engine=hf", f"data.eval.path={DATA / 'conversational.jsonl'}",
        "eval.num_prompts=6", "eval.samples_per_prompt=2", "eval.max_new_tokens=8", "eval.num_actors=2",
        "eval.batch_prompts=4", "eval.engine_kwargs={enforce_eager: true}", "eval.reward.type=callable",
        "eval.reward.function=tests.reward_fixtures:count_char", "eval.reward.kwargs={char: e}")
    cache.run(cfg)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    _checkpoint(tiny_model, ckpts / "step_000001", seed=1)
    _checkpoint(tiny_model, ckpts / "step_000002", seed=2)
    broken = ckpts / "step_000003"
    broken.mkdir()
    for name in ("config.json", "generation_config.json"):  # the others' architecture: it is swapped into an engine
        shutil.copy(tiny_model / name, broken / name)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    with _driver_spy() as received, engines_at_kill() as engines_left, pytest.MonkeyPatch.context() as mp:
        mp.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "1")  # the engine cores in processes of their own, as users run
        first = evaluate.run(cfg)
        engines_left += engine_processes()  # and none at all once the run is over
    first_report = Path(first.report).read_text()
    ref_cache = Path(cfg.cache_dir) / "eval-reference"
    first_ref_files = sorted(p.name for p in ref_cache.iterdir())
    mtimes = {n: (Path(first.eval_dir) / n / "result.json").stat().st_mtime_ns
              for n in ("reference", "step_000001", "step_000002")}
    shutil.rmtree(broken)
    shutil.copytree(ckpts / "step_000001", ckpts / "step_000004")
    second = evaluate.run(cfg)
    return dict(cfg=cfg, first=first, first_report=first_report, second=second, first_ref_files=first_ref_files,
                ref_cache=ref_cache, mtimes=mtimes, received=received, engines_left=engines_left)


@contextlib.contextmanager
def _driver_spy():
    """Records every value the driver gets back from Ray (`ray.get`), and fails any Parquet read in the driver:
    the samples are read and written by the workers only."""
    received, real_get = [], ray.get

    def get(refs, *args, **kwargs):
        out = real_get(refs, *args, **kwargs)
        received.extend(out if isinstance(refs, list) else [out])
        return out

    def no_read(*args, **kwargs):
        raise AssertionError(f"the driver read a Parquet file: {args[:2]}")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "get", get)
        mp.setattr(pq, "read_table", no_read)
        mp.setattr(Store, "read_parquet", no_read)
        mp.setattr(pq.ParquetFile, "read_row_group", no_read)
        yield received


def _samples(result, name: str):
    return pq.read_table(Path(result.eval_dir) / name / "samples.parquet")


def _prompts(result) -> pa.Table:
    """The prompts the stage tokenized (its prompt files), with their global index."""
    manifest = json.loads((Path(result.eval_dir) / "prompts" / "manifest.json").read_text())
    return read_prompts(Prompts.from_dict(manifest["prompts"]))


def test_the_driver_gets_counts_and_aggregates_never_samples(scenario):
    """Run 1 (3 targets of 12 samples, in chunks of up to 4 prompts) went with the driver reading no Parquet file
    (the spy fails any read) and getting back only small values: chunk counts, content keys, per-chunk
    statistics."""
    received = scenario["received"]
    kinds = {type(x).__name__ for x in received}
    assert {"dict", "tuple", "ChunkStats"} <= kinds, kinds
    assert not [x for x in received if isinstance(x, (pa.Table, pa.RecordBatch, np.ndarray, list))]
    assert max(len(pickle.dumps(x)) for x in received) < 1024
    stats = [x for x in received if isinstance(x, ChunkStats)]
    assert len(stats) >= 6 and sum(s.samples for s in stats) == 36  # 3 targets x 6 prompts x 2 samples


def test_broken_checkpoint_fails_alone_with_its_reason(scenario):
    first = scenario["first"]
    assert [f["name"] for f in first.failures] == ["step_000003"]
    assert "corrupt weights file model.safetensors" in first.failures[0]["error"], \
        first.failures[0]["error"]
    assert "\n" not in first.failures[0]["error"]
    assert sorted(first.evaluated) == ["reference", "step_000001", "step_000002"]
    assert "step_000003" in scenario["first_report"].split("## Failed")[1]


def test_no_engine_process_outlives_its_actor(scenario):
    """The first run's engines (engine cores in processes of their own, as users run them: several targets on 2
    actors, one failing) are shut down before their actors are killed, and none is left when the run returns: a
    vLLM process left behind keeps its GPU memory."""
    assert scenario["engines_left"] == []


def test_checkpoints_of_one_architecture_share_an_engine(scenario):
    # Two actors (eval.num_actors=2) start with the first two targets; the next two are swapped into them (the
    # broken one fails in the swap, which ends its actor).
    assert scenario["first"].engine_starts == 2
    assert scenario["second"].engine_starts == 1


def test_third_checkpoint_added_incrementally(scenario):
    second, eval_dir = scenario["second"], Path(scenario["second"].eval_dir)
    assert second.evaluated == ["step_000004"]
    assert sorted(second.reused) == ["reference", "step_000001", "step_000002"]
    assert second.failures == []
    for name, mtime in scenario["mtimes"].items():  # not rewritten
        assert (eval_dir / name / "result.json").stat().st_mtime_ns == mtime
    assert [r["name"] for r in second.rows] == ["reference", "step_000001", "step_000002", "step_000004"]
    summary = json.loads((eval_dir / "summary.json").read_text())
    assert [c["step"] for c in summary["checkpoints"]] == [0, 1, 2, 4]
    assert summary["failures"] == []
    for plot in ("reward_vs_kl.png", "reward_vs_step.png", "win_rate_vs_step.png", "kl_vs_step.png"):
        assert (eval_dir / plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    lines = [ln for ln in (eval_dir / "report.md").read_text().splitlines() if ln.startswith("| step_0")]
    assert [ln.split("|")[1].strip() for ln in lines] == ["step_000001", "step_000002", "step_000004"]


def test_same_seed_same_samples_and_reference_logps_reused(scenario):
    second = scenario["second"]
    a, b = _samples(second, "step_000001"), _samples(second, "step_000004")
    assert a.column("completion_ids").to_pylist() == b.column("completion_ids").to_pylist()
    np.testing.assert_allclose(a.column("logp").to_numpy(), b.column("logp").to_numpy(), atol=1e-5)
    # Same token sequences -> the reference log-probs came from the content-addressed cache.
    assert sorted(p.name for p in scenario["ref_cache"].iterdir()) == scenario["first_ref_files"]
    c = _samples(second, "step_000002")
    assert a.column("completion_ids").to_pylist() != c.column("completion_ids").to_pylist()


def test_kl_of_the_reference_against_itself_is_zero(scenario):
    t = _samples(scenario["first"], "reference")
    assert len(t) == 12  # 6 prompts x 2 samples
    np.testing.assert_allclose(t.column("kl").to_numpy(), 0.0, atol=2e-3)
    row = scenario["second"].rows[0]
    assert row["name"] == "reference" and abs(row["kl_mean"]) < 1e-3
    assert row["win_rate"] == 0.5 and row["pref_accuracy"] is None


@pytest.mark.parametrize("name", ["step_000001", "step_000002"])  # a fresh engine; weights swapped into one
def test_logps_and_kl_equal_independent_forwards(scenario, tiny_model, name):
    cfg = scenario["cfg"]
    t = _samples(scenario["first"], name)
    ids = _prompts(scenario["first"]).column("prompt_input_ids").to_pylist()
    seqs = [ids[p] + c for p, c in zip(t.column("prompt_index").to_pylist(), t.column("completion_ids").to_pylist())]
    starts = [len(ids[p]) for p in t.column("prompt_index").to_pylist()]
    policy = _seq_logps(str(Path(cfg.run_dir) / "checkpoints" / name), seqs, starts)
    ref = _seq_logps(str(tiny_model), seqs, starts)
    np.testing.assert_allclose(t.column("logp").to_numpy(), policy, atol=1e-3)
    np.testing.assert_allclose(t.column("ref_logp").to_numpy(), ref, atol=1e-3)
    np.testing.assert_allclose(t.column("kl").to_numpy(), policy - ref, atol=2e-3)
    lengths = np.array([len(c) for c in t.column("completion_ids").to_pylist()])
    assert lengths.max() <= 8 and lengths.min() >= 1


def test_custom_reward_callable_scores_the_completions(scenario):
    t = _samples(scenario["first"], "step_000002")
    expected = [c.count("e") for c in t.column("completion").to_pylist()]
    assert t.column("reward").to_pylist() == expected
    row = next(r for r in scenario["second"].rows if r["name"] == "step_000002")
    assert row["reward_mean"] == pytest.approx(np.mean(expected))
    base = _samples(scenario["first"], "reference").column("reward").to_numpy()
    wins = np.where(np.array(expected) > base, 1.0, np.where(np.array(expected) == base, 0.5, 0.0))
    assert row["win_rate"] == pytest.approx(wins.mean())


def test_preference_accuracy_equals_the_implicit_reward_formula(scenario, tiny_model):
    cfg = scenario["cfg"]
    eval_cache = cache.run(cfg)[1]
    pairs = read_cache(eval_cache)
    prompts = pairs.column("prompt_input_ids").to_pylist()
    logps = {}
    for side in ("chosen", "rejected"):
        seqs = [p + r for p, r in zip(prompts, pairs.column(f"{side}_input_ids").to_pylist())]
        logps[side] = _seq_logps(str(Path(cfg.run_dir) / "checkpoints" / "step_000002"), seqs,
                                 [len(p) for p in prompts])
    beta = cfg.train.reward_beta
    margins = beta * ((logps["chosen"] - pairs.column("ref_chosen_logps").to_numpy())
                      - (logps["rejected"] - pairs.column("ref_rejected_logps").to_numpy()))
    row = next(r for r in scenario["second"].rows if r["name"] == "step_000002")
    assert row["pref_pairs"] == len(pairs)
    assert row["pref_accuracy"] == pytest.approx(float((margins > 0).mean()))
    assert row["pref_margin_mean"] == pytest.approx(float(margins.mean()), abs=1e-4)


def test_changed_reward_rescores_without_sampling_again(scenario):
    """Last in this module: it rewrites the results the tests above read. A new reward changes every target's
    key but not its sampling key: the samples on disk are rescored, no engine starts."""
    eval_dir = Path(scenario["second"].eval_dir)
    names = ["reference", "step_000001", "step_000002", "step_000004"]
    sampled = {n: (eval_dir / n / "sampled.parquet").stat().st_mtime_ns for n in names}
    cfg = scenario["cfg"].model_copy(deep=True)
    cfg.eval.reward.kwargs = {"char": "a"}
    third = evaluate.run(cfg)
    assert sorted(third.evaluated) == names and third.reused == []
    assert third.engine_starts == 0
    assert {n: (eval_dir / n / "sampled.parquet").stat().st_mtime_ns for n in names} == sampled
    t = _samples(third, "step_000002")
    assert t.column("reward").to_pylist() == [c.count("a") for c in t.column("completion").to_pylist()]
    assert [r["name"] for r in third.rows] == names  # the report holds the current settings' results only


def test_win_rate_against_the_datasets_chosen_responses(scenario, tiny_model):
    """After the test above (reward: count of 'a'). The baseline is not part of a target's key: switching it only
    rewrites the report, with the chosen responses scored by the same reward."""
    cfg = scenario["cfg"].model_copy(deep=True)
    cfg.eval.reward.kwargs = {"char": "a"}
    cfg.eval.win_rate_baseline = "chosen"
    result = evaluate.run(cfg)
    assert result.evaluated == [] and len(result.reused) == 4
    tok = load_tokenizer(str(tiny_model))
    prompts = _prompts(result)
    chosen = np.array([tok.decode(c, skip_special_tokens=True).count("a")
                       for c in prompts.column("chosen_input_ids").to_pylist()])
    for row in result.rows:
        t = _samples(result, row["name"])
        mine = np.array(t.column("reward").to_pylist())
        base = chosen[t.column("prompt_index").to_numpy()]
        expected = np.where(mine > base, 1.0, np.where(mine == base, 0.5, 0.0)).mean()
        assert row["win_rate"] == pytest.approx(expected), row["name"]
