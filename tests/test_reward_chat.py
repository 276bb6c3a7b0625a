"""A chat reward model reads the conversation in its own chat template: a tiny reward model whose template differs
from the policy's scores exactly `apply_chat_template` of the prompt's messages and the completion with its own
tokenizer; text prompts, `chat_template: false` and `text: completion` keep plain text; the identity follows the
rendering; evaluation passes the prompts' sources through. Unit tier: no Ray, no vLLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from pydantic import ValidationError
from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from pipeline.config import RewardConfig
from pipeline.engines.actors import SAMPLED
from pipeline.engines.chunks import PROMPTS, PromptFile, SampledChunk, read_table, write_table
from pipeline.engines.rewards import build_reward, reward_identity, reward_inputs
from pipeline.errors import UserError
from pipeline.evaluation.summary import finish_chunk, write_chosen_rewards
from pipeline.store.storage import Store
from tests import reward_fixtures

# Role markers in plain text, not the policy's <|user|> / <|assistant|> special tokens; its own BOS, as Llama 3's.
RM_TEMPLATE = ("{{ bos_token }}{% for m in messages %}"
               "{% if m['role'] == 'tool' %}{{ raise_exception('tool messages are not supported') }}{% endif %}"
               "### {{ m['role'] | capitalize }}:\n{{ m['content'] }}\n\n{% endfor %}")

CONVERSATION = [{"role": "system", "content": "You review films."},
                {"role": "user", "content": "what did you like about the film?"}]
SAMPLES = [  # (policy-rendered prompt text, completion, source as the row holds it)
    ("You review films.what did you like about the film?", " The music was great.", CONVERSATION),
    ("Human: how was the story? Assistant:", " Boring.", "Human: how was the story? Assistant:"),
    ("why?", " Because the actor was really very good and the ending was moving.",
     [{"role": "user", "content": "why?"}]),
]


def save_rm(out: Path, tiny_model: Path, template: str | None, seed: int = 0) -> Path:
    """A tiny LlamaForSequenceClassification (one label) with the tiny tokenizer and chat template `template`."""
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = template
    config = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32, initializer_range=0.2,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, num_labels=1)
    torch.manual_seed(seed)
    LlamaForSequenceClassification(config).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def rms(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("chat-reward-models")
    return {"chat": save_rm(root / "chat", tiny_model, RM_TEMPLATE),
            "plain": save_rm(root / "plain", tiny_model, None)}


def cfg(model: Path, **kw) -> RewardConfig:
    return RewardConfig.model_validate({"type": "model", "model": str(model), "batch_size": 2, **kw})


def score(reward, samples=SAMPLES, sources=True):
    return reward([p for p, _, _ in samples], [c for _, c, _ in samples],
                  **({"sources": [s for _, _, s in samples]} if sources else {}))


def capture(reward) -> list[list[int]]:
    """Record the unpadded token ids of every row the reward model's forward receives."""
    seen, forward = [], reward.model.forward

    def recording(input_ids, attention_mask, **kw):
        seen.extend(ids[mask.bool()].tolist() for ids, mask in zip(input_ids, attention_mask))
        return forward(input_ids=input_ids, attention_mask=attention_mask, **kw)
    reward.model.forward = recording
    return seen


def direct(model_dir: Path, sequences: list[list[int]]) -> list[float]:
    """Independent reference: each sequence alone, unpadded, the score head on its last token."""
    model = LlamaForSequenceClassification.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1])[0].item()
                for ids in sequences]


def chat_ids(tok, messages, completion) -> list[int]:
    return tok.apply_chat_template([*messages, {"role": "assistant", "content": completion}], tokenize=True,
                                   return_dict=False)


