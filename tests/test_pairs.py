"""Pair generation (stages/pairs.py): the rules that pick pairs (fast), and the stage on the tiny model with vLLM:
every pair ranked by its reward, provenance columns right, a crash mid-sampling resumes at the first chunk not
written, a rerun samples nothing, a changed margin pairs again from the saved samples."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.data.models import load_tokenizer
from pipeline.data.rows import tokenize_rows
from pipeline.engines.actors import SAMPLED
from pipeline.engines.chunks import PROMPTS, PromptFile, SampledChunk, write_table
from pipeline.faults import InjectedFault
from pipeline.onpolicy.pairs import PairSettings, all_pairs, best_worst, pair_chunk
from pipeline.store.checkpoints import checkpoint_hash
from stages import pairs
from tests.conftest import DATA, make_config
from tests.faults.helpers import fault


def test_best_worst_takes_the_extremes_and_drops_ties_and_small_gaps():
    assert best_worst([1.0, 3.0, 0.0, 3.0], 0.0) == [(1, 2)]  # the first of equal bests, the first of equal worsts
    assert best_worst([2.0, 2.0, 2.0], 0.0) == []  # all tied: no pair
    assert best_worst([1.0, 1.5], 0.5) == [] and best_worst([1.0, 1.6], 0.5) == [(1, 0)]  # gap must exceed margin
    assert best_worst([1.0], 0.0) == []


def test_all_pairs_takes_every_two_that_differ_by_more_than_the_margin():
    assert all_pairs([1.0, 3.0, 0.0, 3.0], 0.0) == [(1, 0), (0, 2), (3, 0), (1, 2), (3, 2)]  # (1, 3) tie dropped
    assert all_pairs([1.0, 3.0, 0.0], 1.5) == [(1, 0), (1, 2)]  # (0, 2) differ by 1 only


def test_a_chunk_of_text_prompts_gives_standard_rows_and_the_reward_sees_each_prompt_as_its_row_holds_it(
        tokenizer, tmp_path):
    """pair_chunk without Ray: text prompts give `standard` rows; cut and unusable completions are dropped and
    counted; the reward gets the prompts' text and their sources."""
    prompt_file = str(tmp_path / "prompts.parquet")
    write_table(prompt_file, pa.table({"id": ["a", "b"], "prompt_input_ids": [[1, 2], [1, 3]],
                                       "chosen_input_ids": [None, None], "prompt": ["Q1", "Q2"],
                                       "prompt_source": [json.dumps("Q1"), json.dumps("Q2")]}, schema=PROMPTS))
    words = {"good": tokenizer.encode(" good film", add_special_tokens=False),
             "bad": tokenizer.encode(" bad", add_special_tokens=False),
             "ctrl": tokenizer.encode("\x03oops", add_special_tokens=False)}
    samples = [(0, 0, "good", "stop"), (0, 1, "bad", "stop"), (0, 2, "good", "length"), (1, 0, "ctrl", "stop"),
               (1, 1, "bad", "stop")]
    sampled = pa.table({"prompt_index": [p for p, *_ in samples], "sample_index": [k for _, k, *_ in samples],
                        "completion_ids": [words[w] for *_, w, _ in samples],
                        "token_logps": [[0.0] * len(words[w]) for *_, w, _ in samples],
                        "finish_reason": [f for *_, f in samples]}, schema=SAMPLED)
    pq.write_table(sampled, tmp_path / "sampled.parquet")
    seen = []

    def reward(prompts, completions, sources=None):
        seen.append((prompts, sources))
        return [len(c.split()) for c in completions]

    settings = PairSettings("best_worst", 0.0, False, "abc", json.dumps({"seed": 0}))
    counts = pair_chunk(reward, SampledChunk("policy", str(tmp_path / "sampled.parquet"), 0),
                        [PromptFile(prompt_file, 0, 2)], tokenizer, str(tmp_path / "out.parquet"), settings)
    assert (counts.samples, counts.truncated, counts.unusable, counts.scored, counts.pairs, counts.no_pair) == \
        (5, 1, 1, 3, 1, 1)
    assert seen == [(["Q1", "Q1", "Q2"], ["Q1", "Q1", "Q2"])]
    (row,) = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert {k: row[k] for k in ("id", "prompt", "chosen", "rejected", "chosen_reward", "rejected_reward")} == \
        {"id": "a-0-1", "prompt": "Q1", "chosen": " good film", "rejected": " bad", "chosen_reward": 2.0,
         "rejected_reward": 1.0}
    assert row["model_sha256"] == "abc" and json.loads(row["sampling"]) == {"seed": 0}


