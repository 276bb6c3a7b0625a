"""The LLM-judge reward (`eval.reward.type: judge`): config errors, the expected-value formula on hand-worked
numbers, the judge prompts' tokenization and truncation, the reward's plumbing with a stand-in scorer, its identity;
and one integration test: the judge in its Ray actor with vLLM against an independent transformers forward."""

from __future__ import annotations

import math
import time
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch
from transformers import LlamaForCausalLM

from pipeline.config import RewardConfig, load_config
from pipeline.engines.actors import RewardRunner, reward_actor_options
from pipeline.engines.judge import JudgePrompts, JudgeReward, expected_value, judge_scorer_kwargs, prompt_text
from pipeline.engines.rewards import build_reward, reward_identity
from pipeline.engines.scorers import actor_options
from pipeline.errors import UserError
from tests.conftest import sequence_logps
from tests.test_rewards import save_reward_model

TEMPLATE = "Review: {prompt}{completion}\nIs the review positive?"
# Single-token, leading-space and multi-token answers of the tiny tokenizer.
CHOICES = {"1": 1.0, "2": 2.0, " great": 5.0, "boring film": -1.0}


def judge_cfg(model="/models/judge", **kw) -> RewardConfig:
    return RewardConfig.model_validate({"type": "judge", "model": str(model), "judge_template": TEMPLATE,
                                        "judge_choices": CHOICES, **kw})


# ---- config ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, problem", [
    ({"model": None}, "needs eval.reward.model"),
    ({"judge_template": None}, "needs eval.reward.judge_template"),
    ({"judge_template": "Rate {completion}:"}, "lacks {prompt}"),
    ({"judge_template": "Rate {prompt}:"}, "lacks {completion}"),
    ({"judge_template": "Rate:"}, "lacks {prompt} and {completion}"),
    ({"judge_choices": {"Yes": 1}}, "at least 2 answers"),
    ({"judge_choices": {}}, "at least 2 answers"),
    ({"judge_choices": {"Yes": 1, "": 0}}, "empty answer"),
    ({"judge_choices": {"Yes": math.inf, "No": 0}}, "finite value"),
    ({"judge_engine_kwargs": {"max_model_len": 64}}, "which the judge sets itself"),
])
def test_judge_config_errors_name_the_fix(change, problem):
    raw = {"type": "judge", "model": "/m", "judge_template": TEMPLATE, "judge_choices": {"Yes": 1, "No": 0}}
    with pytest.raises(ValueError, match="eval.reward") as e:
        RewardConfig.model_validate({**raw, **change})
    assert problem in str(e.value)


def test_judge_config_error_is_one_line_at_load(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("model: {path: /m}\ndata: {train: {path: t.jsonl}}\n"
                 "eval:\n  reward:\n    type: judge\n    model: /judge\n    judge_template: 'Rate {completion}'\n"
                 "    judge_choices: {'Yes': 1, 'No': 0}\n")
    with pytest.raises(UserError) as e:
        load_config(f)
    assert str(e.value).startswith("config key 'eval.reward': eval.reward.judge_template lacks {prompt}")
    assert "\n" not in str(e.value)
    fixed = ["eval.reward.judge_template=Rate {prompt} {completion} now"]
    ok = load_config(f, fixed)
    assert ok.eval.reward.judge_choices == {"Yes": 1.0, "No": 0.0} and ok.eval.reward.chat_template is None
    # Bare Yes/No are YAML booleans: an error naming the quotes, not answers "True" and "False".
    with pytest.raises(UserError, match="eval.reward.judge_choices': an answer was read as true/false.*quote"):
        load_config(f, [*fixed, "eval.reward.judge_choices={Yes: 1, No: 0}"])
    digits = judge_cfg(judge_choices={1: 1, 2: 2})  # numbers (YAML's 1) become their text
    assert digits.judge_choices == {"1": 1.0, "2": 2.0}


# ---- the formula -------------------------------------------------------------------------------------------------

def test_expected_value_is_the_softmax_weighted_mean_of_the_values():
    values = np.array([1.0, 2.0, 3.0])
    # p = (1/2, 1/4, 1/4): 1/2 + 2/4 + 3/4 = 1.75
    logps = np.log([[0.5, 0.25, 0.25], [0.1, 0.1, 0.1], [1.0, 1e-300, 1e-300]])
    got = expected_value(logps, values)
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, [1.75, 2.0, 1.0], rtol=0, atol=1e-12)  # equal log-probs: the plain mean
    # Only differences within a row matter: mass outside the answers drops out, far-off log-probs stay finite.
    np.testing.assert_allclose(expected_value(logps - 1000.0, values), got, rtol=0, atol=1e-12)
    assert expected_value(np.array([[-1000.0, -1001.0]]), np.array([0.0, 1.0]))[0] == pytest.approx(
        1 / (1 + math.e), abs=1e-12)


