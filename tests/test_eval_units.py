"""Stage 3 without engines: checkpoint selection, seeds, preference accuracy, error lines, prompt tokenization."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline.data.rows import tokenize_prompts
from pipeline.data.sources import Reject
from pipeline.engines.actors import RewardRunner, sample_seed
from pipeline.engines.chunks import (
    PROMPTS,
    PromptFile,
    concat_files,
    prompt_rows,
    read_metadata,
    sampled_chunks,
    write_table,
)
from pipeline.engines.rewards import build_reward
from pipeline.errors import UserError, error_line
from pipeline.evaluation import sampling, targets
from pipeline.evaluation.inputs import Prompts
from pipeline.evaluation.reference import EngineBase
from pipeline.evaluation.report import standard_error
from pipeline.evaluation.summary import Moments, preference_metrics
from pipeline.store.storage import Store
from stages.evaluate import select_targets
from tests.conftest import make_config
from tests.fake_engines import StandInEngine
from tests.test_rewards import save_reward_model


@pytest.fixture
def run(tiny_model, tmp_path):
    """A run dir with checkpoints step 1..5, an unfinished export and a directory without config.json."""
    ckpts = tmp_path / "run" / "checkpoints"
    for step in range(1, 6):
        (ckpts / f"step_{step:06d}").mkdir(parents=True)
        (ckpts / f"step_{step:06d}" / "config.json").write_text("{}")
    (ckpts / ".tmp-step_000006-x").mkdir()
    (ckpts / "step_000007").mkdir()  # no config.json: not a complete export

    def select(*overrides):
        return select_targets(make_config(tiny_model, tmp_path, *overrides))
    return select, ckpts


@pytest.mark.parametrize("selection, steps", [
    ("all", [1, 2, 3, 4, 5]),
    ("last", [5]),
    ("every:2", [2, 4, 5]),  # every second, and the last
    ("every:5", [5]),
    ("every:7", [5]),
])
def test_selection_of_run_checkpoints(run, selection, steps):
    select, _ = run
    targets = select(f"eval.checkpoints={selection}")
    assert targets[0].name == "reference" and targets[0].is_reference and targets[0].step == 0
    assert [t.step for t in targets[1:]] == steps
    assert all(t.error is None for t in targets)


def test_selection_without_reference(run):
    select, _ = run
    assert [t.name for t in select("eval.checkpoints=last", "eval.include_reference_model=false")] == ["step_000005"]


def test_explicit_paths_from_elsewhere(run, tmp_path):
    select, ckpts = run
    other = tmp_path / "elsewhere" / "step_000002"
    other.mkdir(parents=True)
    (other / "config.json").write_text("{}")
    named = tmp_path / "my-model"
    named.mkdir()
    (named / "config.json").write_text("{}")
    targets = select(f"eval.checkpoints=[{ckpts / 'step_000002'}, {other}, {named}, {tmp_path / 'nope'}, "
                     f"{ckpts / 'step_000007'}]")
    by_name = {t.name: t for t in targets}
    suffix = hashlib.sha256(str(other.resolve()).encode()).hexdigest()[:8]
    assert list(by_name) == ["reference", "step_000002", f"step_000002-{suffix}", "my-model", "nope", "step_000007"]
    assert by_name[f"step_000002-{suffix}"].step == 2 and by_name["my-model"].step is None
    assert "does not exist" in by_name["nope"].error
    assert "no config.json" in by_name["step_000007"].error
    assert by_name["step_000002"].error is None


def test_no_checkpoints_is_a_user_error(tiny_model, tmp_path):
    with pytest.raises(UserError, match="no checkpoints in .*train first"):
        select_targets(make_config(tiny_model, tmp_path, "eval.checkpoints=all"))


def test_sample_seed_depends_on_seed_and_index_only():
    seeds = [sample_seed(0, i) for i in range(1000)]
    assert seeds == [sample_seed(0, i) for i in range(1000)]
    assert len(set(seeds)) == 1000 and all(0 <= s < 2**31 for s in seeds)
    assert sample_seed(1, 0) != sample_seed(0, 0)


def test_preference_metrics_hand_worked():
    # margins = β ((πc − rc) − (πr − rr)) = 0.5 * [(−1 − −2) − (−3 − −3), (−4 − −2) − (−1 − −2), (0 − 0) − (0 − 0)]
    #         = [0.5, −1.5, 0]; a tie is not a win.
    m = preference_metrics(np.array([-1.0, -4.0, 0.0]), np.array([-3.0, -1.0, 0.0]), np.array([-2.0, -2.0, 0.0]),
                           np.array([-3.0, -2.0, 0.0]), beta=0.5)
    assert m == {"pref_accuracy": pytest.approx(1 / 3), "pref_margin_mean": pytest.approx(-1 / 3), "pref_pairs": 3}
    assert preference_metrics([], [], np.array([]), np.array([]), 0.1)["pref_accuracy"] is None


def test_error_line_takes_the_innermost_error():
    class Wrapped(Exception):
        def __init__(self, cause):
            super().__init__("the actor died\n  Traceback ...\nRuntimeError: outer\n  more\nValueError: corrupt x")
            self.cause = None
    assert error_line(Wrapped(None)) == "ValueError: corrupt x"
    assert error_line(RuntimeError("boom")) == "RuntimeError: boom"
    assert "\n" not in error_line(RuntimeError("two\nlines"))


def _prompts(tok, rows, max_prompt_length=64):
    return tokenize_prompts(list(enumerate(rows)), tok, "auto", 128, max_prompt_length, "\n\nAssistant:")


def test_prompt_only_rows(tokenizer):
    items, rejects = _prompts(tokenizer, [
        {"prompt": "the movie was"},
        {"prompt": [{"role": "user", "content": "why do you like the film?"}]},
        {"id": "x", "prompt": "  "},
        {"text": "no prompt"},
    ])
    assert [i.index for i in items] == [0, 1] and all(i.chosen_input_ids is None for i in items)
    assert items[0].prompt_input_ids == tokenizer("the movie was")["input_ids"]
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "why do you like the film?"}],
                                             add_generation_prompt=True, tokenize=False)
    assert items[1].prompt_input_ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert [(r.index, r.reason) for r in rejects] == [(2, "empty_field"), (3, "unrecognised_format")]
    assert all(isinstance(r, Reject) for r in rejects)


def test_preference_rows_give_prompt_and_chosen(tokenizer):
    items, rejects = _prompts(tokenizer, [
        {"prompt": "the movie was", "chosen": " great", "rejected": " bad"},
        {"prompt": "the film " * 60, "chosen": " good", "rejected": " dull"},
    ], max_prompt_length=16)
    assert len(items) == 1 and [r.reason for r in rejects] == ["prompt_too_long"]
    assert items[0].prompt_input_ids == tokenizer("the movie was")["input_ids"]
    assert items[0].chosen_input_ids == tokenizer(" great", add_special_tokens=False)["input_ids"] + \
        [tokenizer.eos_token_id]


def _score(reward, prompts, completions):
    """Run beside the reward (in its actor): what a chunk's rewards are computed with."""
    return reward(prompts, completions)


