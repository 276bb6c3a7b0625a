"""What each training worker will hold, worked out before anything starts (`dpo-pipeline plan`): from the model's
config.json (its exact parameter counts, read off a meta-device skeleton) and the run's settings.

- Sharded state: FSDP2 shards the fp32 master weights, gradients and Adam's two moments over the W workers
  (gradients stay sharded between micro-batches on several workers: pipeline/dpo/step.py).
- Gathered blocks: in the compute dtype, the root (embeddings, final norm, head), the block being computed, the
  next (prefetched) and the last (kept gathered for backward).
- Gradients in flight: in backward, a unit's gradients exist whole (compute dtype, then fp32 for the
  reduce-scatter) until reduce-scattered; the root's from the loss's backward to the end of the pass, when they
  are cast in turn (the larger of the two moments).
- Activations of one micro-batch of T tokens (`train.micro_batch_tokens`, else `micro_batch_pairs` x 2 sequences x
  `data.max_length`, the padded worst case): per decoder layer the tensors autograd keeps, about 6h + 2kv + 4i
  values a token (h hidden, kv the key/value width, i the MLP width); with activation checkpointing one h-wide
  input a layer, plus one block's whole set while it is recomputed.
- The LM head, run on scored tokens in chunks of fp32 logits (pipeline/dpo/logprobs.py).

Checked against measured peaks on CPU: docs/MEMORY.md (`benchmarks/memory_plan.py`).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipeline.config.schema import LoraSettings, TrainConfig
from pipeline.data.modeling import empty_causal_lm
from pipeline.dpo.logprobs import LOGITS_PER_CHUNK
from pipeline.dpo.parallel import compute_dtype, decoder_blocks
from pipeline.errors import UserError

GB = 1e9


@dataclass(frozen=True)
class ModelShape:
    """A model's sizes, as the memory plan needs them."""

    params: int  # every parameter (tied weights once)
    trainable: int  # what the optimizer updates: all, or the LoRA adapters
    block_params: int  # the largest decoder block
    root_params: int  # everything outside the blocks (embeddings, final norm, head)
    layers: int
    hidden: int
    kv_width: int  # num_key_value_heads x head_dim
    intermediate: int  # the MLP's width
    vocab: int


def model_shape(model_dir: str, lora: LoraSettings | None = None, trust_remote_code: bool = False) -> ModelShape:
    """The shape of the model in `model_dir` (config.json only: the skeleton is built on the meta device). Built
    once per process for the same config.json and settings: `run` plans the cache and the training, then trains,
    and a 70B skeleton takes ~1 s to build (measured: Llama-3.1-70B's config, under load)."""
    config = Path(model_dir, "config.json").stat()
    return _model_shape(model_dir, lora.model_dump_json() if lora is not None else None, trust_remote_code,
                        (config.st_size, config.st_mtime_ns))


@functools.lru_cache(maxsize=8)
def _model_shape(model_dir: str, lora_json: str | None, trust_remote_code: bool, _stamp: tuple) -> ModelShape:
    lm = empty_causal_lm(model_dir, "float32", trust_remote_code)
    if lora_json is not None:
        lora = LoraSettings.model_validate_json(lora_json)
        from pipeline.dpo.lora import add_adapters  # noqa: PLC0415 (lazy: peft, only under LoRA)

        lm = add_adapters(lm, lora)
    return shape_of_model(lm)


def shape_of_model(lm: torch.nn.Module) -> ModelShape:
    """The shape of a built causal LM (on any device, the meta device included)."""
    unique = {id(p): p for p in lm.parameters()}
    blocks = decoder_blocks(lm)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    c = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    hidden = c.hidden_size
    heads = c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or hidden // heads
    kv = (getattr(c, "num_key_value_heads", None) or heads) * head_dim
    return ModelShape(
        params=sum(p.numel() for p in unique.values()),
        trainable=sum(p.numel() for p in unique.values() if p.requires_grad),
        block_params=max(sum(p.numel() for p in b.parameters()) for b in blocks),
        root_params=sum(p.numel() for i, p in unique.items() if i not in in_blocks),
        layers=len(blocks), hidden=hidden, kv_width=kv,
        intermediate=getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or 4 * hidden,
        vocab=c.vocab_size)


@dataclass(frozen=True)
class Term:
    name: str
    bytes: float
    shrink: str  # the settings that shrink it


@dataclass(frozen=True)
class MemoryPlan:
    """Per worker: what its device holds (`terms`) and, under CPU offload, what its host holds for it."""

    device: str  # "GPU" or "CPU"
    terms: list[Term]
    host: list[Term] = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(t.bytes for t in self.terms)

    def largest(self) -> Term:
        return max(self.terms, key=lambda t: t.bytes)

    def line(self) -> str:
        """`15.0 GB per GPU worker (parameters 1.0, gradients 1.0, ...)` (GB: 1e9 bytes, 3 significant digits)."""
        parts = ", ".join(f"{t.name} {t.bytes / GB:.3g}" for t in self.terms)
        host = f"; on the host (offloaded) {sum(t.bytes for t in self.host) / GB:.3g} GB" if self.host else ""
        return f"{self.total / GB:.3g} GB per {self.device} worker ({parts}){host}"


