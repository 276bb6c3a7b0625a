"""Chat templates in the shape of real model families, through the pipeline's own tokenization.

Each shape pairs a template written like the family's (Llama-3, Llama-2, Mistral, Gemma, ChatML/Qwen2, Phi-3) with
a tokenizer of the family's kind, built here from code: byte-level BPE for Llama-3 and Qwen2, SentencePiece-style
BPE (transformers' own `LlamaTokenizer` / `GemmaTokenizer`, with byte fallback) for the others. Expectations come
from the tokenizer's primitives (`apply_chat_template(tokenize=False)`, encode without special tokens, decode), as
in `rows.py`'s contract: the prompt is the rendering with the generation prompt, the response the rest of the
rendering of prompt + response, nothing added. Together they are the tokens of the whole rendering, which is what
`apply_chat_template(tokenize=True)` gives, and they decode back to it.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GemmaTokenizer, LlamaTokenizer, PreTrainedTokenizerFast, Qwen2Tokenizer

from pipeline.data.models import load_tokenizer
from pipeline.data.rows import tokenize_prompts, tokenize_rows
from pipeline.demo.tiny import WORDS, build_tokenizer

MARKER = "\n\nAssistant:"

# ---------------------------------------------------------------- templates, in the shape of the real ones

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
    " + message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Llama-2-chat: BOS before every user turn, the system prompt folded into the first one, no generation prompt
# (the rendering of a prompt already ends with "[/INST]").
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}"
    "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' ' + content.strip() + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

# Mistral-Instruct: one BOS, the answer right after "[/INST]" (no space), then EOS.
MISTRAL = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system_message = messages[0]['content'] %}"
    "{% set loop_messages = messages[1:] %}{% else %}{% set system_message = false %}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}{% if message['role'] == 'user' %}"
    "{% if loop.first and system_message %}"
    "{{ '[INST] <<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% endif %}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
)

GEMMA = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}"
    "{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{{ message['content'] | trim }}{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)

CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Phi-3-mini-instruct: no BOS in the template (the tokenizer's plain encode adds one); EOS after the last turn of a
# rendering without the generation prompt.
PHI3 = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% else %}{{ eos_token }}{% endif %}"
)

LLAMA3_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# ---------------------------------------------------------------- tokenizers of each kind, built from code


def _corpus() -> list[str]:
    rng = random.Random(0)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 12))) + rng.choice(".?!") for _ in range(800)]


def _trained(pre_tokenizer, specials: list[str], alphabet: list[str] | None = None) -> tuple[dict, list]:
    """Vocab and merges of a BPE trained on the corpus with `pre_tokenizer`."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=specials, initial_alphabet=alphabet or [],
                                  show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    return tok.get_vocab(), [tuple(m) for m in json.loads(tok.to_str())["model"]["merges"]]


BYTES = [f"<0x{i:02X}>" for i in range(256)]  # SentencePiece byte fallback pieces


def _sentencepiece(cls, unk: str, bos: str, eos: str, specials: list[str], **kwargs):
    """A SentencePiece-style BPE (▁ for spaces, byte fallback) in transformers' own class for the family."""
    vocab, merges = _trained(pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never"),
                             [unk, bos, eos, *BYTES])
    tok = cls(vocab=vocab, merges=merges, unk_token=unk, bos_token=bos, eos_token=eos, add_bos_token=True, **kwargs)
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok


def _byte_level_pre():
    return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_REGEX), behavior="isolated"),
                                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])


def _llama3():
    """Byte-level BPE whose plain encode adds BOS (a post-processor), like Llama-3's tokenizer.json."""
    bos, eos = "<|begin_of_text|>", "<|end_of_text|>"
    specials = [bos, eos, "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    vocab, merges = _trained(_byte_level_pre(), specials, pre_tokenizers.ByteLevel.alphabet())
    tok = Tokenizer(models.BPE(vocab, merges))
    tok.pre_tokenizer, tok.decoder = _byte_level_pre(), decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, vocab[bos])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos,
                                   additional_special_tokens=specials[2:])


def _qwen2():
    vocab, merges = _trained(_byte_level_pre(), ["<|endoftext|>"], pre_tokenizers.ByteLevel.alphabet())
    tok = Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


def _llama2():
    return _sentencepiece(LlamaTokenizer, "<unk>", "<s>", "</s>", [])


def _gemma():
    return _sentencepiece(GemmaTokenizer, "<unk>", "<bos>", "<eos>", ["<start_of_turn>", "<end_of_turn>"],
                          pad_token="<pad>")