# ---- tokenization ------------------------------------------------------------------------------------------------

class WordTokenizer:
    """A stand-in tokenizer: one id per whitespace-separated word, no chat template, no BOS."""

    chat_template, bos_token_id = None, None

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def __call__(self, text, add_special_tokens=True):
        return SimpleNamespace(input_ids=[self.vocab.setdefault(w, len(self.vocab)) for w in text.split()])


def test_chat_prompt_is_a_user_message_with_the_generation_prompt(tokenizer):
    judge = JudgePrompts(tokenizer, judge_cfg())
    assert judge.chat and judge.lead == []
    text = judge.render("The film ", "was great.")
    assert text == "<|bos|><|user|>Review: The film was great.\nIs the review positive?<|endoftext|><|assistant|>"
    assert judge.prompt_ids("The film ", "was great.") == tokenizer(text, add_special_tokens=False).input_ids
    # Answers in context: "1" one token, " great" one token with its space, "boring film" several.
    assert [tokenizer.convert_ids_to_tokens(a) for a in judge.answers] == [["1"], ["2"], ["Ġgreat"],
                                                                           ["b", "oring", "Ġfilm"]]


def test_plain_prompt_is_the_text_after_bos(tokenizer):
    judge = JudgePrompts(tokenizer, judge_cfg(chat_template=False, judge_template="{prompt} {completion} Answer:",
                                              judge_choices={" Yes": 1, "1": 0}))
    assert not judge.chat and judge.lead == [tokenizer.bos_token_id]
    assert judge.render("{completion}", "a {prompt} b") == "{completion} a {prompt} b Answer:"  # one pass
    assert judge.prompt_ids("Hi", "there") == tokenizer("Hi there Answer:").input_ids
    assert [tokenizer.convert_ids_to_tokens(a) for a in judge.answers] == [["Ġ", "Y", "e", "s"], ["1"]]


@pytest.mark.parametrize("change, problem", [
    ({"chat_template": False, "judge_template": "{prompt} the mov{completion} the mov",
      "judge_choices": {"ie": 1, "x": 0}}, "'ie' merges with the end of the judge prompt"),
    ({"chat_template": False, "judge_template": "Rate {prompt}: {completion}"}, "ends with a placeholder"),
    ({"max_length": 12}, "raise max_length well above"),
])
def test_judge_prompt_errors(tokenizer, change, problem):
    with pytest.raises(UserError, match="eval.reward") as e:
        JudgePrompts(tokenizer, judge_cfg(**change))
    assert problem in str(e.value) and "\n" not in str(e.value)


def test_answer_that_tokenizes_to_nothing_and_chat_without_template():
    with pytest.raises(UserError, match="' ' tokenizes to nothing"):
        JudgePrompts(WordTokenizer(), judge_cfg(judge_choices={" yes": 1, " ": 0}))
    with pytest.raises(UserError, match="chat_template is true but the tokenizer of the judge '/models/judge' has no"):
        JudgePrompts(WordTokenizer(), judge_cfg(chat_template=True))


