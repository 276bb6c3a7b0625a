"""Parallelism: every FSDP2 and distributed-checkpoint detail, behind small functions, and the policy wrapper whose
forward is "response log-probs".

Model code stays plain transformers. `PolicyLogps` is the FSDP root: its forward runs the decoder and the LM head
on response positions only, so the root's parameters (embeddings, final norm, head) are gathered for exactly
that forward and their gradients reduce-scattered after its backward.

`apply_fsdp` composes `apply_activation_checkpointing`, `compile_decoder_blocks` and `shard_model`. The training
step and the checkpoints go through `set_gradient_sync`, `full_tensor`, `hf_weight_groups` and
`save_sharded_state`/`load_sharded_state`, which also accept an unsharded model (plain tensors, no process group
needed for the first three).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path

import pyarrow.fs as pafs
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec.implementations.arrow import ArrowFSWrapper
from safetensors import safe_open
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, HuggingFaceStorageReader
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem as FsspecFileSystem
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    rename_source_key,
    revert_weight_conversion,
)

from pipeline.config.schema import ParallelConfig
from pipeline.data.modeling import load_hf_model
from pipeline.dpo.logprobs import selective_token_logps
from pipeline.dpo.lora import hf_param_name
from pipeline.errors import UserError


class PolicyLogps(nn.Module):
    """forward(input_ids, attention_mask, score_mask) -> [N] log-probs of the scored tokens (row-major); with
    `log_sum_sq`, also log Σ_v p(v)² at each (WPO)."""

    def __init__(self, lm: nn.Module, recompute_head: bool = False):
        super().__init__()
        self.lm = lm
        self.recompute_head = recompute_head  # pipeline/dpo/logprobs.py

    def forward(self, input_ids, attention_mask, score_mask, log_sum_sq: bool = False, position_ids=None):
        return selective_token_logps(self.lm, input_ids, attention_mask, score_mask, log_sum_sq=log_sum_sq,
                                     recompute=self.recompute_head, position_ids=position_ids)


def decoder_blocks(lm: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks, in order: the modules whose class the model declares unsplittable
    (transformers' `_no_split_modules`: `LlamaDecoderLayer`, `GPT2Block`, `GPTNeoXLayer`, ...), whatever attribute
    path holds them (`model.layers`, `transformer.h`, `gpt_neox.layers`, `model.decoder.layers`)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm  # under peft's wrapper
    names = set(getattr(base, "_no_split_modules", None) or [])
    blocks, inside = [], ()
    for path, module in lm.named_modules():
        if type(module).__name__ in names and not path.startswith(inside):  # outermost blocks only
            blocks.append(module)
            inside = inside + (f"{path}.",)
    if not blocks:
        raise UserError(f"{type(base).__name__} declares no decoder block classes (`_no_split_modules`), so FSDP "
                        f"cannot shard it block by block; use a transformers causal LM that declares them")
    return blocks


# ---------------------------------------------------------------- applying FSDP2


def apply_activation_checkpointing(lm: nn.Module) -> None:
    """Recompute each decoder block's activations in backward (transformers' non-reentrant checkpointing)."""
    lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def compile_decoder_blocks(layers: list[nn.Module]) -> None:
    """torch.compile each decoder block (dynamic shapes); sharded afterwards, the compiled code runs inside FSDP's
    hooks."""
    for layer in layers:
        layer.compile(dynamic=True)


def compute_dtype(parallel: ParallelConfig) -> torch.dtype:
    """`train.parallel.param_dtype` resolved: `auto` computes in bfloat16 on GPUs (fp32 master weights, fp32
    gradient reduction) and in float32 on CPUs, whose bf16 matmuls are no faster here."""
    name = parallel.param_dtype if parallel.param_dtype != "auto" else "bfloat16" if parallel.use_gpu else "float32"
    return getattr(torch, name)


def process_group_backend(parallel: ParallelConfig) -> str:
    """The training workers' process group: NCCL on GPUs, gloo on CPUs, and both with CPU offload on GPUs, where
    gradients and optimizer state live on the CPU (clipping's all-reduce and the broadcasts run there)."""
    if not parallel.use_gpu:
        return "gloo"
    return "cpu:gloo,cuda:nccl" if parallel.cpu_offload else "nccl"


def set_device_math(device: torch.device, cpu_threads: float) -> None:
    """A training worker's math settings: its CPU threads (its reserved CPUs), and on a GPU TF32 for the matmuls
    that stay in fp32 (the fp32 LM-head chunks, the in-loop reference of an fp32 model)."""
    torch.set_num_threads(max(1, int(cpu_threads)))
    if torch.device(device).type == "cuda":
        torch.set_float32_matmul_precision("high")


def shard_model(model: PolicyLogps, param_dtype: torch.dtype = torch.float32, cpu_offload: bool = False) -> PolicyLogps:
    """FSDP2 `fully_shard` over the default process group: each decoder block is one unit, the rest (embeddings,
    norm, head) the root. Parameters compute in `param_dtype`; gradients reduce in fp32."""
    kwargs = dict(mp_policy=MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32),
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    layers = decoder_blocks(model.lm)
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
        compile_decoder_blocks(decoder_blocks(model.lm))
    return shard_model(model, param_dtype, cpu_offload)


# ---------------------------------------------------------------- filling a sharded model


def materialize(model: nn.Module, device: torch.device | str) -> None:
    """Allocate a (sharded) model built on the meta device: each rank gets memory for its shards only. Parameters
    are left uninitialised (`load_hf_weights` fills them); real buffers keep their values."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers() if b.device.type != "meta"}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name])


def _tied_aliases(module: nn.Module) -> dict[str, list[str]]:
    """Every parameter name -> all names of the same tensor (tied embeddings: `lm_head.weight` is
    `model.embed_tokens.weight`)."""
    groups: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return {name: names for names in groups.values() for name in names}


def load_hf_weights(policy: PolicyLogps, model_dir: str) -> None:
    """Fill a materialised policy with the weights of a Hugging Face model directory (a collective).

    Safetensors: every rank reads only the slices of its own shards (DCP's Hugging Face reader; safetensors reads
    a slice without the rest of the file), cast to the parameters' dtype. Other formats: rank 0 loads the model
    whole and broadcasts each shard to its owner. Under LoRA (peft names) the base weights are loaded and the
    adapters left for `set_full_values`; a modules_to_save copy gets the weights of the module it copies."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        return _broadcast_from_rank0(policy, model_dir)
    stored: set[str] = set()
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            stored.update(handle.keys())
    base = policy.lm.get_base_model() if hasattr(policy.lm, "get_base_model") else policy.lm
    names = checkpoint_to_model_names(base, stored)
    if names is None:  # fused or split on load (transformers' weight converters): its own loader does that
        return _broadcast_from_rank0(policy, model_dir)
    aliases = _tied_aliases(policy.lm)
    tied = getattr(base, "_tied_weights_keys", None)
    tied = tied if isinstance(tied, dict) and getattr(base.config, "tie_word_embeddings", False) else {}
    state = get_model_state_dict(policy)
    sources: dict[str, list[str]] = {}  # stored name -> the policy's state keys it fills
    for key in state:
        name = key.removeprefix("lm.")
        hf = hf_param_name(name)
        if hf is None:
            continue
        if hf not in names and tied.get(hf) in names:
            hf = tied[hf]  # a trained copy of a tied head (modules_to_save) starts from the embedding
        if hf in names:
            sources.setdefault(names[hf], []).append(key)
        elif not any(hf_param_name(alias) in names for alias in aliases.get(name, [])):
            raise UserError(f"{model_dir} holds no weights for {hf!r}; point model.path at a complete "
                            f"Hugging Face model directory")
    wanted = {src: state[keys[0]] for src, keys in sources.items()}
    dcp.load(wanted, storage_reader=HuggingFaceStorageReader(str(model_dir)))
    set_model_state_dict(policy, {key: wanted[src] for src, keys in sources.items() for key in keys},
                         options=StateDictOptions(strict=False))


def _weight_transforms(base: nn.Module, legacy: bool) -> tuple[list, list]:
    """transformers' checkpoint conversions for this model class: (renamings, converters)."""
    transforms = get_model_conversion_mapping(base, add_legacy=legacy) if hasattr(base, "config") else []
    return ([t for t in transforms if isinstance(t, WeightRenaming)],
            [t for t in transforms if isinstance(t, WeightConverter)])


def checkpoint_to_model_names(base: nn.Module, stored: set[str]) -> dict[str, str] | None:
    """Model parameter name -> the name it is stored under, by transformers' own renaming rules (GPT-NeoX's
    `embed_out` is the model's `lm_head`, a checkpoint of the bare decoder lacks the `model.` prefix, ...); None
    when a stored tensor must be fused or split on load (a converter), which only a whole-model load does."""
    renamings, converters = _weight_transforms(base, legacy=True)
    known = dict.fromkeys([n for n, _ in base.named_parameters(remove_duplicate=False)]
                          + [n for n, _ in base.named_buffers()], True)
    out = {}
    for key in sorted(stored):
        name, converter = rename_source_key(key, renamings, converters, getattr(base, "base_model_prefix", None),
                                            known)
        if converter is not None:
            return None
        out[name] = key
    return out


def model_to_checkpoint_names(lm: nn.Module) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    """A group of exported weights renamed as transformers itself saves the model (its renamings reversed:
    `lm_head` is saved as GPT-NeoX's `embed_out`), so older loaders and vLLM read the checkpoint. Models whose
    loading fuses tensors keep the model's names (transformers reads them as they are)."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    renamings, converters = _weight_transforms(base, legacy=False)
    if converters or not renamings:
        return lambda group: group
    return lambda group: revert_weight_conversion(base, group)


def full_shapes(policy: nn.Module, select: Callable[[str], bool]) -> dict[str, torch.Size]:
    """State-dict names -> full (unsharded) shapes of the parameters whose name inside the policy's model
    (`lm.` removed) `select` picks."""
    return {k: v.shape for k, v in get_model_state_dict(policy).items() if select(k.removeprefix("lm."))}


def set_full_values(policy: nn.Module, values: dict[str, torch.Tensor]) -> None:
    """Set parameters (state-dict names) from full tensors every rank holds identically; each rank keeps its
    shards (a collective for a sharded policy)."""
    set_model_state_dict(policy, values, options=StateDictOptions(full_state_dict=True, strict=False))


def _broadcast_from_rank0(policy: PolicyLogps, model_dir: str) -> None:
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    full = {f"lm.{k}": v for k, v in load_hf_model(model_dir).state_dict().items()} if rank0 else {}
    set_model_state_dict(policy, full, options=StateDictOptions(full_state_dict=True,
                                                               broadcast_from_rank0=dist.is_initialized()))


# ---------------------------------------------------------------- using a sharded model


def sync_every_micro_batch() -> bool:
    """Whether gradients must be reduce-scattered after every micro-batch: on more than one rank, deferring the
    sync to a step's last micro-batch holds the whole model's unsharded fp32 gradient on every rank in between
    (4 bytes a parameter: 32 GB at 8B, 280 GB at 70B). On one rank a shard is the whole gradient, and one sync a
    step is the faster of the two (docs/OPTIMIZATIONS.md)."""
    return dist.is_initialized() and dist.get_world_size() > 1


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Whether the next backward reduce-scatters gradients (FSDP2; False: they accumulate unsharded, in fp32).
    Nothing to do for an unsharded model."""
    if isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(enabled)


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's full value (a collective); a plain tensor as it is."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def hf_weight_groups(policy: PolicyLogps, dtype: torch.dtype, max_group_bytes: int,
                     device: torch.device | str = "cpu", select: Callable[[str], bool] | None = None,
                     ) -> tuple[int, Iterator[dict[str, torch.Tensor]]]:
    """The whole model's weights under Hugging Face names (tied weights once), cast to `dtype` before they are
    gathered, in groups of at most `max_group_bytes` (one tensor may exceed it): (number of groups, iterator).

    A collective: every rank must run the iterator to its end; rank 0 gets each group on the CPU, the others empty
    dicts. No rank ever holds more than one group and one tensor of the full model. `select(name)`: only those
    weights (e.g. LoRA's trained ones)."""
    state = get_model_state_dict(policy)
    if select is not None:
        state = {k: v for k, v in state.items() if select(k.removeprefix("lm."))}
    aliases, seen, names = _tied_aliases(policy), set(), []
    for name in state:
        if not seen.intersection(aliases.get(name, [name])):
            names.append(name)
            seen.add(name)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = state[name].numel() * dtype.itemsize
        if groups[-1] and size + nbytes > max_group_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    rename = model_to_checkpoint_names(policy.lm) if select is None else (lambda group: group)

    def gather():
        for group in groups:
            out = {}
            for name in group:
                tensor = full_tensor(state[name].detach().to(device=device, dtype=dtype))
                if rank0:
                    out[name.removeprefix("lm.")] = tensor.cpu()
            yield rename(out) if rank0 else out
    return len(groups), gather()