@pytest.mark.ray
def test_reward_model_runs_in_a_ray_actor_with_the_same_values(tiny_model, tmp_path, ray_local):
    rm = save_reward_model(tmp_path / "rm", tiny_model, num_labels=1)
    cfg = make_config(tiny_model, tmp_path, "eval.reward.type=model", f"eval.reward.model={rm}")
    runner = RewardRunner(cfg.eval.reward)
    try:
        prompts, completions = ["the movie was", "the film"], [" great", " boring and dull"]
        got = ray.get(runner.run(_score, prompts, completions))
    finally:
        runner.close()
    np.testing.assert_allclose(got, build_reward(cfg.eval.reward)(prompts, completions), atol=1e-6)
    assert got.dtype == np.float64 and len(got) == 2


@pytest.mark.ray
def test_reward_model_config_errors_surface_as_one_line(tiny_model, tmp_path, ray_local):
    rm = save_reward_model(tmp_path / "rm2", tiny_model, id2label={0: "NEGATIVE", 1: "POSITIVE"})
    cfg = make_config(tiny_model, tmp_path, "eval.reward.type=model", f"eval.reward.model={rm}")
    with pytest.raises(UserError, match="set eval.reward.label"):
        RewardRunner(cfg.eval.reward)


def test_chunk_statistics_merge_to_those_of_all_values():
    """A target's mean and standard error come from per-chunk Moments: equal to numpy over all values at once,
    whatever the chunking (including empty chunks)."""
    rng = np.random.default_rng(0)
    values = rng.normal(0.3, 2.0, 1001)
    for cuts in ([500], [1, 2, 3, 700], [0, 0, 1000], []):
        merged = Moments()
        for part in np.split(values, cuts):
            merged = merged.merge(Moments.of(part))
        assert merged.n == len(values)
        assert merged.mean == pytest.approx(values.mean(), rel=1e-12)
        assert merged.standard_error == pytest.approx(standard_error(values), rel=1e-10)
    assert Moments.of(values[:1]).standard_error is None