def test_conversations_are_scored_in_the_reward_models_own_template(rms, tokenizer):
    rm_tok = AutoTokenizer.from_pretrained(rms["chat"])
    assert rm_tok.chat_template != tokenizer.chat_template  # the policy's template is another one
    reward = build_reward(cfg(rms["chat"]))
    seen = capture(reward)
    got = score(reward)  # batch_size 2 over 3 samples of different lengths: padding, a partial batch
    want = [chat_ids(rm_tok, CONVERSATION, SAMPLES[0][1]),
            rm_tok(SAMPLES[1][0] + SAMPLES[1][1])["input_ids"],  # a text prompt: plain text, as before
            chat_ids(rm_tok, SAMPLES[2][2], SAMPLES[2][1])]
    assert sorted(seen) == sorted(want)
    assert want[0][0] == rm_tok.bos_token_id and want[0].count(rm_tok.bos_token_id) == 1  # no double BOS
    assert "### Assistant:\n The music was great." in rm_tok.decode(want[0])
    np.testing.assert_allclose(got, direct(rms["chat"], want), rtol=0, atol=1e-5)
    assert got.dtype == np.float64


def test_plain_text_without_sources_a_template_or_with_chat_template_false(rms):
    rm_tok = AutoTokenizer.from_pretrained(rms["chat"])
    plain = reward_inputs(cfg(rms["chat"]), rm_tok, [p for p, _, _ in SAMPLES], [c for _, c, _ in SAMPLES])
    assert plain == [rm_tok(p + c)["input_ids"] for p, c, _ in SAMPLES]  # no sources: prompt + completion
    old = score(build_reward(cfg(rms["chat"])), sources=False)
    np.testing.assert_allclose(old, direct(rms["chat"], plain), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(score(build_reward(cfg(rms["chat"], chat_template=False))), old)
    # The same weights without a template: plain text whatever the sources.
    no_template = score(build_reward(cfg(rms["plain"])))
    np.testing.assert_array_equal(no_template, score(build_reward(cfg(rms["plain"])), sources=False))
    np.testing.assert_allclose(no_template, old, rtol=0, atol=1e-6)


def test_text_completion_reads_the_completion_alone(rms):
    rm_tok = AutoTokenizer.from_pretrained(rms["chat"])
    ids = reward_inputs(cfg(rms["chat"], text="completion"), rm_tok, [p for p, _, _ in SAMPLES],
                        [c for _, c, _ in SAMPLES], [s for _, _, s in SAMPLES])
    assert ids == [rm_tok(c)["input_ids"] for _, c, _ in SAMPLES]


def test_chat_template_true_renders_text_prompts_as_a_user_message(rms):
    rm_tok = AutoTokenizer.from_pretrained(rms["chat"])
    ids = reward_inputs(cfg(rms["chat"], chat_template=True), rm_tok, [p for p, _, _ in SAMPLES],
                        [c for _, c, _ in SAMPLES], [s for _, _, s in SAMPLES])
    assert ids[1] == chat_ids(rm_tok, [{"role": "user", "content": SAMPLES[1][2]}], SAMPLES[1][1])
    assert ids[0] == chat_ids(rm_tok, CONVERSATION, SAMPLES[0][1])
    for make in (build_reward, reward_identity):
        with pytest.raises(UserError, match="eval.reward.chat_template is true .* no chat template"):
            make(cfg(rms["plain"], chat_template=True))
    with pytest.raises(ValidationError, match="eval.reward.text: completion"):
        cfg(rms["chat"], chat_template=True, text="completion")


def test_long_conversations_keep_their_bos_and_end(rms):
    rm_tok = AutoTokenizer.from_pretrained(rms["chat"])
    full = chat_ids(rm_tok, CONVERSATION, SAMPLES[0][1])
    ids = reward_inputs(cfg(rms["chat"], max_length=8), rm_tok, [SAMPLES[0][0]], [SAMPLES[0][1]], [CONVERSATION])
    assert len(full) > 8 and ids == [full[:1] + full[-7:]]


def test_a_conversation_the_template_refuses_is_a_user_error(rms):
    tool = [*CONVERSATION, {"role": "tool", "content": "{}"}]
    with pytest.raises(UserError, match="chat template failed.*set eval.reward.chat_template: false"):
        build_reward(cfg(rms["chat"]))(["p"], [" c"], sources=[tool])


def test_identity_follows_the_rendering(rms, tmp_path, tiny_model):
    chat = {v: reward_identity(cfg(rms["chat"], chat_template=v)) for v in (None, False, True)}
    assert len({json.dumps(i, sort_keys=True) for i in chat.values()}) == 3
    assert chat[None]["rendering"] == chat[True]["rendering"] and "rendering" not in chat[False]
    # Plain text: the identity it had before chat rendering existed (its cached results stay valid).
    plain = reward_identity(cfg(rms["plain"]))
    assert plain == reward_identity(cfg(rms["plain"], chat_template=False))
    assert set(plain) == {"type", "model", "tokenizer", "label", "text", "max_length"}
    assert set(reward_identity(cfg(rms["chat"], text="completion"))) == set(plain)
    # Another template, the same weights and tokenizer files otherwise: other rewards, another identity.
    other = save_rm(tmp_path / "other", tiny_model, RM_TEMPLATE.replace("###", "##"))
    assert reward_identity(cfg(other))["template_sha256"] != chat[None]["template_sha256"]


def test_rules_and_user_functions_are_called_as_before():
    reward_fixtures.CALLS.clear()
    fn = build_reward(RewardConfig.model_validate({"type": "callable",
                                                   "function": "tests.reward_fixtures:count_char"}))
    assert fn(["p"], ["banana"], sources=[CONVERSATION]).tolist() == [3.0]
    assert reward_fixtures.CALLS == [(["p"], ["banana"], {"char": "a"})]  # no sources passed on
    rule = build_reward(RewardConfig.model_validate({"type": "rule", "rule": "length"}))
    assert rule(["p"], ["one two"], sources=[CONVERSATION]).tolist() == [2.0]


def _prompt_file(uri: str, tokenizer) -> PromptFile:
    prompts, sources = [p for p, _, _ in SAMPLES], [s for _, _, s in SAMPLES]
    chosen = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c, _ in SAMPLES]
    write_table(uri, pa.table({"id": ["a", "b", "c"], "prompt_input_ids": [tokenizer(p)["input_ids"] for p in prompts],
                               "chosen_input_ids": [chosen[0], None, chosen[2]], "prompt": prompts,
                               "prompt_source": [json.dumps(s) for s in sources]}, schema=PROMPTS))
    return PromptFile(uri, 0, len(SAMPLES))


