"""Shared helpers to resolve and load models, tokenizers and chat templates: one copy, used by every stage."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import snapshot_download
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from pipeline.errors import UserError
from pipeline.store.fingerprint import (
    TEMPLATE_DIR,
    TEMPLATE_FILES,
    TOKENIZER_FILES,
    list_files,
    model_files_hash,
    sha256_bytes,
    tokenizer_files_hash,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")

DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


@dataclass(frozen=True)
class ResolvedPath:
    """A model or tokenizer location resolved to a local directory, with its identity for the cache key."""

    local_dir: str
    identity: dict[str, Any]


def _resolve(path: str, revision: str | None, what: str, key: str) -> tuple[str, dict[str, Any] | None]:
    """Local dir -> (dir, None). Hub id -> (snapshot dir, {"hub": id, "commit": sha})."""
    if Path(path).is_dir():
        return str(Path(path).resolve()), None
    if not _HUB_ID.match(path) or path.startswith((".", "/")):
        raise UserError(f"{key} {path!r} does not exist; point it at a {what} directory or a hub id like "
                        f"org/name (the tiny one: dpo-pipeline tiny-assets {path})")
    try:
        local = snapshot_download(path, revision=revision)
    except Exception as e:  # network, auth, missing repo: all one message for the user
        raise UserError(f"{key} {path!r} is not a local directory and could not be fetched from the hub "
                        f"({type(e).__name__}); check the path, the network, or HF_TOKEN") from None
    return local, {"hub": path, "commit": Path(local).name}


def resolve_model(path: str, revision: str | None = None, key: str = "model.path") -> ResolvedPath:
    """`key` names the config key errors blame (the reference model, or e.g. a reward model)."""
    local, hub = _resolve(path, revision, "model", key)
    if not (Path(local) / "config.json").is_file():
        raise UserError(f"{key} {path!r} has no config.json; point it at a Hugging Face model directory")
    return ResolvedPath(local, hub or {"local_sha256": model_files_hash(local)})


def check_causal_lm(local_dir: str, trust_remote_code: bool = False, key: str = "model.path") -> None:
    """Refuse, in one line and before anything starts, a model this pipeline cannot train: one that is not a
    decoder-only causal LM transformers knows (an encoder-decoder such as T5 or BART, an encoder such as BERT), or
    custom code without model.trust_remote_code. Reads config.json only."""
    config = json.loads((Path(local_dir) / "config.json").read_text())
    model_type = config.get("model_type", "?")
    archs = ", ".join(config.get("architectures") or []) or model_type
    if config.get("is_encoder_decoder"):
        raise UserError(f"{key} is an encoder-decoder model ({archs}); DPO here trains decoder-only causal LMs "
                        f"(Llama, Qwen, Mistral, Gemma, GPT-2, Pythia, ...): point {key} at one")
    remote = "AutoModelForCausalLM" in (config.get("auto_map") or {})
    if remote and not trust_remote_code:
        raise UserError(f"{key} ({archs}) needs the model's own code; set model.trust_remote_code: true if you "
                        f"trust it")
    if not remote and model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise UserError(f"{key} ({archs}, model_type {model_type!r}) is not a causal LM transformers knows; point "
                        f"{key} at a decoder-only causal LM")
    if not remote and any(a.endswith(("ForMaskedLM", "ForSequenceClassification", "ForTokenClassification"))
                          for a in config.get("architectures") or []):
        raise UserError(f"{key} is not a causal LM ({archs}); point {key} at a decoder-only causal LM")


def resolve_tokenizer(path: str, revision: str | None = None) -> ResolvedPath:
    local, _ = _resolve(path, revision, "tokenizer", "tokenizer.path")
    # Tokenizer files are small: hash them for hub ids too, so a re-uploaded tokenizer changes the key.
    return ResolvedPath(local, {"files_sha256": tokenizer_files_hash(local)})


def read_chat_template(value: str | None) -> str | None:
    """`tokenizer.chat_template`: a path to a Jinja file, or the template text itself."""
    if value is None:
        return None
    if "{{" in value or "{%" in value:
        return value
    p = Path(value)
    if not p.is_file():
        raise UserError(f"tokenizer.chat_template {value!r} is neither a file nor a Jinja template; give the "
                        f"path of a .jinja file or the template text")
    return p.read_text()


def _tokenizer_files_stamp(local_dir: str) -> tuple:
    """(path, size, mtime) of the tokenizer and template files: a file edited in place gets a fresh load."""
    root = Path(local_dir)
    stamp = []
    for p in list_files(root):
        rel = p.relative_to(root).as_posix()
        if p.name in TOKENIZER_FILES or p.name in TEMPLATE_FILES or rel.startswith(f"{TEMPLATE_DIR}/"):
            st = p.stat()
            stamp.append((rel, st.st_size, st.st_mtime_ns))
    return tuple(stamp)


# A hub snapshot in a Hugging Face cache: <HF_HOME>/hub/models--<org>--<name>/snapshots/<commit>.
_SNAPSHOT = re.compile(r"models--(?P<org>[^/]+?)--(?P<name>[^/]+)/snapshots/(?P<commit>[0-9a-f]{40})/?$")


def on_this_node(model_dir: str) -> str:
    """`model_dir` as this node sees it. The driver resolves a hub id to the snapshot in its own Hugging Face cache;
    on a node where that path does not exist (another node without a shared HF_HOME) the same commit is fetched
    into this node's cache. Any other path or URI is returned as it is."""
    match = _SNAPSHOT.search(model_dir or "")
    if match is None or "://" in model_dir or Path(model_dir).exists():
        return model_dir
    repo = f"{match['org']}/{match['name']}"
    try:
        return snapshot_download(repo, revision=match["commit"])
    except Exception as e:  # network, auth: the node cannot fetch what the driver resolved
        raise UserError(f"model {repo} (commit {match['commit'][:12]}) is not on this node ({model_dir}) and could "
                        f"not be fetched ({type(e).__name__}): give every node the hub (HF_TOKEN) or a shared "
                        f"HF_HOME") from None


def load_tokenizer(local_dir: str, chat_template: str | None = None):
    """Load a tokenizer once per process (again if its files change); `chat_template` overrides the tokenizer's
    own."""
    local_dir = on_this_node(local_dir)
    return _load_tokenizer(local_dir, chat_template, _tokenizer_files_stamp(local_dir))


@functools.lru_cache(maxsize=4)
def _load_tokenizer(local_dir: str, chat_template: str | None, _stamp: tuple):
    tok = AutoTokenizer.from_pretrained(local_dir)
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok


def effective_template_sha(tokenizer_dir: str, override: str | None) -> str | None:
    """sha256 of the chat template that will be used (None when the tokenizer has none)."""
    template = override if override is not None else load_tokenizer(tokenizer_dir).chat_template
    if isinstance(template, dict):  # named templates
        template = repr(sorted(template.items()))
    return sha256_bytes(template.encode()) if template else None


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
    # Lazy: importing peft takes seconds (it imports much of transformers), and every Ray worker that scores,
    # tokenizes or writes imports this module; only merging an adapter needs it.
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
