"""Reference-free losses (`sft`, `simpo`, `orpo`): training needs no reference cache. The driver has Ray tasks
tokenize the splits into token files (pipeline/caches/tokens.py), content-addressed under `cache_dir/tokens-<key>/`
and reused by the next run; `plan` caches no train split."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from pipeline import orchestrate
from pipeline.caches import shards, tokens
from pipeline.caches.layout import CacheSpec, resolve_inputs
from pipeline.data.lanes import PAIR_COLUMNS
from pipeline.runtime.session import connect
from pipeline.store.layout import RunLayout
from stages import train
from tests.conftest import DATA, make_config

SFT = ("train.loss.type=sft", "train.global_batch_pairs=4", "train.micro_batch_pairs=2", "train.max_steps=2",
       "train.optim.lr=1e-3", "train.log_every=1", "train.parallel.num_cpus_per_worker=1")


class Rows:
    """A progress bar that records what it was asked to count (the rows of the shards to tokenize)."""

    totals: list[int] = []

    def __init__(self, total: int, desc: str):
        Rows.totals.append(total)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n: int) -> None:
        pass


def no_bar(total: int, desc: str):
    raise AssertionError(f"{desc}: nothing should be tokenized again")


def test_plan_of_a_reference_free_loss_caches_no_train_split(tiny_model, tmp_path):
    eval_data = f"data.eval.path={DATA / 'conversational.jsonl'}"
    steps = orchestrate.plan(make_config(tiny_model, tmp_path, *SFT, eval_data), evaluate=False)
    assert [(s.stage, s.action) for s in steps] == [("tokens/train", "run"), ("cache/eval", "run"), ("train", "run")]
    assert "training tokenizes 24 rows" in steps[0].why and "reference-free loss sft" in steps[2].why
    assert not (tmp_path / "cache" / "tokens").exists()  # nothing was run
    # Without preference accuracy nothing is scored: the eval split of `train.eval_every` is tokenized too.
    steps = orchestrate.plan(make_config(tiny_model, tmp_path, *SFT, eval_data, "eval.preference_accuracy=false",
                                         "train.eval_every=1"), evaluate=False)
    assert [s.stage for s in steps] == ["tokens/train", "tokens/eval", "train"]


def training_pairs(cfg, **kwargs):
    """The training stage's call: the train split's pairs, joining Ray when token files are to be written."""
    return tokens.training_pairs(CacheSpec.of(cfg), cfg.train.needs_reference, "train",
                                 lambda: connect(cfg.ray, cfg.run_dir, cfg.shared_paths()), **kwargs)


@pytest.mark.ray
def test_token_files_count_rejects_and_resume(tiny_model, tmp_path, ray_local, monkeypatch):
    expected = json.loads((DATA / "bad_rows.expected.json").read_text())
    cfg = make_config(tiny_model, tmp_path, *SFT, "scoring.shard_size=4", data=DATA / "bad_rows.jsonl")
    prep = resolve_inputs(CacheSpec.of(cfg), "train", cfg.data.train)
    store = tokens.token_store(RunLayout.of(cfg), prep)
    Rows.totals = []

    def crash(*args):
        raise RuntimeError("killed after the shards")

    with monkeypatch.context() as m:  # every shard written, then the run dies before its manifest
        m.setattr(shards, "finish", crash)
        with pytest.raises(RuntimeError, match="killed"):
            training_pairs(cfg, progress_factory=Rows)
    assert Rows.totals == [len(expected)] and not store.exists("manifest.json")
    store.delete(shards.marker_file(1))  # shard 1 (rows 4-7) unfinished: only it is done again
    ref = training_pairs(cfg, progress_factory=Rows)
    assert Rows.totals[1:] == [4]

    manifest = store.read_json("manifest.json")
    assert ref.uri == store.uri and ref.key == prep.key  # the inputs' key (with the model) keys the training run
    assert manifest["counts"]["rejected"] == sum(e is not None for e in expected)
    assert manifest["counts"]["pairs"] == ref.pairs == expected.count(None)
    rejects = [json.loads(line) for line in Path(store.path("rejects.jsonl")).read_text().splitlines()]
    assert {r["index"]: r["reason"] for r in rejects} == {i: e for i, e in enumerate(expected) if e}
    table = pq.read_table(ref.files[0])
    assert tuple(table.column_names) == PAIR_COLUMNS  # token ids only: no reference log-probs
    assert not (Path(cfg.cache_dir) / prep.key).exists()
    assert training_pairs(cfg, progress_factory=no_bar).files == ref.files  # complete: reused


@pytest.mark.ray
def test_simpo_and_orpo_train_with_no_reference_cache(tiny_model, tmp_path, ray_local):
    free = "train.loss=[{type: simpo, beta: 2.0}, {type: orpo, weight: 0.5}]"
    cfg = make_config(tiny_model, tmp_path, *SFT, free, "train.ref_logps=in_loop", "train.eval_every=2",
                      f"data.eval.path={DATA / 'conversational.jsonl'}")
    result = train.run(cfg)
    prep = resolve_inputs(CacheSpec.of(cfg), "train", cfg.data.train)
    cache_dir = Path(cfg.cache_dir)
    assert not (cache_dir / prep.key).exists()  # no reference cache, and none was needed
    assert {p.parent.name.split("-")[0] for p in cache_dir.glob("*/manifest.json")} == {"tokens"}
    rows = [json.loads(line) for line in Path(cfg.run_dir, "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss"]) for r in rows) and math.isfinite(rows[1]["eval/loss"])
    assert rows[0]["loss"] == pytest.approx(rows[0]["loss/simpo"] + 0.5 * rows[0]["loss/orpo"], abs=1e-5)
    assert math.isfinite(rows[0]["orpo/log_odds"])
    assert [Path(c).name for c in result.checkpoints] == ["step_000002"]
    assert (Path(result.checkpoints[0]) / "config.json").exists()
    # A second run reuses the token files; `plan` finds both them and the finished training.
    assert training_pairs(cfg, progress_factory=no_bar).uri == tokens.token_store(RunLayout.of(cfg), prep).uri
    steps = orchestrate.plan(cfg, evaluate=False)
    assert [(s.stage, s.action) for s in steps] == [("tokens/train", "reuse"), ("cache/eval", "run"),
                                                    ("train", "reuse")]
