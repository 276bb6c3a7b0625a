"""LoRA adapters in PEFT format (`adapter_config.json` + `adapter_model.safetensors`, what `save_pretrained` of a
peft model writes): what an adapter holds, read from its config and its weights' header (no tensor is loaded, a
URI is not downloaded), and whether it was trained on a given base model.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pipeline.data.modeling import empty_causal_lm
from pipeline.store.checkpoints import ADAPTER_MARKER
from pipeline.store.fingerprint import model_files_hash
from pipeline.store.storage import Store

ADAPTER_WEIGHTS = "adapter_model.safetensors"
# peft's tensor names: `base_model.model.<module>.lora_A.weight` / `.lora_B.weight` on a linear layer,
# `base_model.model.<module>.lora_embedding_A` / `_B` on an embedding.
_LORA_TENSOR = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?:embedding_)?(?P<ab>[AB])(?:\.weight)?$")


@dataclass(frozen=True)
class LoraPair:
    """The LoRA pair on one layer of the base: A is [rank, in_features], B is [out_features, rank] (for an
    embedding: in = vocabulary size, out = embedding size)."""

    module: str  # its name in the base model, e.g. model.layers.0.self_attn.q_proj
    in_features: int
    out_features: int
    rank: int


@dataclass(frozen=True)
class AdapterInfo:
    """What a PEFT LoRA adapter directory holds."""

    path: str
    base: str | None  # adapter_config.json's base_model_name_or_path
    pairs: tuple[LoraPair, ...]
    full_tensors: tuple[str, ...]  # whole tensors (modules_to_save copies, DoRA magnitudes, saved embeddings)
    config: dict[str, Any]  # adapter_config.json

    @property
    def rank(self) -> int:
        """The largest LoRA rank of any layer (rank_pattern included): what an engine must hold."""
        return max((m.rank for m in self.pairs), default=0)

    @property
    def module_names(self) -> tuple[str, ...]:
        """The adapted layers' own names (`q_proj`, `down_proj`, ...), sorted."""
        return tuple(sorted({m.module.rsplit(".", 1)[-1] for m in self.pairs}))


def safetensors_header(store: Store, name: str) -> dict[str, list[int]]:
    """Tensor name -> shape of a safetensors file (local or URI), from its header only: 8 bytes of header length,
    then the JSON header."""
    with store.fs.open_input_file(store.path(name)) as f:
        size = f.size()
        head = f.read_at(8, 0)
        if len(head) < 8 or struct.unpack("<Q", head)[0] > size - 8:
            raise ValueError(f"corrupt weights file {name}: not a safetensors file")
        header = json.loads(f.read_at(struct.unpack("<Q", head)[0], 8))
    return {k: v["shape"] for k, v in header.items() if k != "__metadata__"}


def read_adapter(path: str) -> AdapterInfo:
    """An adapter directory (local or URI) -> what it holds. A missing or unreadable file raises ValueError with
    its reason."""
    store = Store(path)
    try:
        config = store.read_json(ADAPTER_MARKER)
    except (OSError, ValueError) as e:
        raise ValueError(f"unreadable {ADAPTER_MARKER}: {str(e).splitlines()[0][:200]}") from None
    if not store.exists(ADAPTER_WEIGHTS):
        raise ValueError(f"no adapter weights ({ADAPTER_WEIGHTS})")
    try:
        shapes = safetensors_header(store, ADAPTER_WEIGHTS)
    except (OSError, ValueError, struct.error) as e:
        raise ValueError(f"corrupt weights file {ADAPTER_WEIGHTS}: {str(e).splitlines()[0][:200]}") from None
    found: dict[str, dict[str, list[int]]] = {}
    full = []
    for name, shape in sorted(shapes.items()):
        if match := _LORA_TENSOR.match(name):
            found.setdefault(match["module"], {})[match["ab"]] = shape
        else:
            full.append(name)
    pairs = []
    for module, ab in sorted(found.items()):
        if set(ab) != {"A", "B"} or len(ab["A"]) != 2 or len(ab["B"]) != 2 or ab["A"][0] != ab["B"][1]:
            raise ValueError(f"{ADAPTER_WEIGHTS}: the LoRA pair of {module} is incomplete or its shapes disagree")
        pairs.append(LoraPair(module, in_features=ab["A"][1], out_features=ab["B"][0], rank=ab["A"][0]))
    return AdapterInfo(path, config.get("base_model_name_or_path"), tuple(pairs), tuple(full), config)


@functools.lru_cache(maxsize=4)
def _layer_shapes(base_dir: str, trust_remote_code: bool) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) features of every linear layer and embedding of a model (built on the meta
    device: no weights are read), as `LoraPair` counts them."""
    lm = empty_causal_lm(base_dir, trust_remote_code=trust_remote_code)
    shapes = {}
    for name, m in lm.named_modules():
        if isinstance(m, nn.Linear):
            shapes[name] = (m.in_features, m.out_features)
        elif isinstance(m, nn.Embedding):
            shapes[name] = (m.num_embeddings, m.embedding_dim)
    return shapes


def base_mismatch(info: AdapterInfo, base_dir: str, base_path: str, trust_remote_code: bool = False) -> str | None:
    """Why `info` is not an adapter of the model in `base_dir` (`base_path` as the config names it), or None.

    The adapter's layers must exist in the base with the adapter's shapes; and where its recorded base
    (base_model_name_or_path) can be compared without a download, it must be the same model: a local directory
    with the same weights (model_files_hash), or the same hub id."""
    shapes = _layer_shapes(str(Path(base_dir).resolve()), trust_remote_code)
    for m in info.pairs:
        if m.module not in shapes:
            return f"it adapts layer {m.module}, which the base model does not have"
        if shapes[m.module] != (m.in_features, m.out_features):
            return (f"its layer {m.module} maps {m.in_features} -> {m.out_features} features, the base model's "
                    f"{shapes[m.module][0]} -> {shapes[m.module][1]}")
    recorded = info.base
    if not recorded or recorded == base_path:
        return None
    if Path(recorded).is_dir():
        if Path(recorded).resolve() != Path(base_dir).resolve() and \
                model_files_hash(recorded) != model_files_hash(base_dir):
            return f"it was trained on {recorded}, whose weights differ from the base model's"
    elif not Path(base_path).is_dir():  # two hub ids
        return f"it was trained on {recorded}, not {base_path}"
    return None
