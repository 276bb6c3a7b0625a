"""LoRA adapter checkpoints for the tests, built with peft directly: what training with `train.lora` exports
(`step_NNNNNN/`: the adapter as `save_pretrained` writes it, the tokenizer, the hash record)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.store.checkpoints import RECORD
from pipeline.store.fingerprint import model_files_hash

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_adapter(base: Path, out: Path, rank: int, seed: int, targets=ALL_LINEAR, scale: float = 0.1,
                 record: bool = True, **lora_kwargs) -> Path:
    """A LoRA adapter of the model in `base` with seeded random A *and* B (peft starts B at zero: an adapter
    that changes nothing would let a test pass that ignores it), saved in `out` like a training export."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(targets),
                                                  **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(scale * torch.randn(p.shape, generator=g))
    peft_model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    if record:
        (out / RECORD).write_text(json.dumps({"model_files_sha256": model_files_hash(out, top_level=True),
                                              "dtype": "float32"}))
    return out