def test_long_prompts_lose_the_start_of_the_prompt_then_of_the_completion(tokenizer):
    prompt, completion = "what did you like about the film? " * 4, "the music was great, really great. " * 3
    texts = {}
    for max_length in (40, 60):
        judge = JudgePrompts(tokenizer, judge_cfg(max_length=max_length))
        ids = judge.prompt_ids(prompt, completion)
        assert max_length - 3 <= len(ids) + judge.room <= max_length  # re-tokenized cuts may lose a token or two
        texts[max_length] = tokenizer.decode(ids)
        assert texts[max_length].startswith("<|bos|><|user|>Review: ")  # the template's text is kept
        assert texts[max_length].endswith(" \nIs the review positive?<|endoftext|><|assistant|>")
    # 60: the prompt's end and the whole completion; 40: the completion's end only.
    assert texts[60].startswith("<|bos|><|user|>Review:  film? " + completion)
    assert texts[40].startswith("<|bos|><|user|>Review:  the music was great, really great. \nIs")
    short = judge.prompt_ids("what did you like? ", "the music was great.")  # fits: unchanged
    assert short == tokenizer(judge.render("what did you like? ", "the music was great."),
                              add_special_tokens=False).input_ids


# ---- the reward with a stand-in scorer, and its identity ---------------------------------------------------------

class FakeScorer:
    """log p of token t = -t / 100: answer log-probs are known sums; records what it was asked."""

    def __init__(self):
        self.calls = []

    def token_logps(self, sequences, starts):
        self.calls.append((sequences, starts))
        return [-s[start:].astype(np.float32) / 100 for s, start in zip(sequences, starts)]


def test_reward_combines_answer_logps_per_completion(tiny_model, tokenizer):
    scorer = FakeScorer()
    reward = JudgeReward(judge_cfg(tiny_model, batch_size=2), scorer=scorer)
    prompts, completions = ["A ", "B ", "C "], ["good.", "bad.", "the story was boring."]
    got = reward(prompts, completions)
    assert [len(seqs) for seqs, _ in scorer.calls] == [8, 4]  # 2 + 1 completions x 4 answers
    judge = reward.prompts
    want_logps = [[-sum(a) / 100 for a in judge.answers]] * 3
    np.testing.assert_allclose(reward.choice_logps(prompts, completions), want_logps, rtol=0, atol=1e-6)
    np.testing.assert_allclose(got, expected_value(np.array(want_logps), np.array(list(CHOICES.values()))),
                               rtol=0, atol=1e-9)
    seqs, starts = scorer.calls[0]
    ids = judge.prompt_ids("B ", "bad.")
    assert starts[4:] == [len(ids)] * 4 and [s.tolist() for s in seqs[4:]] == [ids + a for a in judge.answers]
    # With sources (as evaluation and pair generation pass them), `{prompt}` reads the source, not the rendering.
    scorer.calls.clear()
    reward(["<|user|>rendered A", "<|user|>rendered B", "C "], completions,
           sources=["A ", [{"role": "user", "content": "B "}], None])
    assert [s.tolist() for s in scorer.calls[0][0][4:8]] == [ids + a for a in judge.answers]


def test_prompt_text_is_the_source_as_text():
    assert prompt_text("<rendered>", "What now?") == "What now?"
    assert prompt_text("<rendered>", [{"role": "user", "content": "Hi"}]) == "Hi"
    assert prompt_text("<rendered>", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]) \
        == "system: Be brief.\n\nuser: Hi"
    assert prompt_text("<rendered>") == prompt_text("<rendered>", []) == "<rendered>"


def test_judge_refuses_a_sequence_classification_model(tiny_model, tmp_path):
    rm = save_reward_model(tmp_path / "rm", tiny_model, num_labels=1)
    with pytest.raises(UserError, match="is not a causal LM, which a judge must be"):
        build_reward(judge_cfg(rm))


