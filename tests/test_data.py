"""Preference data: formats, tokenization, truncation, rejects, and sources/shards.

Expectations are derived from the tokenizer's own primitives (encode, apply_chat_template) and from the
tokenization rules in `pipeline/data/rows.py`'s docstring, never from `tokenize_rows` output.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.config import DataSource
from pipeline.data import sources
from pipeline.data.models import load_tokenizer
from pipeline.data.rows import Pair, tokenize_rows
from pipeline.data.sources import Reject, SourcePlan, plan_source, read_shard
from pipeline.errors import UserError

DATA = Path(__file__).parent / "data"
MARKER = "\n\nAssistant:"
BOS, EOS = "<|bos|>", "<|endoftext|>"


def tok_rows(rows, tok, fmt="auto", max_length=128, max_prompt_length=64, marker=MARKER):
    """tokenize_rows on raw records, indexed from 0."""
    return tokenize_rows(list(enumerate(rows)), tok, fmt, max_length, max_prompt_length, marker)


def plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def with_bos(tok, text: str) -> list[int]:
    return tok(text).input_ids


def read_all(plan) -> list[tuple[int, object]]:
    return [r for s in plan.shards for r in read_shard(plan, s)]


def write_jsonl(path: Path, records: list, *, blank_lines: bool = False, trailing_newline: bool = True,
                newline: str = "\n") -> Path:
    parts = []
    for i, r in enumerate(records):
        if blank_lines and i % 3 == 0:
            parts.append("" if i % 2 else "   \t")  # empty and whitespace-only lines are not rows
        parts.append(json.dumps(r))
    text = newline.join(parts) + (newline if trailing_newline else "")
    path.write_bytes(text.encode())
    return path


def standard_records(n: int) -> list[dict]:
    return [{"id": f"r{i}", "prompt": f"question {i}?", "chosen": f"good answer {i}.", "rejected": f"bad {i}."}
            for i in range(n)]


# ---------------------------------------------------------------- tokenizer sanity (the fixture the rules rely on)


def test_tiny_tokenizer_conventions(tokenizer):
    ids = with_bos(tokenizer, "how was it?")
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.convert_ids_to_tokens(ids[0]) == BOS
    assert tokenizer.eos_token == EOS
    assert plain(tokenizer, "how was it?")[0] != tokenizer.bos_token_id


# ---------------------------------------------------------------- standard


def test_standard_rows(tokenizer):
    rows = [
        {"prompt": "how was the movie?", "chosen": "The movie was great.", "rejected": "The movie was dull."},
        {"prompt": "why do you like it?", "chosen": "The music.", "rejected": "I do not."},
    ]
    pairs, rejects = tok_rows(rows, tokenizer, "standard")
    assert rejects == []
    assert [p.index for p in pairs] == [0, 1]
    eos = tokenizer.eos_token_id
    for p, row in zip(pairs, rows):
        assert p.prompt_input_ids == tokenizer(row["prompt"]).input_ids
        assert p.prompt_input_ids[0] == tokenizer.bos_token_id
        assert p.chosen_input_ids == plain(tokenizer, row["chosen"]) + [eos]
        assert p.rejected_input_ids == plain(tokenizer, row["rejected"]) + [eos]
        assert tokenizer.bos_token_id not in p.chosen_input_ids + p.rejected_input_ids
        # one EOS, at the end
        assert p.chosen_input_ids.count(eos) == 1 and p.rejected_input_ids.count(eos) == 1


def test_standard_same_result_with_auto(tokenizer):
    rows = [{"prompt": "how was it?", "chosen": "Great.", "rejected": "Dull."}]
    (a,), _ = tok_rows(rows, tokenizer, "standard")
    (b,), _ = tok_rows(rows, tokenizer, "auto")
    assert a == b


def test_row_ids(tokenizer):
    base = {"prompt": "how was it?", "chosen": "Great.", "rejected": "Dull."}
    rows = [{**base, "id": "abc"}, {**base, "id": 7}, dict(base), {**base, "id": None},
            {**base, "id": True}, {**base, "id": "  "}, {**base, "id": [1]}]
    pairs, rejects = tok_rows(rows, tokenizer)
    assert {p.index: p.id for p in pairs} == {0: "abc", 1: "7", 2: "2", 3: "3"}
    assert {r.index: r.reason for r in rejects} == {4: "bad_id", 5: "bad_id", 6: "bad_id"}


def test_standard_file(tokenizer, tmp_path):
    plan = plan_source(DataSource(path=str(DATA / "standard.jsonl")), 8, tmp_path)
    rows = read_all(plan)
    raw = [json.loads(line) for line in (DATA / "standard.jsonl").read_text().splitlines() if line.strip()]
    assert [r for _, r in rows] == raw
    pairs, rejects = tokenize_rows(rows, tokenizer, "auto", 128, 64, MARKER)
    assert len(pairs) + len(rejects) == len(raw)
    for p in pairs:
        assert p.prompt_input_ids == with_bos(tokenizer, raw[p.index]["prompt"])


# ---------------------------------------------------------------- conversational


def _assistant_tail(tok, ids: list[int], content: str) -> None:
    assert tok.decode(ids, skip_special_tokens=False) == content + EOS
    assert ids[-1] == tok.eos_token_id
    assert ids.count(tok.eos_token_id) == 1  # the template's end of turn; nothing appended


def test_conversational_with_prompt(tokenizer):
    prompt = [{"role": "system", "content": "you are a critic."}, {"role": "user", "content": "how was the film?"}]
    row = {"prompt": prompt,
           "chosen": [{"role": "assistant", "content": "The film was great."}],
           "rejected": [{"role": "assistant", "content": "The film was dull."}]}
    (p,), rejects = tok_rows([row], tokenizer, "conversational")
    assert rejects == []
    text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    # hand-rendered with the tiny template
    assert text == f"{BOS}<|system|>you are a critic.{EOS}<|user|>how was the film?{EOS}<|assistant|>"
    assert p.prompt_input_ids == plain(tokenizer, text)
    assert p.prompt_input_ids.count(tokenizer.bos_token_id) == 1  # BOS from the template only, not doubled
    _assistant_tail(tokenizer, p.chosen_input_ids, "The film was great.")
    _assistant_tail(tokenizer, p.rejected_input_ids, "The film was dull.")


def test_conversational_prompt_repeated_in_responses(tokenizer):
    """Some datasets repeat the prompt at the start of chosen/rejected: the result must be the same."""
    prompt = [{"role": "user", "content": "how was the film?"}]
    c = [{"role": "assistant", "content": "Great."}]
    r = [{"role": "assistant", "content": "Dull."}]
    (a, b), rejects = tok_rows([{"prompt": prompt, "chosen": c, "rejected": r},
                                {"prompt": prompt, "chosen": prompt + c, "rejected": prompt + r}], tokenizer)
    assert rejects == []
    assert (a.prompt_input_ids, a.chosen_input_ids, a.rejected_input_ids) == \
           (b.prompt_input_ids, b.chosen_input_ids, b.rejected_input_ids)


def test_conversational_without_prompt_uses_common_prefix(tokenizer):
    u1 = {"role": "user", "content": "why do you like the ending?"}
    a1 = {"role": "assistant", "content": "The film was moving."}
    u2 = {"role": "user", "content": "and the plot?"}
    row = {"chosen": [u1, a1, u2, {"role": "assistant", "content": "The plot was great."}],
           "rejected": [u1, a1, u2, {"role": "assistant", "content": "The plot was dull. Very dull."}]}
    (p,), rejects = tok_rows([row], tokenizer, "auto")
    assert rejects == []
    expected_prompt = (f"{BOS}<|user|>why do you like the ending?{EOS}<|assistant|>The film was moving.{EOS}"
                       f"<|user|>and the plot?{EOS}<|assistant|>")
    assert tokenizer.apply_chat_template([u1, a1, u2], add_generation_prompt=True, tokenize=False) == \
           expected_prompt
    assert p.prompt_input_ids == plain(tokenizer, expected_prompt)
    _assistant_tail(tokenizer, p.chosen_input_ids, "The plot was great.")
    _assistant_tail(tokenizer, p.rejected_input_ids, "The plot was dull. Very dull.")


def test_conversational_ultrafeedback_style(tokenizer):
    """ultrafeedback_binarized: `prompt` is a string, chosen/rejected are whole conversations."""
    user = {"role": "user", "content": "tell me about the actor?"}
    row = {"prompt": "tell me about the actor?",
           "chosen": [user, {"role": "assistant", "content": "The actor was superb."}],
           "rejected": [user, {"role": "assistant", "content": "The actor was weak."}]}
    (p,), rejects = tok_rows([row], tokenizer, "auto")
    assert rejects == []
    assert p.prompt_input_ids == plain(tokenizer, f"{BOS}<|user|>tell me about the actor?{EOS}<|assistant|>")
    _assistant_tail(tokenizer, p.chosen_input_ids, "The actor was superb.")
    _assistant_tail(tokenizer, p.rejected_input_ids, "The actor was weak.")


def test_conversational_file(tokenizer, tmp_path):
    plan = plan_source(DataSource(path=str(DATA / "conversational.jsonl")), 5, tmp_path)
    rows = read_all(plan)
    pairs, rejects = tokenize_rows(rows, tokenizer, "conversational", 128, 64, MARKER)
    assert len(pairs) + len(rejects) == plan.num_rows
    assert len(pairs) > 0
    raw = dict(rows)
    for p in pairs:
        row = raw[p.index]
        if isinstance(row.get("prompt"), list):
            prompt = row["prompt"]
        else:
            n = 0
            while row["chosen"][n] == row["rejected"][n]:
                n += 1
            prompt = row["chosen"][:n]
        text = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
        assert p.prompt_input_ids == plain(tokenizer, text)
        assert p.chosen_input_ids[-1] == tokenizer.eos_token_id
        assert p.chosen_input_ids.count(tokenizer.eos_token_id) == 1


@pytest.mark.parametrize("row, reason", [
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "a"}]}, "chosen_equals_rejected"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "y"}]}, "empty_field"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "user", "content": "x"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "bad_message"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant"}],
      "rejected": [{"role": "assistant", "content": "y"}]}, "bad_message"),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": "text",
      "rejected": [{"role": "assistant", "content": "y"}]}, "wrong_type"),
    ({"chosen": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "x"}],
      "rejected": [{"role": "user", "content": "a"}]}, "empty_response"),
])
def test_conversational_rejects(tokenizer, row, reason):
    pairs, rejects = tok_rows([row], tokenizer)
    assert pairs == []
    assert [(r.index, r.reason) for r in rejects] == [(0, reason)]
    assert rejects[0].row == row


def test_chat_template_failure_is_a_row_reject(tmp_path, tokenizer):
    """A template that raises on some rows rejects those rows (chat_template_error), not the run."""
    strict = ("{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system') }}{% endif %}"
              "<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
              "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    tok = load_tokenizer(tokenizer.name_or_path, strict)
    ok = {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
          "rejected": [{"role": "assistant", "content": "b"}]}
    bad = {**ok, "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "hi"}]}
    pairs, rejects = tok_rows([ok, bad], tok)
    assert [p.index for p in pairs] == [0]
    assert [(r.index, r.reason) for r in rejects] == [(1, "chat_template_error")]
    assert pairs[0].prompt_input_ids == plain(tokenizer, "<|user|>hi<|endoftext|><|assistant|>")


# ---------------------------------------------------------------- implicit


def test_implicit_single_turn(tokenizer):
    row = {"chosen": "\n\nHuman: how was it?\n\nAssistant: The movie was great.",
           "rejected": "\n\nHuman: how was it?\n\nAssistant: The film was dull."}
    (p,), rejects = tok_rows([row], tokenizer, "implicit")
    assert rejects == []
    eos = tokenizer.eos_token_id
    assert p.prompt_input_ids == with_bos(tokenizer, "\n\nHuman: how was it?\n\nAssistant:")
    assert p.chosen_input_ids == plain(tokenizer, " The movie was great.") + [eos]
    assert p.rejected_input_ids == plain(tokenizer, " The film was dull.") + [eos]


def test_implicit_prompt_ends_after_last_marker_of_common_prefix(tokenizer):
    # The common prefix holds two "\n\nAssistant:" markers and runs a few characters into the final assistant
    # turn ("The story was rather "): the prompt must stop right after the second marker.
    head = "\n\nHuman: tell me about the actor?\n\nAssistant: The story was great.\n\nHuman: and the plot?" \
           "\n\nAssistant:"
    row = {"chosen": head + " The story was rather wonderful.", "rejected": head + " The story was rather dull."}
    assert head.count(MARKER) == 2
    (p,), rejects = tok_rows([row], tokenizer, "implicit")
    assert rejects == []
    eos = tokenizer.eos_token_id
    assert p.prompt_input_ids == with_bos(tokenizer, head)
    assert p.chosen_input_ids == plain(tokenizer, " The story was rather wonderful.") + [eos]
    assert p.rejected_input_ids == plain(tokenizer, " The story was rather dull.") + [eos]
    assert tokenizer.decode(p.prompt_input_ids, skip_special_tokens=True).endswith("and the plot?\n\nAssistant:")


def test_implicit_custom_marker(tokenizer):
    row = {"chosen": "Q: hi A: yes. Q: more? A: sure thing", "rejected": "Q: hi A: yes. Q: more? A: no way"}
    (p,), rejects = tok_rows([row], tokenizer, "implicit", marker=" A:")
    assert rejects == []
    assert p.prompt_input_ids == with_bos(tokenizer, "Q: hi A: yes. Q: more? A:")
    assert p.chosen_input_ids == plain(tokenizer, " sure thing") + [tokenizer.eos_token_id]


@pytest.mark.parametrize("chosen, rejected, prompt, c_rest, r_rest", [
    # common prefix ends inside the word "Sure"/"Surely": back off to the space before it
    ("Tell me a joke please. Sure thing", "Tell me a joke please. Surely not",
     "Tell me a joke please. ", "Sure thing", "Surely not"),
    # one response extends the other's last word
    ("what do you think? good", "what do you think? goodness me", "what do you think? ", "good", "goodness me"),
    # common prefix already ends on whitespace
    ("what do you think? yes", "what do you think? no", "what do you think? ", "yes", "no"),
    # a newline counts as a boundary
    ("what do you think?\nwonderful", "what do you think?\nweak", "what do you think?\n", "wonderful", "weak"),
])
def test_implicit_without_marker_splits_on_whitespace(tokenizer, chosen, rejected, prompt, c_rest, r_rest):
    (p,), rejects = tok_rows([{"chosen": chosen, "rejected": rejected}], tokenizer, "implicit")
    assert rejects == []
    eos = tokenizer.eos_token_id
    assert p.prompt_input_ids == with_bos(tokenizer, prompt)
    assert p.chosen_input_ids == plain(tokenizer, c_rest) + [eos]
    assert p.rejected_input_ids == plain(tokenizer, r_rest) + [eos]


@pytest.mark.parametrize("row, reason", [
    ({"chosen": "abcdef", "rejected": "abcdeg"}, "no_common_prompt"),  # no whitespace to split on
    ({"chosen": "Great.", "rejected": "Dull."}, "no_common_prompt"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"},
     "chosen_equals_rejected"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: yes"}, "empty_response"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: a"}, "missing_field"),
])
def test_implicit_rejects(tokenizer, row, reason):
    pairs, rejects = tok_rows([row], tokenizer, "implicit")
    assert pairs == []
    assert [r.reason for r in rejects] == [reason]


def test_implicit_file(tokenizer, tmp_path):
    plan = plan_source(DataSource(path=str(DATA / "implicit.jsonl")), 10, tmp_path)
    rows = read_all(plan)
    pairs, rejects = tokenize_rows(rows, tokenizer, "implicit", 128, 64, MARKER)
    assert len(pairs) + len(rejects) == plan.num_rows
    raw = dict(rows)
    assert len(pairs) > 0
    for p in pairs:
        c, r = raw[p.index]["chosen"], raw[p.index]["rejected"]
        n = 0
        while c[n] == r[n]:
            n += 1
        cut = c[:n].rfind(MARKER) + len(MARKER)
        assert cut >= len(MARKER)
        assert p.prompt_input_ids == with_bos(tokenizer, c[:cut])


# ---------------------------------------------------------------- auto detection and explicit formats


def test_auto_detects_each_row_in_a_mixed_file(tokenizer, tmp_path):
    std = {"prompt": "how was it?", "chosen": "Great.", "rejected": "Dull."}
    conv = {"prompt": [{"role": "user", "content": "how was it?"}],
            "chosen": [{"role": "assistant", "content": "Great."}],
            "rejected": [{"role": "assistant", "content": "Dull."}]}
    impl = {"chosen": "\n\nHuman: how was it?\n\nAssistant: Great.",
            "rejected": "\n\nHuman: how was it?\n\nAssistant: Dull."}
    records = [std, conv, impl, conv, std, impl, impl, conv]  # interleaved: chat and plain prompts alternate
    path = write_jsonl(tmp_path / "mixed.jsonl", records)
    plan = plan_source(DataSource(path=str(path)), 3, tmp_path / "sources")
    pairs, rejects = tokenize_rows(read_all(plan), tokenizer, "auto", 128, 64, MARKER)
    assert rejects == []
    assert [p.index for p in pairs] == list(range(len(records)))
    eos = tokenizer.eos_token_id
    expected = {
        id(std): (with_bos(tokenizer, "how was it?"), plain(tokenizer, "Great.") + [eos]),
        id(conv): (plain(tokenizer, f"{BOS}<|user|>how was it?{EOS}<|assistant|>"),
                   plain(tokenizer, f"Great.{EOS}")),
        id(impl): (with_bos(tokenizer, "\n\nHuman: how was it?\n\nAssistant:"), plain(tokenizer, " Great.") + [eos]),
    }
    for p, rec in zip(pairs, records):
        assert (p.prompt_input_ids, p.chosen_input_ids) == expected[id(rec)], p.index
    # the three formats give three different prompt encodings
    assert len({tuple(v[0]) for v in expected.values()}) == 3


def test_wrong_explicit_format_rejects_rows(tokenizer, tmp_path):
    plan = plan_source(DataSource(path=str(DATA / "implicit.jsonl")), 100, tmp_path)
    rows = read_all(plan)
    pairs, rejects = tokenize_rows(rows, tokenizer, "standard", 128, 64, MARKER)
    assert pairs == []
    assert len(rejects) == len(rows)
    assert {r.reason for r in rejects} == {"missing_field"}
    assert all("prompt" in r.detail for r in rejects)


def test_conversational_format_on_standard_rows_rejects(tokenizer):
    rows = [{"prompt": "how was it?", "chosen": "Great.", "rejected": "Dull."}]
    pairs, rejects = tok_rows(rows, tokenizer, "conversational")
    assert pairs == []
    assert [r.reason for r in rejects] == ["wrong_type"]


# ---------------------------------------------------------------- truncation


def test_prompt_too_long_is_rejected_with_raw_row(tokenizer):
    row = {"prompt": "the movie was very good and the music was great", "chosen": "Yes.", "rejected": "No."}
    n = len(with_bos(tokenizer, row["prompt"]))
    (p,), rejects = tok_rows([row], tokenizer, "standard", max_length=n + 10, max_prompt_length=n)
    assert rejects == [] and len(p.prompt_input_ids) == n  # exactly at the limit is fine
    pairs, rejects = tok_rows([row], tokenizer, "standard", max_length=n + 10, max_prompt_length=n - 1)
    assert pairs == []
    (r,) = rejects
    assert isinstance(r, Reject)
    assert (r.index, r.reason) == (0, "prompt_too_long")
    assert r.row == row
    assert json.loads(r.to_json())["row"] == row


def test_responses_truncated_on_the_right(tokenizer):
    row = {"prompt": "how was it?",
           "chosen": "The movie was great and the music was wonderful and the actor was brilliant.",
           "rejected": "Dull."}
    eos = tokenizer.eos_token_id
    p_ids = with_bos(tokenizer, row["prompt"])
    full_c = plain(tokenizer, row["chosen"]) + [eos]
    full_r = plain(tokenizer, row["rejected"]) + [eos]
    room = len(full_r) + 2
    assert room < len(full_c)  # the long response is cut, the short one fits
    max_length = len(p_ids) + room
    (p,), rejects = tok_rows([row], tokenizer, "standard", max_length=max_length, max_prompt_length=len(p_ids))
    assert rejects == []
    assert p.prompt_input_ids == p_ids  # prompts are never cut
    assert len(p.prompt_input_ids) + len(p.chosen_input_ids) <= max_length
    assert len(p.prompt_input_ids) + len(p.rejected_input_ids) <= max_length
    assert p.chosen_input_ids == full_c[:room]  # a prefix, EOS lost
    assert eos not in p.chosen_input_ids
    assert p.rejected_input_ids == full_r  # untouched, keeps its EOS


def test_conversational_responses_truncated(tokenizer):
    prompt = [{"role": "user", "content": "how was it?"}]
    row = {"prompt": prompt, "chosen": [{"role": "assistant", "content": "The movie was great and fun."}],
           "rejected": [{"role": "assistant", "content": "The film was dull and slow."}]}
    p_ids = plain(tokenizer, f"{BOS}<|user|>how was it?{EOS}<|assistant|>")
    full_c = plain(tokenizer, f"The movie was great and fun.{EOS}")
    full_r = plain(tokenizer, f"The film was dull and slow.{EOS}")
    k = 0
    while full_c[k] == full_r[k]:
        k += 1
    room = k + 2  # past the shared "The", well before the end
    assert room < min(len(full_c), len(full_r))
    max_length = len(p_ids) + room
    (p,), rejects = tok_rows([row], tokenizer, max_length=max_length, max_prompt_length=len(p_ids))
    assert rejects == []
    assert p.prompt_input_ids == p_ids
    assert p.chosen_input_ids == full_c[:room]
    assert p.rejected_input_ids == full_r[:room]
    assert tokenizer.eos_token_id not in p.chosen_input_ids  # a cut chat response loses its end of turn


def test_identical_after_truncation(tokenizer):
    row = {"prompt": "how was it?", "chosen": "The movie was great and the music was good.",
           "rejected": "The movie was great but the music was bad."}
    c, r = plain(tokenizer, row["chosen"]), plain(tokenizer, row["rejected"])
    k = 0
    while c[k] == r[k]:
        k += 1
    assert k >= 2
    n = len(with_bos(tokenizer, row["prompt"]))
    pairs, rejects = tok_rows([row], tokenizer, "standard", max_length=n + k, max_prompt_length=n)
    assert pairs == []
    assert [(x.index, x.reason) for x in rejects] == [(0, "identical_after_truncation")]
    assert rejects[0].row == row
    # one more token of room tells them apart
    (p,), rejects = tok_rows([row], tokenizer, "standard", max_length=n + k + 1, max_prompt_length=n)
    assert rejects == []
    assert p.chosen_input_ids == c[:k + 1] and p.rejected_input_ids == r[:k + 1]


# ---------------------------------------------------------------- the bad-rows corpus


def test_bad_rows_corpus(tokenizer, tmp_path):
    # Duplicate ids are found across shards when the cache is finished (tests/faults/test_bad_rows.py), not here.
    expected = [None if e == "duplicate_id" else e for e in json.loads((DATA / "bad_rows.expected.json").read_text())]
    raw_lines = [line for line in (DATA / "bad_rows.jsonl").read_bytes().split(b"\n") if line.strip()]
    assert len(raw_lines) == len(expected)
    plan = plan_source(DataSource(path=str(DATA / "bad_rows.jsonl")), shard_size=4, sources_dir=tmp_path)
    assert plan.num_rows == len(expected)
    assert len(plan.shards) == -(-len(expected) // 4)
    rows = read_all(plan)
    assert [i for i, _ in rows] == list(range(len(expected)))
    pairs, rejects = tokenize_rows(rows, tokenizer, "auto", 128, 64, MARKER)

    assert len(pairs) + len(rejects) == len(expected)
    outcome: dict[int, str | None] = {}
    for p in pairs:
        assert isinstance(p, Pair)
        assert p.index not in outcome
        outcome[p.index] = None
    for r in rejects:
        assert r.index not in outcome, f"row {r.index} has two outcomes"
        outcome[r.index] = r.reason
    assert outcome == dict(enumerate(expected))

    for r in rejects:
        raw = raw_lines[r.index]
        if r.reason in ("invalid_json", "invalid_utf8"):
            assert isinstance(r.row, str)
            assert r.row == raw.decode("utf-8", errors="replace")
            if r.reason == "invalid_utf8":
                assert r.row.endswith('{"prompt": "bad bytes"}')
        else:
            assert r.row == json.loads(raw), r.index
        # every reject serialises (rejects.jsonl), whatever its row holds
        back = json.loads(r.to_json())
        assert (back["index"], back["reason"]) == (r.index, r.reason)


# ---------------------------------------------------------------- sources and shards


@pytest.mark.parametrize("shard_size", [1, 3, 7, 100])
@pytest.mark.parametrize("layout", ["plain", "blank_lines_no_trailing_newline", "crlf"])
def test_jsonl_shards_cover_every_row_once(tmp_path, shard_size, layout):
    records = standard_records(10)
    path = write_jsonl(tmp_path / "d.jsonl", records, blank_lines=layout != "plain",
                       trailing_newline=layout == "plain", newline="\r\n" if layout == "crlf" else "\n")
    plan = plan_source(DataSource(path=str(path)), shard_size, tmp_path / "sources")
    assert plan.kind == "jsonl"
    assert plan.num_rows == 10
    assert len(plan.shards) == -(-10 // shard_size)
    assert [(s.index, s.start, s.stop) for s in plan.shards] == \
           [(i, s, min(s + shard_size, 10)) for i, s in enumerate(range(0, 10, shard_size))]
    seen = []
    for s in plan.shards:
        got = read_shard(plan, s)
        assert [i for i, _ in got] == list(range(s.start, s.stop))
        seen += got
    assert [i for i, _ in seen] == list(range(10))
    assert [r for _, r in seen] == records


def test_jsonl_shard_plan_survives_serialisation(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", standard_records(5), blank_lines=True)
    plan = plan_source(DataSource(path=str(path)), 2, tmp_path)
    again = SourcePlan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert read_all(again) == read_all(plan)


@pytest.mark.parametrize("limit, shard_size, rows", [(5, 3, 5), (1, 4, 1), (10, 4, 10), (50, 4, 10)])
def test_jsonl_limit_caps_rows(tmp_path, limit, shard_size, rows):
    records = standard_records(10)
    path = write_jsonl(tmp_path / "d.jsonl", records, blank_lines=True)
    plan = plan_source(DataSource(path=str(path), limit=limit), shard_size, tmp_path)
    assert plan.num_rows == rows
    assert plan.shards[-1].stop == rows
    got = read_all(plan)
    assert [i for i, _ in got] == list(range(rows))
    assert [r for _, r in got] == records[:rows]


def _write_parquet(path: Path, records: list[dict], row_group_size: int = 4) -> Path:
    pq.write_table(pa.Table.from_pylist(records), path, row_group_size=row_group_size)
    return path


@pytest.mark.parametrize("shard_size", [1, 3, 7, 100])
def test_parquet_gives_same_records_as_jsonl(tmp_path, shard_size):
    records = standard_records(10)
    jsonl = write_jsonl(tmp_path / "d.jsonl", records)
    parquet = _write_parquet(tmp_path / "d.parquet", records)  # 3 row groups: shards straddle them
    pj = plan_source(DataSource(path=str(jsonl)), shard_size, tmp_path / "s")
    pp = plan_source(DataSource(path=str(parquet)), shard_size, tmp_path / "s")
    assert pp.kind == "parquet"
    assert pp.num_rows == pj.num_rows == 10
    assert [(s.start, s.stop) for s in pp.shards] == [(s.start, s.stop) for s in pj.shards]
    for s in pp.shards:
        assert [i for i, _ in read_shard(pp, s)] == list(range(s.start, s.stop))
    assert read_all(pp) == read_all(pj) == list(enumerate(records))
    assert pp.sha256 != pj.sha256


def test_parquet_limit(tmp_path):
    records = standard_records(10)
    plan = plan_source(DataSource(path=str(_write_parquet(tmp_path / "d.parquet", records)), limit=6), 4,
                       tmp_path)
    assert plan.num_rows == 6
    assert read_all(plan) == list(enumerate(records[:6]))


def test_datasets_directory_is_exported(tmp_path):
    records = standard_records(7)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "ds"))
    plan = plan_source(DataSource(path=str(tmp_path / "ds")), 3, tmp_path / "sources")
    assert plan.kind == "parquet"
    assert Path(plan.path).parent == tmp_path / "sources"
    assert plan.num_rows == 7
    assert read_all(plan) == list(enumerate(records))
    # a second plan reuses the export (same file, same hash)
    again = plan_source(DataSource(path=str(tmp_path / "ds")), 3, tmp_path / "sources")
    assert (again.path, again.sha256) == (plan.path, plan.sha256)


def test_datasets_dict_directory_split(tmp_path):
    train, test = standard_records(4), standard_records(9)[4:]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                          "test": datasets.Dataset.from_list(test)}).save_to_disk(str(tmp_path / "dd"))
    plan = plan_source(DataSource(path=str(tmp_path / "dd"), split="test"), 2, tmp_path / "sources")
    assert read_all(plan) == list(enumerate(test))
    plan = plan_source(DataSource(path=str(tmp_path / "dd")), 2, tmp_path / "sources")
    assert read_all(plan) == list(enumerate(train))
    with pytest.raises(UserError, match="validation"):
        plan_source(DataSource(path=str(tmp_path / "dd"), split="validation"), 2, tmp_path / "sources")


@pytest.mark.parametrize("prefix", ["", "  \n", "\ufeff"])
def test_json_array_file_is_refused_pointing_at_json_lines(tmp_path, prefix):
    # Reading a JSON array means holding it whole in the driver's memory: refused, naming the conversion.
    path = tmp_path / "d.json"
    path.write_text(prefix + json.dumps(standard_records(5), indent=2))
    with pytest.raises(UserError, match=r"is a JSON array, .* convert it to JSON Lines .*jq -c") as info:
        plan_source(DataSource(path=str(path)), 2, tmp_path / "sources")
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    assert not (tmp_path / "sources").exists()  # nothing converted, nothing remembered


def test_json_lines_with_json_extension(tmp_path):
    records = standard_records(4)
    path = write_jsonl(tmp_path / "d.json", records)
    plan = plan_source(DataSource(path=str(path)), 3, tmp_path / "sources")
    assert read_all(plan) == list(enumerate(records))


def test_source_errors(tmp_path):
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\na,b,c\n")
    with pytest.raises(UserError, match="extension"):
        plan_source(DataSource(path=str(tmp_path / "d.csv")), 4, tmp_path / "s")
    with pytest.raises(UserError, match="not found"):
        plan_source(DataSource(path=str(tmp_path / "missing.jsonl")), 4, tmp_path / "s")
    with pytest.raises(UserError, match="not found"):
        plan_source(DataSource(path=str(tmp_path / "missing.parquet")), 4, tmp_path / "s")
    (tmp_path / "fake.parquet").write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    with pytest.raises(UserError, match="Parquet"):
        plan_source(DataSource(path=str(tmp_path / "fake.parquet")), 4, tmp_path / "s")


def test_source_error_messages_are_one_line(tmp_path):
    for path in (tmp_path / "missing.jsonl", tmp_path / "x.txt"):
        path.parent.mkdir(exist_ok=True)
        if path.suffix == ".txt":
            path.write_text("x")
        with pytest.raises(UserError) as info:
            plan_source(DataSource(path=str(path)), 4, tmp_path / "s")
        assert "\n" not in str(info.value)
        assert str(path) in str(info.value)


def test_content_hash_tracks_bytes_not_path(tmp_path):
    src = DATA / "standard.jsonl"
    a = tmp_path / "a.jsonl"
    shutil.copy(src, a)
    moved = tmp_path / "elsewhere" / "renamed.jsonl"
    moved.parent.mkdir()
    shutil.copy(src, moved)
    h0 = plan_source(DataSource(path=str(a)), 8, tmp_path / "s").sha256
    assert plan_source(DataSource(path=str(moved)), 8, tmp_path / "s").sha256 == h0
    assert plan_source(DataSource(path=str(a)), 3, tmp_path / "s").sha256 == h0  # shard size is not content

    data = bytearray(a.read_bytes())
    i = data.index(b"great")
    data[i] = ord("G")  # one byte
    a.write_bytes(bytes(data))
    h1 = plan_source(DataSource(path=str(a)), 8, tmp_path / "s").sha256
    assert h1 != h0
    assert h1 == hashlib.sha256(bytes(data)).hexdigest()


# ---------------------------------------------------------------- text that is valid JSON but not valid Unicode


def test_lone_surrogate_rejects_the_row_not_the_batch(tokenizer, tmp_path):
    r"""`"\ud800"` is a valid JSON escape but not text: the row is rejected, its neighbours tokenized."""
    lines = [
        '{"prompt": "how was it?", "chosen": "Great.", "rejected": "Dull."}',
        '{"prompt": "how was it\\ud800?", "chosen": "Great.", "rejected": "Dull."}',
        '{"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a\\udfff"}],'
        ' "rejected": [{"role": "assistant", "content": "b"}]}',
        '{"id": "x\\ud800", "prompt": "how was it?", "chosen": "Great.", "rejected": "Dull."}',
        '{"prompt": "caf\\u00e9 \\ud83d\\ude00?", "chosen": "Great.", "rejected": "Dull."}',  # a valid pair
    ]
    path = tmp_path / "s.jsonl"
    path.write_text("\n".join(lines) + "\n")
    plan = plan_source(DataSource(path=str(path)), 10, tmp_path / "sources")
    pairs, rejects = tokenize_rows(read_all(plan), tokenizer, "auto", 128, 64, MARKER)
    assert [p.index for p in pairs] == [0, 4]
    assert pairs[1].prompt_input_ids == with_bos(tokenizer, "café \N{GRINNING FACE}?")
    assert sorted((r.index, r.reason, r.id) for r in rejects) == \
           [(1, "invalid_utf8", "1"), (2, "invalid_utf8", "2"), (3, "bad_id", None)]
    for r in rejects:
        line = r.to_json()
        line.encode("utf-8")  # must be writable to rejects.jsonl
        assert json.loads(line)["row"] == json.loads(lines[r.index])  # and keep the raw row, escapes intact


def test_reject_to_json_keeps_non_ascii_readable():
    r = Reject(0, "0", "empty_field", "x", {"prompt": "café"})
    assert "café" in r.to_json()


@pytest.mark.parametrize("content", [b'[{"prompt": "a", "chosen": "b", "rejected": "c"},', b'[1, 2, \xff]'])
def test_broken_json_array_is_a_user_error(tmp_path, content):
    path = tmp_path / "d.json"
    path.write_bytes(content)
    with pytest.raises(UserError) as info:
        plan_source(DataSource(path=str(path)), 4, tmp_path / "sources")
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------- each source read once per version, any location


def _settle(path: Path) -> None:
    """Date a file's mtime back a minute: a file written just now is not remembered (see `plan_source`)."""
    old = time.time_ns() - 60_000_000_000
    os.utime(path, ns=(old, old))