def on_every_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on every rank (a collective; the flag itself without a process group)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def state_bytes(model: nn.Module) -> int:
    """Bytes of the training state this rank writes (`save_sharded_state`): its shards of every parameter, and
    AdamW's two moments (the parameter's dtype) for each trainable one, counted before the first step creates them."""
    total = 0
    for p in model.parameters():
        local = p.to_local() if hasattr(p, "to_local") else p
        total += local.numel() * local.element_size() * (3 if p.requires_grad else 1)
    return total


def save_sharded_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Every rank writes its shards of the model and optimizer state (torch.distributed.checkpoint; a collective)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))


def async_save_sharded_state(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                             group: dist.ProcessGroup | None) -> Future:
    """`save_sharded_state` in the background: returns once the state is copied to host memory; the future
    completes when every file is written. `group`: a process group of its own (gloo) for the writer thread's
    coordination, so it never interleaves with the training step's collectives."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return dcp.async_save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory), process_group=group,
                          no_dist=not dist.is_initialized())


def load_sharded_state(path: str, fs: pafs.FileSystem | None, model: nn.Module,
                       optimizer: torch.optim.Optimizer) -> None:
    """Load what `save_sharded_state` wrote at `path` (on `fs`: a pyarrow filesystem, None: local) into the model
    and optimizer, resharded to this world (a collective). Straight from storage: each rank reads the metadata and
    then only the byte ranges of its own shards (no copy of the whole state to any node)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=_storage_reader(path, fs))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])


def _storage_reader(path: str, fs: pafs.FileSystem | None) -> FileSystemReader:
    if fs is None or fs.type_name == "local":
        return FileSystemReader(path)
    # DCP's fsspec reader over the same pyarrow filesystem Ray Train and the Store use (s3, gs, ...): ranged reads
    # of random-access files.
    reader = FileSystemReader(path)
    reader.fs = FsspecFileSystem()
    reader.fs.fs = ArrowFSWrapper(fs)
    reader.path = path
    return reader