def test_engine_settings_split_between_scorer_and_vllm():
    kw = judge_scorer_kwargs(judge_cfg(judge_engine_kwargs={"dtype": "bfloat16", "enforce_eager": True,
                                                            "tensor_parallel_size": 2}), "/local")
    assert kw == {"model_dir": "/local", "dtype": "bfloat16", "max_length": 512, "tensor_parallel_size": 2,
                  "engine_kwargs": {"enforce_eager": True}}
    assert judge_scorer_kwargs(judge_cfg(), "/local")["dtype"] == "auto"
    c = judge_cfg(use_gpu=True, judge_engine_kwargs={"tensor_parallel_size": 2})
    assert reward_actor_options(c)["num_gpus"] == 2 and reward_actor_options(judge_cfg())["num_gpus"] == 0


def test_engine_actors_take_over_the_driver_s_vllm_settings(monkeypatch):
    """An engine actor (scorer, evaluation, judge) gets the driver's vLLM log level and engine-core mode, and
    nothing else of its environment; ERROR logging when the driver sets none."""
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    monkeypatch.delenv("VLLM_ENABLE_V1_MULTIPROCESSING", raising=False)
    monkeypatch.setenv("VLLM_HOST_IP", "10.0.0.1")  # the driver's node's own: never forwarded
    settings = load_config(None, ["model.path=/m", "data.train.path=/d.jsonl"]).scoring
    assert actor_options(settings)["runtime_env"]["env_vars"] == {"VLLM_LOGGING_LEVEL": "ERROR"}
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "INFO")
    monkeypatch.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    want = {"VLLM_LOGGING_LEVEL": "INFO", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    assert actor_options(settings)["runtime_env"]["env_vars"] == want
    assert reward_actor_options(judge_cfg())["runtime_env"]["env_vars"] == want


def test_judge_identity_tracks_everything_that_changes_rewards(tiny_model, tmp_path):
    first = reward_identity(judge_cfg(tiny_model))
    assert first == reward_identity(judge_cfg(tiny_model)) and first["type"] == "judge"
    # The answers' order does not change the rewards, nor their identity.
    assert reward_identity(judge_cfg(tiny_model, judge_choices=dict(reversed(CHOICES.items())))) == first
    for change in ({"judge_template": "{prompt}|{completion}?"}, {"judge_choices": {**CHOICES, "1": 0.0}},
                   {"chat_template": False}, {"max_length": 256}, {"judge_engine_kwargs": {"dtype": "bfloat16"}}):
        assert reward_identity(judge_cfg(tiny_model, **change)) != first, change
    copy = tmp_path / "judge"
    LlamaForCausalLM.from_pretrained(tiny_model).save_pretrained(copy)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (copy / name).write_bytes((tiny_model / name).read_bytes())
    assert reward_identity(judge_cfg(copy))["model"] == first["model"]
    assert reward_identity(judge_cfg(copy))["template_sha256"] == first["template_sha256"] is not None
    # The chat template is not part of the tokenizer's identity: the judge's identity carries it, when it is used.
    (copy / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}")
    assert reward_identity(judge_cfg(copy))["template_sha256"] != first["template_sha256"]
    assert reward_identity(judge_cfg(copy, chat_template=False)) == reward_identity(
        judge_cfg(tiny_model, chat_template=False)) | {"model": reward_identity(judge_cfg(copy))["model"]}
    torch.manual_seed(1)
    LlamaForCausalLM(LlamaForCausalLM.from_pretrained(tiny_model).config).save_pretrained(copy)  # new weights
    assert reward_identity(judge_cfg(copy))["model"] != first["model"]


# ---- integration: the judge in its Ray actor, vLLM against transformers -------------------------------------------

PAIRS = [("The film ", "was great, really great."), ("The plot ", "was boring and the acting was awful."),
         ("What did you like? ", "The music."), ("Why? ", "I love this movie, the ending was moving and funny.")]
# As evaluation and pair generation call the reward: the prompts as the policy read them, and their sources (a text,
# a conversation, or none: then the judge reads the rendered prompt).
RENDERED = [f"<|user|>{p}<|endoftext|><|assistant|>" for p, _ in PAIRS]
SOURCES = [PAIRS[0][0], PAIRS[1][0], [{"role": "user", "content": PAIRS[2][0]}], None]
JUDGE_READS = [PAIRS[0][0], PAIRS[1][0], PAIRS[2][0], RENDERED[3]]  # what `{prompt}` becomes


def _choice_logps(reward, prompts, completions, sources):
    return reward.choice_logps(prompts, completions, sources)


def _rewards(reward, prompts, completions, sources):
    return reward(prompts, completions, sources=sources)


def transformers_judge(model_dir, tok, prompts, completions) -> tuple[np.ndarray, np.ndarray]:
    """Independent: the chat-rendered judge prompt, each answer's tokens after it, one unpadded float64 forward per
    sequence (`sequence_logps`), and the softmax-weighted values."""
    seqs, starts = [], []
    for p, c in zip(prompts, completions):
        text = tok.apply_chat_template([{"role": "user", "content": TEMPLATE.replace("{prompt}", p)
                                         .replace("{completion}", c)}], add_generation_prompt=True, tokenize=False)
        ids = tok(text, add_special_tokens=False).input_ids
        for answer in CHOICES:
            seqs.append(ids + tok(text + answer, add_special_tokens=False).input_ids[len(ids):])
            starts.append(len(ids))
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    logps = torch.tensor(sequence_logps(model, seqs, starts)).view(len(prompts), len(CHOICES))
    rewards = torch.softmax(logps, dim=1) @ torch.tensor(list(CHOICES.values()), dtype=torch.float64)
    return logps.numpy(), rewards.numpy()


@pytest.mark.ray
def test_judge_errors_surface_from_its_actor_as_one_line(ray_local, tiny_model):
    # Found while tokenizing, before the engine would start: the driver raises the actor's one-line error.
    with pytest.raises(UserError, match="eval.reward.judge_choices: 'ie' merges with the end of the judge prompt"):
        RewardRunner(judge_cfg(tiny_model, chat_template=False, judge_template="{prompt}{completion} the mov",
                               judge_choices={"ie": 1, "x": 0}))


@pytest.fixture(scope="module")
def judge_runner(ray_local, tiny_model):
    """One judge engine for the module: the tiny Llama judging itself, in a `RewardRunner` actor."""
    t0 = time.perf_counter()
    runner = RewardRunner(judge_cfg(tiny_model, batch_size=3, max_length=128,
                                    judge_engine_kwargs={"dtype": "float32", "enforce_eager": True}))
    print(f"judge actor and engine started in {time.perf_counter() - t0:.1f} s")
    yield runner
    runner.close()


@pytest.mark.ray
@pytest.mark.vllm
@pytest.mark.extended  # (a vLLM engine start of its own: in the extended tier, to keep `make test` within 30 min)
def test_vllm_judge_in_its_actor_equals_a_transformers_forward(judge_runner, tiny_model, tokenizer):
    assert judge_runner.actor is not None  # the judge runs in its own actor, not in a task per call
    completions = [c for _, c in PAIRS]
    t0 = time.perf_counter()
    logps = ray.get(judge_runner.run(_choice_logps, RENDERED, completions, SOURCES))
    got = ray.get(judge_runner.run(_rewards, RENDERED, completions, SOURCES))
    print(f"judge calls: {time.perf_counter() - t0:.1f} s")
    want_logps, want = transformers_judge(tiny_model, tokenizer, JUDGE_READS, completions)
    print(f"max |vLLM - transformers|: answer log-probs {np.abs(logps - want_logps).max():.2e}, "
          f"rewards {np.abs(got - want).max():.2e}; rewards {np.round(got, 4).tolist()}")
    np.testing.assert_allclose(logps, want_logps, rtol=0, atol=1e-4)
    assert got.dtype == np.float64 and got.shape == (len(PAIRS),)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
    assert np.ptp(got) > 1e-2  # the judge tells the completions apart: not a constant
