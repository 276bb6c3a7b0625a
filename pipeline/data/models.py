"""Where a model and its tokenizer are: resolving paths and hub ids (here and on other nodes), their identities for
cache keys, chat templates, loading tokenizers. Building the model itself (torch) is `pipeline.data.modeling`.

This module imports neither torch nor transformers at import time: Ray tasks that only read, hash or write files
(duplicate ids, checksums) import it through the cache layout, and a fresh worker importing torch and transformers
spends ~8 s of CPU before its first row. The functions that need transformers import it when called."""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download

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


@dataclass(frozen=True)
class ResolvedPath:
    """A model or tokenizer location resolved to a local directory, with its identity for the cache key."""

    local_dir: str
    identity: dict[str, Any]


def _is_local(path: str, what: str, key: str) -> bool:
    """A local directory (True) or a hub id (False); anything else is a user error."""
    if Path(path).is_dir():
        return True
    if not _HUB_ID.match(path) or path.startswith((".", "/")):
        raise UserError(f"{key} {path!r} does not exist; point it at a {what} directory or a hub id like "
                        f"org/name (the tiny one: dpo-pipeline tiny-assets {path})")
    return False


def _resolve(path: str, revision: str | None, what: str, key: str) -> tuple[str, dict[str, Any] | None]:
    """Local dir -> (dir, None). Hub id -> (snapshot dir, {"hub": id, "commit": sha})."""
    if _is_local(path, what, key):
        return str(Path(path).resolve()), None
    try:
        local = snapshot_download(path, revision=revision)
    except Exception as e:  # network, auth, missing repo: all one message for the user
        raise UserError(f"{key} {path!r} is not a local directory and could not be fetched from the hub "
                        f"({type(e).__name__}); check the path, the network, or HF_TOKEN") from None
    return local, {"hub": path, "commit": Path(local).name}


def resolve_model(path: str, revision: str | None = None, key: str = "model.path") -> ResolvedPath:
    """`key` names the config key errors blame (the reference model, or e.g. a reward model)."""
    local, hub = _resolve(path, revision, "model", key)
    _check_model_dir(local, path, key)
    return ResolvedPath(local, hub or {"local_sha256": model_files_hash(local)})


def check_model_path(path: str, key: str = "model.path") -> None:
    """`resolve_model`'s user errors for a local path, without hashing the weights or reaching the hub: the command
    line checks the config's model before it imports a stage (torch, Ray, transformers: seconds)."""
    if _is_local(path, "model", key):
        _check_model_dir(path, path, key)


def _check_model_dir(local: str, path: str, key: str) -> None:
    if not (Path(local) / "config.json").is_file():
        raise UserError(f"{key} {path!r} has no config.json; point it at a Hugging Face model directory")


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
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: PLC0415 (module doc)

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
    from transformers import AutoTokenizer  # noqa: PLC0415 (module doc)

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
