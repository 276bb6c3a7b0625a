"""Rewards for evaluation by sampling: rules on hand-worked strings, user callables and their errors, a tiny reward
model checked against an independent unpadded forward, and the identity that keys cached rewards."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from pipeline.config import RewardConfig
from pipeline.engines.rewards import build_reward, reward_dtype, reward_identity
from pipeline.errors import UserError
from tests import reward_fixtures

FIX = "tests.reward_fixtures"


def cfg(**kw) -> RewardConfig:
    return RewardConfig.model_validate(kw)


def rewards(c: RewardConfig, completions, prompts=None) -> list[float]:
    out = build_reward(c)(prompts or [""] * len(completions), completions)
    assert isinstance(out, np.ndarray) and out.dtype == np.float64 and out.shape == (len(completions),)
    return out.tolist()


# ---- rules -------------------------------------------------------------------------------------------------------

def test_lexicon_counts_positive_minus_negative_case_and_punctuation_insensitive():
    c = cfg(type="rule", rule="lexicon", positive=["Great", "good", "don't"], negative=["bad", "boring"])
    assert rewards(c, [
        "Great movie, GREAT acting!",             # great, great -> +2
        "Good? No... bad, BORING, bad.",          # good - bad - boring - bad -> -2
        "I don't know; goodness is not good.",    # don't, good (not "goodness") -> +2
        "greatly bad-ass",                        # the hyphen splits "bad"; "greatly" is not "great" -> -1
        "",
    ], prompts=["great great great"] * 5) == [2.0, -2.0, 2.0, -1.0, 0.0]  # the prompt is ignored


def test_length_counts_whitespace_separated_words():
    c = cfg(type="rule", rule="length")
    assert rewards(c, ["one two  three\nfour\tfive", "", "  hello, world!  "]) == [5.0, 0.0, 2.0]


def test_regex_is_one_when_the_pattern_matches_anywhere():
    c = cfg(type="rule", rule="regex", pattern=r"\bthanks?\b")
    assert rewards(c, ["no, thank you", "Thanks!", "thanksgiving", "many thanks."]) == [1.0, 0.0, 0.0, 1.0]


def test_bad_regex_is_a_user_error():
    with pytest.raises(UserError, match="eval.reward.pattern"):
        build_reward(cfg(type="rule", rule="regex", pattern="(unclosed"))


# ---- callables ---------------------------------------------------------------------------------------------------

def test_callable_receives_prompts_completions_and_kwargs():
    reward_fixtures.CALLS.clear()
    c = cfg(type="callable", function=f"{FIX}:count_char", kwargs={"char": "b"})
    assert rewards(c, ["abba", "bob", "xyz"], prompts=["p1", "p2", "p3"]) == [2.0, 2.0, 0.0]
    assert reward_fixtures.CALLS == [(["p1", "p2", "p3"], ["abba", "bob", "xyz"], {"char": "b"})]
    assert rewards(cfg(type="callable", function=f"{FIX}:count_char"), ["banana"]) == [3.0]  # default char "a"
    assert rewards(cfg(type="callable", function=f"{FIX}:prompt_length"), ["x", "y"], ["abc", ""]) == [3.0, 0.0]


@pytest.mark.parametrize("function, problem", [
    (FIX, "module:function"),
    (":count_char", "module:function"),
    (f"{FIX}:", "module:function"),
    ("no_such_reward_module_xyz:score", "not found"),
    ("no_such_pkg_xyz.sub:score", "not found"),
    (f"{FIX}:missing", "no attribute 'missing'"),
    (f"{FIX}:NOT_CALLABLE", "not a function"),
])
def test_bad_function_spec_is_a_one_line_user_error(function, problem):
    with pytest.raises(UserError, match="eval.reward.function") as e:
        build_reward(cfg(type="callable", function=function))
    assert problem in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name, problem", [
    ("too_few", "returned 1 values for 2 completions"),
    ("not_a_list", "returned a float"),
    ("with_nan", "returned nan at index 0"),
    ("with_string", "returned '1.0' at index 0"),
])
def test_bad_return_value_is_a_user_error(name, problem):
    reward = build_reward(cfg(type="callable", function=f"{FIX}:{name}"))
    with pytest.raises(UserError, match="eval.reward.function") as e:
        reward(["p", "q"], ["a", "b"])
    assert problem in str(e.value)


def test_exceptions_inside_the_function_propagate_unchanged():
    reward = build_reward(cfg(type="callable", function=f"{FIX}:raises"))
    with pytest.raises(ZeroDivisionError, match="bug in the user's reward"):
        reward(["p"], ["c"])


@pytest.fixture
def user_dir(tmp_path, monkeypatch):
    """A working directory holding the user's reward modules, as with `dpo-pipeline eval` run from a project."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith("user_reward_"):
            del sys.modules[name]


