"""Tiny assets built from code: a Llama-style model and a byte-level BPE tokenizer with a chat template.

Nothing here touches the network. Tests and the demo use these instead of hub models; the same loading code
handles both. Builds are deterministic: the same arguments give byte-identical tokenizer files and weights.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|endoftext|>", "<|pad|>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]

# One assistant turn ends with EOS, so a rendered response already carries its terminator.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

WORDS = (
    "the a movie film story plot actor actress scene music score ending director camera script role "
    "was is were felt seemed looked sounded became stayed remained "
    "great good wonderful brilliant moving charming funny delightful superb beautiful "
    "bad boring awful dull terrible weak clumsy tedious flat messy "
    "very quite really rather truly somewhat slightly "
    "and but or so because while although yet "
    "I you we they it this that my your our their "
    "love hate like enjoy watch recommend remember forget "
    "what why how when where who which question answer help please thanks "
    "Human Assistant user assistant system"
).split()


def _corpus(n_lines: int = 2000) -> list[str]:
    """Deterministic pseudo-English lines covering the words, digits and punctuation the tests use."""
    rng = random.Random(0)
    lines = []
    for _ in range(n_lines):
        words = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
        punct = rng.choice([".", "!", "?", ",", ":", ";"])
        lines.append(" ".join(words) + punct + " " + str(rng.randint(0, 999)))
    lines.append("\n\nHuman: \n\nAssistant: ")
    return lines


def build_tokenizer(out_dir: str | Path, vocab_size: int = 512, corpus: list[str] | None = None):
    """Train a byte-level BPE tokenizer on `corpus` (default: a built-in one) and save it as a Hugging Face
    tokenizer."""
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus if corpus is not None else _corpus(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # A plain-text encode starts with BOS, like Llama tokenizers; chat rendering adds it through the template.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, bos_id)]
    )
    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, additional_special_tokens=ROLE_TOKENS
    )
    hf_tok.chat_template = CHAT_TEMPLATE
    hf_tok.save_pretrained(str(out_dir))
    return hf_tok


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of the tiny Llama. head_dim = hidden_size / num_heads must be >= 32 (vLLM CPU kernels)."""

    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 2
    num_kv_heads: int = 1
    max_position_embeddings: int = 1024
    # Larger than the usual 0.02 so the random model's next-token distributions are far from uniform:
    # log-prob comparisons in tests then exercise real differences between tokens.
    initializer_range: float = 0.2
    seed: int = 0


def build_model(out_dir: str | Path, vocab_size: int, spec: TinyModelSpec = TinyModelSpec(), bos_id=1, eos_id=2,
                pad_id=0):
    """Build a randomly initialised Llama-style causal LM and save it (config.json + safetensors)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        initializer_range=spec.initializer_range,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        tie_word_embeddings=False,
        dtype="float32",
    )
    torch.manual_seed(spec.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return model


def build_tiny_assets(out_dir: str | Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a complete tiny model directory (model + tokenizer + chat template) loadable by transformers and vLLM."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out)
    build_model(out, vocab_size=len(tok), spec=spec, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id,
                pad_id=tok.pad_token_id)
    # A model card (docs: not part of the model's fingerprint) recording how the model was built.
    (out / "README.md").write_text(f"# Tiny test model\n\nBuilt by `dpo-pipeline tiny-assets` (random weights, no "
                                   f"download).\n\n```json\n{json.dumps({'spec': spec.__dict__}, indent=2)}\n```\n")
    return out