def test_pairs_without_a_reward_is_a_one_line_user_error(tiny_model, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["pairs", "configs/tiny.yaml", f"model.path={tiny_model}", f"run_dir={tmp_path}",
                 "eval.reward=null"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: pair generation needs a reward") and err.count("\n") == 1


class _Recorder:
    """A progress factory that records each bar's updates."""

    def __init__(self):
        self.bars: dict[str, list[int]] = {}

    def __call__(self, total, desc, unit):
        updates = self.bars.setdefault(desc, [])

        class Bar:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                return False

            def update(self, n=1):
                updates.append(n)
        return Bar()


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.extended  # (3 engine starts: `make test-extended`, which CI runs)
def test_pairs_are_ranked_with_provenance_resume_after_a_crash_and_are_not_sampled_again(tiny_model, tmp_path,
                                                                                        ray_local, monkeypatch):
    pytest.importorskip("vllm")
    cfg = make_config(tiny_model, tmp_path, "pairs.num_prompts=6", "pairs.batch_prompts=2",
                      "pairs.samples_per_prompt=3", "pairs.max_new_tokens=12", "pairs.keep_truncated=true",
                      "pairs.engine_kwargs={enforce_eager: true}", "pairs.reward={type: rule, rule: length}",
                      "pairs.rule=all_pairs", data=DATA / "conversational.jsonl")
    out = Path(cfg.run_dir) / "pairs"

    # 1. The driver dies once the first chunk (2 prompts) is written.
    monkeypatch.setenv("DPO_PIPELINE_FAULT", fault("eval_chunk_sampled", tmp_path / "t1", action="raise"))
    with pytest.raises(InjectedFault):
        pairs.run(cfg)
    assert len(list((out / "samples" / "sampled-parts").rglob("*.parquet"))) == 1
    monkeypatch.delenv("DPO_PIPELINE_FAULT")

    # 2. The rerun counts that chunk as done (its 2 × 3 samples) and samples the other two.
    bars = _Recorder()
    r = pairs.run(cfg, progress_factory=bars)
    assert not r.reused and bars.bars["sampling (vLLM)"] == [6, 6, 6]
    assert r.counts["prompts"] == 6 and r.counts["samples"] == 18 and r.counts["pairs"] > 0
    rows = pq.read_table(r.dataset).to_pylist()
    assert len(rows) == r.counts["pairs"] and len({row["id"] for row in rows}) == len(rows)

    # Ranked by the reward (`length`: words of the completion), recomputed here from the texts.
    lines = (DATA / "conversational.jsonl").read_text().splitlines()
    source = {str(i): json.loads(line) for i, line in enumerate(lines)}
    sampled = pq.read_table(out / "samples" / "sampled.parquet")
    assert len(sampled) == 18
    for row in rows:
        chosen, rejected = row["chosen"][0]["content"], row["rejected"][0]["content"]
        assert row["chosen"][0]["role"] == row["rejected"][0]["role"] == "assistant"
        assert row["chosen_reward"] == len(chosen.split()) and row["rejected_reward"] == len(rejected.split())
        assert row["chosen_reward"] > row["rejected_reward"]
        assert row["model_sha256"] == checkpoint_hash(str(tiny_model))
        assert json.loads(row["sampling"]) == {"samples_per_prompt": 3, "temperature": 1.0, "top_p": 1.0,
                                               "max_new_tokens": 12, "seed": 0}
        src = source[row["prompt_id"]]
        expected = src["prompt"] if "prompt" in src else src["chosen"][:len(row["prompt"])]
        assert row["prompt"] == expected and row["prompt"][-1]["role"] == "user"
        assert row["id"] == f"{row['prompt_id']}-{row['chosen_sample']}-{row['rejected_sample']}"
    # The dataset reads as conversational preference data, as the cache would read it: no row is rejected (the
    # random tiny model's completions that hold control characters, which a row cannot, are dropped and counted).
    tok = load_tokenizer(str(tiny_model))
    items, rejects = tokenize_rows(list(enumerate(rows)), tok, "auto", 512, 256, "\n\nAssistant:")
    assert len(items) == len(rows) and not rejects
    assert r.counts["unusable"] > 0 and r.counts["scored"] == 18 - r.counts["unusable"]

    # 3. A rerun with the same inputs does nothing; a changed margin pairs again from the saved samples.
    stamp = (out / "samples" / "sampled.parquet").stat().st_mtime_ns
    again = pairs.run(cfg, progress_factory=_Recorder())
    assert again.reused and again.counts == r.counts
    wider = pairs.run(make_config(tiny_model, tmp_path, *_overrides(cfg), "pairs.margin=1",
                                  data=DATA / "conversational.jsonl"), progress_factory=(bars := _Recorder()))
    assert not wider.reused and "sampling (vLLM)" not in bars.bars
    assert (out / "samples" / "sampled.parquet").stat().st_mtime_ns == stamp
    assert all(row["chosen_reward"] - row["rejected_reward"] > 1 for row in pq.read_table(wider.dataset).to_pylist())
    assert wider.counts["pairs"] < r.counts["pairs"]


def _overrides(cfg) -> list[str]:
    return ["pairs.num_prompts=6", "pairs.batch_prompts=2", "pairs.samples_per_prompt=3", "pairs.max_new_tokens=12",
            "pairs.keep_truncated=true", "pairs.engine_kwargs={enforce_eager: true}",
            "pairs.reward={type: rule, rule: length}", "pairs.rule=all_pairs"]
