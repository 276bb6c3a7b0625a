"""Building the causal LM of a model directory with torch and transformers: loaded in eval mode for scoring, or as a
skeleton on the meta device for FSDP to shard before each rank reads its part; its attention kernel; dropout off;
a LoRA adapter merged into its base. Where the model is (paths, hub ids, identities) is `pipeline.data.models`."""

from __future__ import annotations

import contextlib
import importlib.util
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

from pipeline.errors import UserError

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def attention_implementation(setting: str, config, device: torch.device | str) -> str | None:
    """`model.attn_implementation` for a model of `config` on `device` (None: transformers' default, sdpa where the
    model has it). `auto` takes flash-attention 2 on a GPU where the package is installed and the model supports
    it: packed rows (`position_ids` restarting per sequence) then run its variable-length kernel instead of a dense
    block mask."""
    if setting != "auto":
        if setting == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise UserError("model.attn_implementation is flash_attention_2 but the flash-attn package is not "
                            "installed on this node; pip install flash-attn, or set model.attn_implementation: sdpa")
        return setting
    if torch.device(device).type != "cuda" or importlib.util.find_spec("flash_attn") is None:
        return None
    model_class = AutoModelForCausalLM._model_mapping.get(type(config), None)
    return "flash_attention_2" if getattr(model_class, "_supports_flash_attn", False) else None


def load_hf_model(local_dir: str, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False,
                  attn_implementation: str = "auto"):
    """A transformers causal LM in eval mode on `device`."""
    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(
        local_dir, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code,
        attn_implementation=attention_implementation(attn_implementation, config, device))
    return model.to(device).eval()


def disable_dropout(model: nn.Module) -> None:
    """Every dropout of `model` off, also in training mode: `nn.Dropout` modules and the float rates attention
    layers keep as attributes (`attention_dropout`, passed to the attention kernel while training). The config is
    left as it is, so checkpoints keep the model's own settings."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name, value in list(vars(module).items()):
            if "dropout" in name and isinstance(value, float):
                setattr(module, name, 0.0)


def merge_adapter(base_dir: str, dtype: torch.dtype, adapter_dir: Path, out_dir: Path) -> None:
    """A full Hugging Face model of base + LoRA adapter (peft's merge_and_unload), in `dtype`, at `out_dir`: loads
    the whole base model into this host's memory."""
    # Lazy: importing peft takes seconds (it imports much of transformers), and every Ray worker that scores or
    # trains imports this module; only merging an adapter needs it.
    from peft import PeftModel  # noqa: PLC0415

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype)
    PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload().save_pretrained(str(out_dir))


@contextlib.contextmanager
def _parameters_on_meta():
    """Parameters registered inside are moved to the meta device as they are created (one at a time: nothing the
    size of the model is ever allocated); buffers stay real, so values computed at construction (a rotary
    embedding's non-persistent `inv_freq`) survive. The approach of accelerate's
    `init_empty_weights(include_buffers=False)`."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def empty_causal_lm(local_dir: str, dtype: str = "float32", trust_remote_code: bool = False,
                    attn_implementation: str = "auto", device: torch.device | str = "cpu") -> nn.Module:
    """The causal LM of `local_dir` with its parameters on the meta device (no memory, no weights read): the
    skeleton FSDP shards before each rank fills only its shards (`pipeline.dpo.parallel.load_hf_weights`), with
    the attention kernel `attention_implementation` picks for `device`."""
    config = AutoConfig.from_pretrained(local_dir, trust_remote_code=trust_remote_code)
    with _parameters_on_meta():
        lm = AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, DTYPES[dtype]), trust_remote_code=trust_remote_code,
            attn_implementation=attention_implementation(attn_implementation, config, device))
    if (Path(local_dir) / "generation_config.json").is_file():  # what from_pretrained would give the model
        lm.generation_config = GenerationConfig.from_pretrained(local_dir)
    return lm
