"""Parallelism: every FSDP2 and distributed-checkpoint detail, behind small functions, and the policy wrapper whose
forward is "response log-probs".

Model code stays plain transformers. `PolicyLogps` is the FSDP root: its forward runs the decoder and the LM head
on response positions only, so the root's parameters (embeddings, final norm, head) are gathered for exactly
that forward and their gradients reduce-scattered after its backward.

`apply_fsdp` composes `apply_activation_checkpointing`, `compile_decoder_blocks` and `shard_model`. The training
step and the checkpoints go through `set_gradient_sync`, `full_tensor`, `full_hf_state_dict` and
`save_sharded_state`/`load_sharded_state`, which also accept an unsharded model (plain tensors, no process group
needed for the first three).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

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


# ---------------------------------------------------------------- applying FSDP2


def apply_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (transformers' non-reentrant checkpointing)."""
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_decoder_blocks(layers: nn.ModuleList) -> None:
    """torch.compile each decoder block (dynamic shapes); sharded afterwards, the compiled code runs inside FSDP's
    hooks."""
    for layer in layers:
        layer.compile(dynamic=True)


def shard_model(model: PolicyLogps, param_dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> PolicyLogps:
    """FSDP2 `fully_shard` over the default process group: each decoder block is one unit, the rest (embeddings,
    norm, head) the root. Parameters compute in `param_dtype`; gradients reduce in fp32."""
    kwargs = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    layers = decoder_layers(model.lm)
    for i, layer in enumerate(layers):
        # The last block's parameters are needed again at the start of backward: keep them gathered.
        fully_shard(layer, reshard_after_forward=i < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def apply_fsdp(model: PolicyLogps, param_dtype: torch.dtype = torch.float32, activation_checkpointing: bool = False,
               cpu_offload: bool = False, compile_blocks: bool = False) -> PolicyLogps:
    """Activation checkpointing and compiled blocks if asked, then `shard_model`. Every rank must hold identical
    weights before this (fully_shard shards what it is given; it does not broadcast)."""
    if activation_checkpointing:
        apply_activation_checkpointing(model.lm)
    if compile_blocks:
        compile_decoder_blocks(decoder_layers(model.lm))
    return shard_model(model, param_dtype, cpu_offload)


# ---------------------------------------------------------------- using a sharded model


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (FSDP2; False: they accumulate unsharded, in fp32).
    Nothing to do for an unsharded model."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_hf_state_dict(policy: PolicyLogps) -> dict[str, torch.Tensor]:
    """The whole model's weights on the CPU under Hugging Face parameter names (without `PolicyLogps`'s `lm.`).
    A collective: every rank calls it; with a process group only rank 0 gets the weights (others: empty)."""
    full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("lm."): v for k, v in full.items()}


def save_sharded_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state (torch.distributed.checkpoint; a collective)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def load_sharded_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load what `save_sharded_state` wrote into the model and optimizer, resharded to this world (a collective)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