def _chunk_files_round_trip(root: str) -> None:
    files = []
    for i, rows in enumerate((3, 0, 4)):
        uri = f"{root}/prompts/{i}.parquet"
        first = sum(f.rows for f in files)
        write_table(uri, pa.table({"id": [f"r{first + k}" for k in range(rows)],
                                   "prompt_input_ids": [[first + k] for k in range(rows)],
                                   "chosen_input_ids": [None] * rows, "prompt": [""] * rows,
                                   "prompt_source": ["\"\""] * rows}, schema=PROMPTS),
                    {"rows": rows})
        files.append(PromptFile(uri, first, rows))
    assert read_metadata(files[2].uri) == {"rows": 4}
    got = prompt_rows(files, 2, 6, ["prompt_index", "id"])
    assert got.column("prompt_index").to_pylist() == [2, 3, 4, 5]
    assert got.column("id").to_pylist() == ["r2", "r3", "r4", "r5"]
    merged = f"{root}/sampled.parquet"
    assert concat_files([f.uri for f in files], merged) == 7
    chunks = sampled_chunks("t", merged)
    assert [len(c.read(["id"])) for c in chunks] == [3, 0, 4]  # a row group per file
    assert chunks[2].read(["id"]).column("id").to_pylist() == ["r3", "r4", "r5", "r6"]


def test_chunk_files_on_a_local_disk(tmp_path):
    """Prompt rows across files with their global index; files merged as row groups, read back as chunks."""
    _chunk_files_round_trip(str(tmp_path))


def test_chunk_files_on_s3(s3):  # noqa: F811 (the fixture imported above)
    _chunk_files_round_trip(f"{s3}/run/eval")


@pytest.mark.ray
def test_idle_engines_share_a_targets_chunks_and_sample_what_one_engine_does(tiny_model, tmp_path, ray_local,
                                                                            monkeypatch):
    """One target, 8 prompt chunks, 3 actors: the idle ones start and take chunks of it; the merged samples are
    each prompt's, once, as one engine samples them (per-prompt seeds), and every engine sampled some."""
    actors = 3
    monkeypatch.setattr(sampling, "CheckpointEngine", StandInEngine)
    cfg = make_config(tiny_model, tmp_path, f"eval.num_actors={actors}", "eval.num_cpus_per_actor=0.25",
                      "eval.samples_per_prompt=2")
    store = Store(str(tmp_path / "eval"))
    files = []
    for i in range(8):
        ids = [[5 + i, 6 + j] for j in range(3)]
        store.write_parquet(f"prompts/{i}.parquet", pa.table({"prompt_input_ids": ids}))
        files.append(PromptFile(store.path(f"prompts/{i}.parquet"), 3 * i, 3))
    prompts = Prompts(files, 24, "key", 0)
    target = targets.Target("step_000001", str(tiny_model), 1)
    job = targets.TargetJob(target, store.child("step_000001"), "s" * 16, "k" * 16)
    base = EngineBase.of(cfg.model, cfg.data, cfg.eval, cfg.ray)
    scheduler = sampling.SamplingScheduler(cfg.eval, base, prompts, None, eos=2)

    class Bar:
        n = 0

        def update(self, k):
            self.n += k
    bar = Bar()
    scheduler.run([job], bar)
    assert not scheduler.failures and scheduler.engine_starts == actors and bar.n == 48
    got = pq.read_table(tmp_path / "eval" / "step_000001" / "sampled.parquet")
    rows = sorted(zip(got.column("prompt_index").to_pylist(), got.column("sample_index").to_pylist(),
                      [c[:3] for c in got.column("completion_ids").to_pylist()]))
    want = sorted((p, k, [sample_seed(cfg.eval.seed, p) % 97, 2, k]) for p in range(24) for k in range(2))
    assert rows == want  # every prompt's samples once, as one engine samples them
    samplers = {c[3] for c in got.column("completion_ids").to_pylist()}
    assert len(samplers) == actors  # with 3 actors, all 3 engines sampled some chunks
