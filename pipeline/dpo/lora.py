"""LoRA with a cached reference: the base model stays frozen (and sharded), only the adapters train.

`add_adapters` wraps a causal LM (built on the meta device) with peft's LoRA layers; FSDP2 then shards base and
adapters together (frozen and trainable parameters mix in one unit; only the adapters get gradients and
optimizer state). After `load_hf_weights` has filled the base, `init_adapters` gives every rank the same initial
adapter values (peft's default: A Kaiming-uniform, B zero, so the policy starts equal to the reference).
`hf_param_name` maps the wrapped names back to the base checkpoint's; `peft_state` gives an exported adapter the
names `PeftModel.from_pretrained` and vLLM read.

With an in-loop reference, the reference is the policy itself with its adapters disabled (`AdaptersDisabled`):
no second model.
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from peft import LoraConfig, PeftModel

# peft is imported by the functions that build or export adapters, not here: importing it takes seconds (much of
# transformers with it), and every training worker imports this module, LoRA or not.

# Parameters peft adds that the base checkpoint does not have.
_ADAPTER = re.compile(r"\.lora_(A|B|embedding_A|embedding_B|magnitude_vector)\.")
_SAVED_COPY = re.compile(r"\.modules_to_save\.[^.]+\.")  # a trainable copy of a whole module (modules_to_save)
PEFT_PREFIX = "base_model.model."


def add_adapters(lm: nn.Module, settings) -> PeftModel:
    """`lm` with LoRA adapters (train.lora: rank, alpha, dropout, target_modules, modules_to_save). Every base
    parameter is frozen; adapters and modules_to_save copies are trainable. Works on a meta-device model."""
    from peft import LoraConfig, get_peft_model  # noqa: PLC0415 (lazy: see the imports)

    config = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                        target_modules=settings.target_modules, modules_to_save=settings.modules_to_save,
                        task_type="CAUSAL_LM")
    return get_peft_model(lm, config)


def is_adapter_param(name: str) -> bool:
    """A parameter the adapters add (not in the base checkpoint; modules_to_save copies are loaded from it)."""
    return bool(_ADAPTER.search(f".{name}"))


def is_trained(name: str) -> bool:
    """A parameter LoRA training changes: adapters and modules_to_save copies."""
    return is_adapter_param(name) or bool(_SAVED_COPY.search(f".{name}"))


def hf_param_name(name: str) -> str | None:
    """The base checkpoint's name of a (possibly peft-wrapped) parameter name; None for adapter weights.
    `base_model.model.model.layers.0.q_proj.base_layer.weight` -> `model.layers.0.q_proj.weight`; a
    modules_to_save copy and the module it copies both map to the module's own name."""
    if is_adapter_param(name):
        return None
    name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
    return _SAVED_COPY.sub(".", name.replace(".original_module.", "."))


def initial_adapter_values(shapes: dict[str, torch.Size], seed: int) -> dict[str, torch.Tensor]:
    """peft's default initialisation, computed the same on every rank from `seed`: lora_A (and embedding B)
    Kaiming-uniform(a=sqrt(5)), lora_B (and embedding A) zero, so the first step's policy equals the reference."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(shapes.items()):
        value = torch.zeros(shape)
        if ".lora_A." in f".{name}" or ".lora_embedding_B." in f".{name}":
            nn.init.kaiming_uniform_(value, a=math.sqrt(5), generator=gen)
        out[name] = value
    return out


@contextmanager
def adapters_disabled(lm: nn.Module) -> Iterator[None]:
    """The base model's forward (peft's `disable_adapter`); nothing to do for a model without adapters."""
    peft = sys.modules.get("peft")  # not imported: `lm` cannot be a PeftModel
    if peft is not None and isinstance(lm, peft.PeftModel):
        with lm.disable_adapter():
            yield
    else:
        yield


class AdaptersDisabled(nn.Module):
    """The in-loop reference of LoRA training: the (sharded) policy run with its adapters off."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, *args, **kwargs):
        with adapters_disabled(self.policy.lm):
            return self.policy(*args, **kwargs)


def peft_state(lm: PeftModel, trained: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Gathered trainable tensors (names as in `lm`, without the `lm.` of the policy) under the names peft saves
    (`base_model.model.<module>.lora_A.weight`, ...): what `PeftModel.from_pretrained` and vLLM load."""
    from peft import get_peft_model_state_dict  # noqa: PLC0415 (lazy: see the imports)

    return get_peft_model_state_dict(lm, state_dict=trained)


def adapter_export(lm: PeftModel, groups: Iterable[dict[str, torch.Tensor]],
                   base_name: str) -> tuple[dict[str, torch.Tensor], LoraConfig]:
    """The gathered trainable weights (`hf_weight_groups(select=is_trained)` on rank 0) under peft's names, and
    the adapter's config naming `base_name` as its base: what `export_adapter` writes."""
    tensors = peft_state(lm, {k: v for part in groups for k, v in part.items()})
    config = lm.peft_config["default"]
    config.base_model_name_or_path = base_name
    return tensors, config