def test_callable_is_imported_from_the_working_directory(user_dir):
    (user_dir / "user_reward_cwd.py").write_text("def score(prompts, completions):\n"
                                                 "    return [len(c) for c in completions]\n")
    assert rewards(cfg(type="callable", function="user_reward_cwd:score"), ["abc", ""]) == [3.0, 0.0]


def test_missing_import_inside_the_users_module_propagates(user_dir):
    # Their module exists; what it imports does not: their traceback, not a "module not found" config error.
    (user_dir / "user_reward_dep.py").write_text("import not_installed_dep_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="not_installed_dep_xyz"):
        build_reward(cfg(type="callable", function="user_reward_dep:score"))


# ---- identity ----------------------------------------------------------------------------------------------------

def test_rule_identity_is_stable_and_tracks_parameters():
    lex = dict(type="rule", rule="lexicon", positive=["good"], negative=["bad"])
    assert reward_identity(cfg(**lex)) == reward_identity(cfg(**lex))
    assert reward_identity(cfg(**lex)) == reward_identity(cfg(**{**lex, "positive": ["Good", "good"]}))
    assert reward_identity(cfg(**lex)) != reward_identity(cfg(**{**lex, "negative": ["awful"]}))
    rx = dict(type="rule", rule="regex", pattern="a")
    assert reward_identity(cfg(**rx)) != reward_identity(cfg(**{**rx, "pattern": "b"}))
    assert reward_identity(cfg(type="rule", rule="length")) != reward_identity(cfg(**rx))


def test_callable_identity_tracks_spec_kwargs_and_source(user_dir):
    src = user_dir / "user_reward_id.py"
    src.write_text("def score(prompts, completions, k=1):\n    return [k] * len(completions)\n")
    c = cfg(type="callable", function="user_reward_id:score", kwargs={"k": 2})
    first = reward_identity(c)
    assert first == reward_identity(c) and first["source_sha256"] is not None
    assert first != reward_identity(cfg(type="callable", function="user_reward_id:score", kwargs={"k": 3}))
    src.write_text("def score(prompts, completions, k=1):\n    return [2 * k] * len(completions)\n")
    assert reward_identity(c)["source_sha256"] != first["source_sha256"]
    assert reward_identity(cfg(type="callable", function="builtins:len"))["source_sha256"] is None  # no file
    with pytest.raises(UserError, match="eval.reward.function.*not found"):
        reward_identity(cfg(type="callable", function="user_reward_absent:score"))


# ---- reward models -----------------------------------------------------------------------------------------------

TEXTS = [("Human: how was the film?", " It was great, really great."),
         ("Human: why?", " Boring."),
         ("Human: what did you like about the music and the ending of the movie?", " The score was moving.")]


def save_reward_model(out: Path, tiny_model: Path, seed: int = 0, pad: bool = True, **labels) -> Path:
    """A tiny LlamaForSequenceClassification with the tiny tokenizer (without its pad token when pad=False)."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    if not pad:
        tok.pad_token = None
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id if pad else None, **labels)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rm_dirs(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("reward-models")
    return {"one": save_reward_model(root / "one", tiny_model, num_labels=1),
            "two": save_reward_model(root / "two", tiny_model, id2label={0: "NEGATIVE", 1: "POSITIVE"}),
            "nopad": save_reward_model(root / "nopad", tiny_model, pad=False, num_labels=1)}


def direct(model_dir: Path, text: str, label: int = 0, ids: list[int] | None = None) -> float:
    """Independent reference: one text, no padding, no batching, the logit of the last token."""
    ids = ids or AutoTokenizer.from_pretrained(model_dir)(text)["input_ids"]
    model = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        return model.score(hidden)[label].item()


def model_rewards(model_dir: Path, texts=TEXTS, **kw) -> np.ndarray:
    reward = build_reward(cfg(type="model", model=str(model_dir), **{"batch_size": 2, **kw}))
    return reward([p for p, _ in texts], [c for _, c in texts])


@pytest.mark.parametrize("which", ["one", "nopad"])  # nopad: eos pads, and the model learns its pad id from that
def test_batched_padded_rewards_equal_unpadded_forward(rm_dirs, which):
    got = model_rewards(rm_dirs[which])  # batch_size 2 over 3 texts of different lengths: padding, partial batch
    want = [direct(rm_dirs[which], p + c) for p, c in TEXTS]
    assert got.dtype == np.float64 and len(set(got.tolist())) == 3
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("setting, device, want", [
    ("auto", "cuda", torch.bfloat16), ("auto", "cpu", torch.float32), ("float32", "cuda", torch.float32)])
def test_reward_model_dtype_is_bf16_on_a_gpu_unless_set(setting, device, want):
    assert reward_dtype(cfg(type="model", model="m", dtype=setting), device) == want


def test_a_bf16_reward_model_scores_close_to_fp32(rm_dirs):
    got = model_rewards(rm_dirs["one"], dtype="bfloat16")
    want = model_rewards(rm_dirs["one"])
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=0, atol=0.05 * np.abs(want).max() + 1e-3)


def test_text_completion_reads_the_completion_alone(rm_dirs):
    got = model_rewards(rm_dirs["one"], text="completion")
    np.testing.assert_allclose(got, [direct(rm_dirs["one"], c) for _, c in TEXTS], rtol=0, atol=1e-5)
    assert np.abs(got - model_rewards(rm_dirs["one"])).min() > 1e-4


def test_long_inputs_keep_their_end(rm_dirs, tokenizer):
    # max_length 8: BOS + the last 7 tokens, so a different beginning does not change the reward, an end does.
    texts = [("Human: what did you like about the film? ", "The music was great."),
             ("Assistant: I really hate the story and the actor. ", "The music was great."),
             ("Assistant: I really hate the story and the actor. ", "The music was bad.")]
    got = model_rewards(rm_dirs["one"], texts, max_length=8)
    ids = tokenizer(texts[0][0] + texts[0][1])["input_ids"]
    assert got[0] == pytest.approx(direct(rm_dirs["one"], "", ids=ids[:1] + ids[-7:]), abs=1e-5)
    assert got[1] == pytest.approx(got[0], abs=1e-6) and abs(got[2] - got[0]) > 1e-4


def test_label_by_name_or_index(rm_dirs):
    positive = model_rewards(rm_dirs["two"], label="POSITIVE")
    np.testing.assert_allclose(positive, [direct(rm_dirs["two"], p + c, label=1) for p, c in TEXTS], atol=1e-5)
    np.testing.assert_array_equal(positive, model_rewards(rm_dirs["two"], label=1))
    assert np.abs(positive - model_rewards(rm_dirs["two"], label="NEGATIVE")).min() > 1e-4


@pytest.mark.parametrize("label, problem", [
    (None, "has 2 labels ['NEGATIVE', 'POSITIVE']; set eval.reward.label"),
    ("NEUTRAL", "use one of ['NEGATIVE', 'POSITIVE']"),
    (2, "out of range"),
])
def test_label_errors(rm_dirs, label, problem):
    with pytest.raises(UserError, match="eval.reward.label") as e:
        model_rewards(rm_dirs["two"], label=label)
    assert problem in str(e.value)


def test_causal_lm_is_not_a_reward_model(tiny_model):
    # Loading it would work with a randomly initialised score head: random rewards, so refuse it.
    with pytest.raises(UserError, match="eval.reward.model.*not a sequence-classification model"):
        build_reward(cfg(type="model", model=str(tiny_model)))


def test_missing_reward_model_names_its_key(tmp_path):
    with pytest.raises(UserError, match="eval.reward.model"):
        build_reward(cfg(type="model", model=str(tmp_path / "absent")))


def test_model_identity_tracks_weights_and_settings(tiny_model, tmp_path):
    d = save_reward_model(tmp_path / "rm", tiny_model, num_labels=1)
    c = cfg(type="model", model=str(d))
    first = reward_identity(c)
    assert first == reward_identity(c)
    for change in ({"label": 0}, {"text": "completion"}, {"max_length": 64}):
        assert reward_identity(cfg(type="model", model=str(d), **change)) != first
    save_reward_model(d, tiny_model, seed=1, num_labels=1)  # new weights, same directory
    assert reward_identity(c)["model"] != first["model"]
