"""Parallelism: FSDP2 applied in one place, and the policy wrapper whose forward is "response log-probs".

Model code stays plain transformers. `PolicyLogps` is the FSDP root: its forward runs the decoder and the LM head
on response positions only, so the root's parameters (embeddings, final norm, head) are gathered for exactly
that forward and their gradients reduce-scattered after its backward.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from pipeline.dpo.logprobs import selective_token_logps
from pipeline.errors import UserError


class PolicyLogps(nn.Module):
    """forward(input_ids, attention_mask, score_mask) -> [N] log-probs of the scored tokens (row-major)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, attention_mask, score_mask):
        return selective_token_logps(self.lm, input_ids, attention_mask, score_mask)


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    layers = getattr(lm.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"cannot find the decoder blocks of {type(lm).__name__} (expected `model.layers`); "
                        f"use a Llama/Qwen/Mistral-style causal LM")
    return layers


def apply_fsdp(model: PolicyLogps, param_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
               cpu_offload: bool = False, compile_blocks: bool = False) -> PolicyLogps:
    """FSDP2 over the default process group: each decoder block is one unit, the rest (embeddings, norm, head)
    the root. Parameters compute in `param_dtype`; gradients reduce in fp32. Every rank must hold identical
    weights before this (fully_shard shards what it is given; it does not broadcast). `compile_blocks`:
    torch.compile each block (dynamic shapes), inside FSDP's hooks."""
    if activation_checkpointing:
        model.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    layers = decoder_layers(model.lm)
    for i, layer in enumerate(layers):
        if compile_blocks:
            layer.compile(dynamic=True)
        # The last block's parameters are needed again at the start of backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model