@pytest.mark.parametrize("limit", [None, 5])
def test_plan_does_not_depend_on_the_read_size(tmp_path, monkeypatch, limit):
    records = standard_records(13)
    path = write_jsonl(tmp_path / "d.jsonl", records, blank_lines=True, trailing_newline=False)
    whole = plan_source(DataSource(path=str(path), limit=limit), 4, tmp_path / "a")
    monkeypatch.setattr(sources, "_CHUNK", 7)  # rows cross the boundaries of the reads
    small = plan_source(DataSource(path=str(path), limit=limit), 4, tmp_path / "b")
    assert small == whole and small.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert read_all(small) == list(enumerate(records[:limit]))


def test_a_source_is_read_once_per_version(tmp_path, monkeypatch):
    reads = []
    real = sources._plan_jsonl
    monkeypatch.setattr(sources, "_plan_jsonl", lambda file, *a: reads.append(file.uri) or real(file, *a))
    monkeypatch.setattr(sources, "_PLANS", {})
    path = write_jsonl(tmp_path / "d.jsonl", standard_records(6))
    src = DataSource(path=str(path))
    fresh = plan_source(src, 4, tmp_path / "s")  # written just now: planned, not remembered
    assert plan_source(src, 4, tmp_path / "s") == fresh and len(reads) == 2
    _settle(path)
    first = plan_source(src, 4, tmp_path / "s")
    assert plan_source(src, 4, tmp_path / "s") == first and len(reads) == 3  # this process remembers it
    monkeypatch.setattr(sources, "_PLANS", {})  # a later process: the plan kept under sources_dir
    assert plan_source(src, 4, tmp_path / "s") == first and len(reads) == 3
    assert plan_source(src, 2, tmp_path / "s").shards != first.shards and len(reads) == 4  # other shards: read
    write_jsonl(path, standard_records(7))  # a new version of the file
    _settle(path)
    again = plan_source(src, 4, tmp_path / "s")
    assert again.num_rows == 7 and again.sha256 != first.sha256 and len(reads) == 5


