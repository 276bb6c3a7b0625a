"""Content fingerprints and the cache key.

The reference cache is content-addressed: its key is a hash of everything that determines its values, and of
nothing else. Moving a file, renaming a run or changing the scorer's batch size keeps the key; changing the
weights, tokenizer, chat template, data, truncation, dtype or the schema version changes it.
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

# Files that define the tokenizer (and, for `chat_template*`, the template). Everything else in a model
# directory except docs and generation defaults defines the model.
TOKENIZER_FILES = {
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "vocab.txt", "merges.txt", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model",
}
TEMPLATE_FILES = {"chat_template.jinja", "chat_template.json"}
TEMPLATE_DIR = "additional_chat_templates"  # named templates (transformers): `<dir>/<name>.jinja`
IGNORED_FILES = {"README.md", "LICENSE", "LICENSE.txt", ".gitattributes", "generation_config.json",
                 "dpo_checkpoint.json"}  # the last: the hash record training writes into each export

_CHUNK = 1 << 20


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def sha256_json(obj: Any) -> str:
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode())


def list_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".") for part in
                                                                        p.relative_to(root).parts))


def model_files_hash(model_dir: str | Path, top_level: bool = False) -> str:
    """Hash of the files that define a local model's computation: config and weights, not tokenizer or docs.
    `top_level`: the directory's own files only, not its subdirectories' (a LoRA adapter: a merged model may sit
    in its `merged/`).

    Every stage resolves the model (for its key), some several times per run; reading gigabytes of weights each
    time would dominate a run that has nothing to compute. The hash is memoised per process on the files'
    (path, size, mtime), which any rewrite of a file changes."""
    root = Path(model_dir).resolve()
    stamp = []
    for p in list_files(root):
        rel = p.relative_to(root).as_posix()
        if top_level and "/" in rel:
            continue
        if p.name in TOKENIZER_FILES or p.name in TEMPLATE_FILES or p.name in IGNORED_FILES or \
                rel.startswith(f"{TEMPLATE_DIR}/"):
            continue
        st = p.stat()
        stamp.append((rel, st.st_size, st.st_mtime_ns))
    return _hash_files(str(root), tuple(stamp))


@functools.lru_cache(maxsize=64)
def _hash_files(root: str, stamp: tuple) -> str:
    return combine_file_hashes({rel: sha256_file(Path(root) / rel) for rel, _, _ in stamp})


def combine_file_hashes(hashes: dict[str, str]) -> str:
    """`model_files_hash` from each file's sha256 (relative path -> digest), for a writer that hashed its files as
    it wrote them; in `list_files` order (for a flat directory: sorted names)."""
    h = hashlib.sha256()
    for rel in hashes:
        h.update(f"{rel}\0{hashes[rel]}\n".encode())
    return h.hexdigest()


def tokenizer_files_hash(tokenizer_dir: str | Path) -> str:
    """Hash of a local tokenizer's files, without its chat template (the template is keyed on its own)."""
    root = Path(tokenizer_dir)
    h = hashlib.sha256()
    for p in list_files(root):
        if p.name not in TOKENIZER_FILES:
            continue
        if p.name == "tokenizer_config.json":
            conf = json.loads(p.read_text())
            conf.pop("chat_template", None)
            digest = sha256_json(conf)
        else:
            digest = sha256_file(p)
        h.update(f"{p.relative_to(root).as_posix()}\0{digest}\n".encode())
    return h.hexdigest()


def cache_key(components: dict[str, Any]) -> str:
    """Short, stable key of the cache inputs (hex, 20 chars = 80 bits)."""
    return sha256_json({"schema_version": SCHEMA_VERSION, **components})[:20]