def _phi3():
    return _sentencepiece(LlamaTokenizer, "<unk>", "<s>", "<|endoftext|>",
                          ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"])


@dataclass(frozen=True)
class Shape:
    name: str
    build: object  # () -> tokenizer
    template: str
    bos: str  # "once" (at the start), "per_user_turn" (Llama-2) or "none"
    eot: str  # the template's end of turn
    turn: str  # an assistant response as the template renders it ("{}" is the content)
    encode_adds_bos: bool  # a plain encode adds BOS: encoding the rendering with special tokens would double it


SHAPES = [
    Shape("llama3", _llama3, LLAMA3, "once", "<|eot_id|>", "{}<|eot_id|>", True),
    Shape("llama2", _llama2, LLAMA2, "per_user_turn", "</s>", " {} </s>", True),
    Shape("mistral", _llama2, MISTRAL, "once", "</s>", "{}</s>", True),
    Shape("gemma", _gemma, GEMMA, "once", "<end_of_turn>", "{}<end_of_turn>\n", True),
    Shape("chatml", _qwen2, CHATML, "none", "<|im_end|>", "{}<|im_end|>\n", False),
    Shape("phi3", _phi3, PHI3, "none", "<|end|>", "{}<|end|>\n<|endoftext|>", True),
]


def saved(shape: Shape, out) -> object:
    """The shape's tokenizer with its template, saved and loaded back the way the pipeline loads tokenizers."""
    tok = shape.build()
    tok.chat_template = shape.template
    tok.save_pretrained(str(out))
    return load_tokenizer(str(out))


@pytest.fixture(scope="module", params=SHAPES, ids=[s.name for s in SHAPES])
def shaped(request, tmp_path_factory):
    return request.param, saved(request.param, tmp_path_factory.mktemp(request.param.name))


# ---------------------------------------------------------------- checks


SYSTEM = {"role": "system", "content": "you are a film critic."}
U1 = {"role": "user", "content": "how was the movie?"}
A1 = {"role": "assistant", "content": "The movie was moving."}
U2 = {"role": "user", "content": "and the ending?"}
GOOD = "The ending was great, I love it."
BAD = "The ending was dull."


def turn(content: str) -> dict:
    return {"role": "assistant", "content": content}


def render(tok, messages, generation: bool = False) -> str:
    return tok.apply_chat_template(messages, add_generation_prompt=generation, tokenize=False)


def plain(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def check(shape: Shape, tok, prompt: list[dict], content: str, prompt_ids: list[int], response_ids: list[int]):
    """prompt_ids / response_ids against the rendering of prompt (+ response) by the tokenizer's own template."""
    gen, full = render(tok, prompt, generation=True), render(tok, prompt + [turn(content)])
    assert full.startswith(gen)
    # The prompt: the rendering with the generation prompt, no special tokens added.
    assert prompt_ids == plain(tok, gen)
    assert tok.decode(prompt_ids, skip_special_tokens=False) == gen
    # Prompt + response: the tokens of the whole rendering, decoding to exactly it.
    assert prompt_ids + response_ids == plain(tok, full)
    assert tok.decode(prompt_ids + response_ids, skip_special_tokens=False) == full
    # The response: the rendering after the generation prompt (decoded in context: a SentencePiece decoder drops
    # the leading space of what it decodes), the template's end of turn once, nothing after what it writes.
    assert full[len(gen):] == shape.turn.format(content)
    eot = tok.convert_tokens_to_ids(shape.eot)
    assert response_ids.count(eot) == 1
    closing = shape.turn[shape.turn.index(shape.eot):]  # what the template writes from its end of turn on
    assert tok.decode(response_ids[response_ids.index(eot):], skip_special_tokens=False) == closing
    # BOS: as often as the template writes it, never doubled by the tokenizer's own BOS.
    ids = prompt_ids + response_ids
    bos = tok.bos_token_id
    expected = {"once": 1, "none": 0, "per_user_turn": sum(m["role"] == "user" for m in prompt)}[shape.bos]
    assert (ids.count(bos) if bos is not None else 0) == expected
    assert (full.count(tok.bos_token) if tok.bos_token else 0) == expected
    if expected:
        assert ids[0] == bos and ids[1] != bos
    else:
        assert bos is None or bos not in ids


def test_shape_tokenizer(shaped):
    """The tokenizers are of the kind the shape claims: plain encode adds BOS where the family's does."""
    shape, tok = shaped
    ids = tok("the movie").input_ids
    assert (ids[0] == tok.bos_token_id) == shape.encode_adds_bos
    assert tok.convert_tokens_to_ids(shape.eot) != tok.unk_token_id
    if shape.encode_adds_bos and shape.bos != "none":
        # the naive encode of a rendering (special tokens added) would start with two BOS
        assert tok(render(tok, [U1], generation=True)).input_ids[:2] == [tok.bos_token_id] * 2


@pytest.mark.parametrize("prompt", [[SYSTEM, U1], [U1], [SYSTEM, U1, A1, U2]], ids=["system", "user", "multi_turn"])
def test_rows_with_prompt(shaped, prompt):
    shape, tok = shaped
    row = {"prompt": prompt, "chosen": [turn(GOOD)], "rejected": [turn(BAD)]}
    (pair,), rejects = tokenize_rows([(0, row)], tok, "conversational", 512, 256, MARKER)
    assert rejects == []
    check(shape, tok, prompt, GOOD, pair.prompt_input_ids, pair.chosen_input_ids)
    check(shape, tok, prompt, BAD, pair.prompt_input_ids, pair.rejected_input_ids)


def test_rows_without_prompt_use_common_prefix(shaped):
    """Whole conversations: the shared messages (system, a first exchange, a second question) are the prompt."""
    shape, tok = shaped
    history = [SYSTEM, U1, A1, U2]
    rows = [(0, {"chosen": history + [turn(GOOD)], "rejected": history + [turn(BAD)]}),
            (1, {"prompt": history, "chosen": history + [turn(GOOD)], "rejected": history + [turn(BAD)]})]
    (a, b), rejects = tokenize_rows(rows, tok, "auto", 512, 256, MARKER)
    assert rejects == []
    check(shape, tok, history, GOOD, a.prompt_input_ids, a.chosen_input_ids)
    check(shape, tok, history, BAD, a.prompt_input_ids, a.rejected_input_ids)
    assert (a.prompt_input_ids, a.chosen_input_ids, a.rejected_input_ids) == \
           (b.prompt_input_ids, b.chosen_input_ids, b.rejected_input_ids)


def test_chatml_default_system_prompt(tmp_path):
    """ChatML (Qwen2) inserts a default system prompt when none is given: it belongs to the prompt."""
    shape = next(s for s in SHAPES if s.name == "chatml")
    tok = saved(shape, tmp_path)
    gen = render(tok, [U1], generation=True)
    assert gen.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    (pair,), _ = tokenize_rows([(0, {"prompt": [U1], "chosen": [turn(GOOD)], "rejected": [turn(BAD)]})], tok,
                               "conversational", 512, 256, MARKER)
    assert pair.prompt_input_ids == plain(tok, gen)
    check(shape, tok, [U1], GOOD, pair.prompt_input_ids, pair.chosen_input_ids)


def test_prompts_for_evaluation(shaped):
    """tokenize_prompts: prompt-only rows (messages) and preference rows (prompt + the dataset's chosen)."""
    shape, tok = shaped
    history = [SYSTEM, U1, A1, U2]
    rows = [(0, {"prompt": history}),
            (1, {"prompt": [SYSTEM, U1], "chosen": [turn(GOOD)], "rejected": [turn(BAD)]})]
    (only, pref), rejects = tokenize_prompts(rows, tok, "auto", 512, 256, MARKER)
    assert rejects == []
    assert only.prompt_input_ids == plain(tok, render(tok, history, generation=True))
    assert only.chosen_input_ids is None
    check(shape, tok, [SYSTEM, U1], GOOD, pref.prompt_input_ids, pref.chosen_input_ids)
    (pair,), _ = tokenize_rows([rows[1]], tok, "auto", 512, 256, MARKER)
    assert (pref.prompt_input_ids, pref.chosen_input_ids) == (pair.prompt_input_ids, pair.chosen_input_ids)
    # The prompt as the row holds it, for datasets built from these prompts (on-policy pairs).
    assert [json.loads(i.source) for i in (only, pref)] == [history, [SYSTEM, U1]]
    (text, implicit), _ = tokenize_prompts([(0, {"prompt": "Q: hi", "chosen": " a", "rejected": " b"}),
                                            (1, {"chosen": f"Q: yo{MARKER} a", "rejected": f"Q: yo{MARKER} b"})],
                                           tok, "auto", 512, 256, MARKER)
    assert [json.loads(i.source) for i in (text, implicit)] == ["Q: hi", f"Q: yo{MARKER}"]


def test_merge_across_the_prompt_boundary(tmp_path):
    """A tokenizer that merges across the end of the generation prompt (GPT-2's regex keeps a trailing "\n\n"
    whole, and this one has learned it as one token): the whole rendering's tokens do not start with the prompt's,
    so the response is encoded alone; prompt tokens stay those of the generation prompt, and the pair still
    decodes to the rendering."""
    rng = random.Random(0)
    corpus = ["\n\n".join(" ".join(rng.choice(WORDS) for _ in range(6)) for _ in range(3)) + "\n\n"
              for _ in range(300)]
    build_tokenizer(tmp_path, corpus=corpus)
    template = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>\n\n{{ m['content'] }}{{ eos_token }}"
                "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n\n{% endif %}")
    tok = load_tokenizer(str(tmp_path), template)
    prompt = [U1]
    gen, full = render(tok, prompt, generation=True), render(tok, prompt + [turn(GOOD)])
    assert plain(tok, full)[:len(plain(tok, gen))] != plain(tok, gen)  # the merge this test is about
    (pair,), rejects = tokenize_rows([(0, {"prompt": prompt, "chosen": [turn(GOOD)], "rejected": [turn(BAD)]})],
                                     tok, "conversational", 512, 256, MARKER)
    assert rejects == []
    assert pair.prompt_input_ids == plain(tok, gen)
    assert pair.chosen_input_ids == plain(tok, full[len(gen):])
    assert tok.decode(pair.prompt_input_ids + pair.chosen_input_ids, skip_special_tokens=False) == full