def test_evaluation_scores_samples_and_chosen_responses_with_their_sources(rms, tokenizer, tmp_path):
    """finish_chunk and write_chosen_rewards, as evaluation runs them beside the reward model: the prompts'
    sources (the prompt files' `prompt_source`) reach the reward."""
    files = [_prompt_file(f"{tmp_path}/prompts/0.parquet", tokenizer)]
    completions = [tokenizer(c, add_special_tokens=False)["input_ids"] for _, c, _ in SAMPLES]
    write_table(f"{tmp_path}/sampled.parquet", pa.table({
        "prompt_index": [0, 1, 2], "sample_index": [0, 0, 0], "completion_ids": completions,
        "token_logps": [[-1.0] * len(c) for c in completions], "finish_reason": ["stop"] * 3}, schema=SAMPLED))
    write_table(f"{tmp_path}/ref.parquet", pa.table({"ref_token_logps": pa.array(
        [[-1.5] * len(c) for c in completions], pa.list_(pa.float32()))}))
    reward = build_reward(cfg(rms["chat"]))
    stats = finish_chunk(reward, SampledChunk("t", f"{tmp_path}/sampled.parquet", 0), files,
                         f"{tmp_path}/ref.parquet", tokenizer, f"{tmp_path}/samples.parquet")
    want = score(reward)
    got = read_table(f"{tmp_path}/samples.parquet").column("reward").to_numpy()
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert abs(got[0] - score(reward, sources=False)[0]) > 1e-4  # the conversation, not the plain text
    assert stats.samples == 3 and stats.reward.mean == pytest.approx(want.mean())
    write_chosen_rewards(reward, files, tokenizer, f"{tmp_path}/chosen_rewards.json", "k")
    chosen = Store(str(tmp_path)).read_json("chosen_rewards.json")["rewards"]
    assert chosen[1] is None
    np.testing.assert_allclose([chosen[0], chosen[2]], want[[0, 2]], rtol=0, atol=1e-5)  # other batches