def check_fits(plan: MemoryPlan, gpu_memory_gb: float | None) -> None:
    """Stop, in one line naming the largest term and the settings that shrink it, a GPU plan that cannot fit each
    worker's GPU (`train.parallel.gpu_memory_gb`, default the driver's GPU; unchecked without either)."""
    if plan.device != "GPU":
        return
    if gpu_memory_gb is None and torch.cuda.is_available():
        gpu_memory_gb = torch.cuda.get_device_properties(0).total_memory / GB
    if gpu_memory_gb is not None and plan.total > gpu_memory_gb * GB:
        big = plan.largest()
        raise UserError(f"training needs about {plan.total / GB:.3g} GB per GPU, more than its {gpu_memory_gb:g} "
                        f"GB; the largest part is {big.name} ({big.bytes / GB:.3g} GB): shrink it with {big.shrink}")


def micro_batch_tokens(train: TrainConfig, max_length: int) -> int:
    """Tokens of one micro-batch on one worker, padded worst case: both sequences of each pair at max_length."""
    return train.micro_batch_tokens or train.micro_batch_pairs * 2 * max_length


def training_memory(shape: ModelShape, train: TrainConfig, max_length: int, model_dtype: str = "float32") \
        -> MemoryPlan:
    """The memory plan of one training worker (see the module's docstring for each term)."""
    par = train.parallel
    w = par.num_workers
    b = torch.finfo(compute_dtype(par)).bits // 8
    tokens = micro_batch_tokens(train, max_length)
    per_token_layer = 6 * shape.hidden + 2 * shape.kv_width + 4 * shape.intermediate  # values autograd keeps
    if par.activation_checkpointing:
        activations = (shape.layers * shape.hidden + per_token_layer) * tokens * b
    else:
        activations = shape.layers * per_token_layer * tokens * b
    chunk = min(4096, max(64, LOGITS_PER_CHUNK // shape.vocab))
    head = 3 * 4 * shape.vocab * (min(chunk, tokens) if par.recompute_head else tokens)  # fp32 logits, softmax, grad
    more = "more workers (train.parallel.num_workers) or train.parallel.cpu_offload"
    sharded = [Term("parameters", 4 * shape.params / w, more),
               Term("gradients", 4 * shape.trainable / w, f"{more}, or train.lora"),
               Term("optimizer", 8 * shape.trainable / w, f"{more}, or train.lora")]
    dtype = "train.parallel.param_dtype: bfloat16" if b == 4 else "a smaller model (its blocks' size)"
    batch = "a smaller micro-batch (train.micro_batch_pairs or train.micro_batch_tokens)"
    terms = [] if par.cpu_offload else sharded
    # Backward holds the root's gradients (head, then embeddings) in the compute dtype throughout, one block's cast
    # to fp32 for its reduce-scatter while the next block's are computed; at its end the root's are cast too (and
    # gloo, on CPU workers, reduce-scatters through an all-reduce of a whole fp32 copy), when the activations and
    # head chunks are gone: the larger of the two moments counts.
    during = b * shape.root_params + (4 + 2 * b) * shape.block_params
    at_end = (b + 4 + (4 if w > 1 and not par.use_gpu else 0)) * shape.root_params - activations - head
    in_flight = max(during, at_end)
    terms += [Term("gathered blocks", b * (shape.root_params + 3 * shape.block_params), dtype),
              Term("gradients in flight", in_flight, dtype),
              Term("activations", activations, batch if par.activation_checkpointing else
                   f"train.parallel.activation_checkpointing: true, or {batch}"),
              Term("LM head", head, batch if par.recompute_head else "train.parallel.recompute_head: true")]
    if train.ref_logps == "in_loop" and train.needs_reference and train.lora is None:
        mb = torch.finfo(getattr(torch, model_dtype)).bits // 8
        terms.append(Term("in-loop reference", mb * (shape.params / w + shape.root_params + 3 * shape.block_params),
                          "train.ref_logps: cached"))
    return MemoryPlan("GPU" if par.use_gpu else "CPU", terms, sharded if par.cpu_offload else [])


def scorer_memory(shape: ModelShape, dtype: str, tensor_parallel_size: int, tokens: int) -> str:
    """A vLLM scorer's GPU memory beyond its KV cache, as the plan states it: its weights (in `dtype`, split over
    the tensor-parallel GPUs) inside `gpu_memory_utilization`, and the prompt log-probs' transient outside it:
    one request's chunk of `tokens` (at most the sequence) as logits in `dtype` and their fp32 log-softmax, about
    10 bytes x tokens x vocabulary (worked out from vLLM's code, not measured: README, Engines)."""
    weights = torch.finfo(getattr(torch, dtype)).bits // 8 * shape.params / tensor_parallel_size
    transient = (torch.finfo(getattr(torch, dtype)).bits // 8 + 8) * tokens * shape.vocab
    return (f"weights {weights / GB:.1f} GB per GPU inside gpu_memory_utilization, prompt log-probs up to "
            f"{transient / GB:.1f} GB beyond it")
