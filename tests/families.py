"""Tiny random models of real architectures, built from config (no download): the families the pipeline is tested
on. Every one shares the tiny BPE tokenizer (vocab 512) and has head_dim 32 (vLLM's CPU kernels need >= 32)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.demo.tiny import build_tokenizer

VOCAB = 512
_IDS = dict(vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2)
_DECODER = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)

# model_type -> config fields. Tied and untied heads, learned and rotary positions, parallel blocks, softcapping.
FAMILIES: dict[str, dict] = {
    "gpt2": dict(n_embd=64, n_layer=2, n_head=2, n_positions=512),  # tied head, learned positions, Conv1D
    "gpt_neox": dict(**_DECODER, tie_word_embeddings=False),  # Pythia: untied embed_out, partial rotary
    "opt": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, ffn_dim=128, word_embed_proj_dim=64,
                max_position_embeddings=512),  # tied, model.decoder.layers
    "qwen2": dict(**_DECODER, num_key_value_heads=1, tie_word_embeddings=True),
    "mistral": dict(**_DECODER, num_key_value_heads=1),
    "gemma": dict(**_DECODER, num_key_value_heads=1, head_dim=32),  # tied, scaled embeddings
    "gemma2": dict(**_DECODER, num_key_value_heads=1, head_dim=32),  # final-logit and attention softcapping
    "phi3": dict(**_DECODER, num_key_value_heads=1),  # fused qkv / gate_up projections
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2),  # parallel attention, MQA
}


def build_family(out_dir: Path, family: str, seed: int = 0, initializer_range: float = 0.2) -> Path:
    """A random `family` model + the tiny tokenizer in `out_dir` (safetensors, fp32)."""
    config = AutoConfig.for_model(family, **_IDS, **FAMILIES[family], initializer_range=initializer_range)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out_dir)
    build_tokenizer(out_dir, vocab_size=VOCAB)
    return out_dir