def test_a_file_uri_plans_and_reads_like_the_path(tmp_path):
    records = standard_records(9)
    path = write_jsonl(tmp_path / "d.jsonl", records, blank_lines=True)
    parquet = _write_parquet(tmp_path / "d.parquet", records)
    for local in (path, parquet):
        by_path = plan_source(DataSource(path=str(local)), 4, tmp_path / "s")
        by_uri = plan_source(DataSource(path=f"file://{local}"), 4, f"file://{tmp_path}/s")
        assert (by_uri.sha256, by_uri.num_rows, by_uri.shards) == (by_path.sha256, by_path.num_rows, by_path.shards)
        assert by_uri.path == f"file://{local}" and read_all(by_uri) == read_all(by_path) == list(enumerate(records))
    with pytest.raises(UserError, match="not found"):
        plan_source(DataSource(path=f"file://{tmp_path}/missing.jsonl"), 4, tmp_path / "s")


def _reference_shards(data: bytes, shard_size: int, limit: int | None) -> list[tuple[int, int, int, int]]:
    """The shard plan worked out line by line: (start, stop, byte_start, byte_stop)."""
    shards, rows, offset = [], 0, 0
    for line in data.splitlines(keepends=True):  # (the test data holds no b"\r")
        if line.strip() and (limit is None or rows < limit):
            if rows % shard_size == 0:
                if shards:
                    shards[-1][3] = offset
                shards.append([rows, rows, offset, offset])
            rows += 1
            shards[-1][1] = rows
        offset += len(line)
    if shards:
        shards[-1][3] = len(data)
    return [tuple(s) for s in shards]


@pytest.mark.parametrize("seed", range(6))
def test_shard_plan_equals_a_line_by_line_reading(tmp_path, monkeypatch, seed):
    rng = random.Random(seed)
    lines = [rng.choice([b"", b"  \t", json.dumps({"prompt": "x" * rng.randint(0, 30)}).encode()])
             for _ in range(rng.randint(0, 60))]
    data = b"\n".join(lines) + rng.choice([b"", b"\n"])
    path = tmp_path / "d.jsonl"
    path.write_bytes(data)
    monkeypatch.setattr(sources, "_CHUNK", rng.choice([1, 5, 64, 1 << 20]))
    for shard_size in (1, 3, 7):
        for limit in (None, 1, 4, 100):
            plan = sources._plan_jsonl(sources.Store(str(path)), shard_size, limit)
            assert [(s.start, s.stop, s.byte_start, s.byte_stop) for s in plan.shards] == \
                _reference_shards(data, shard_size, limit)
            assert plan.sha256 == hashlib.sha256(data).hexdigest()
