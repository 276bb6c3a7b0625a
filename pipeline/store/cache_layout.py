"""The reference cache's layout and identity: which inputs key a cache, where it lives, and whether a complete one
is intact. Stage 1 writes caches; training, evaluation and `plan` find and check them here.

    <cache_dir>/<key>/manifest.json            written last: its presence means the cache is complete
    <cache_dir>/<key>/data/part-NNNNN.parquet  one file per source shard (schema: README "Cache schema")
    <cache_dir>/<key>/rejects.jsonl            unusable rows with their reason
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import Config, DataSource
from pipeline.data.models import effective_template_sha, read_chat_template, resolve_model, resolve_tokenizer
from pipeline.data.sources import SourcePlan, plan_source
from pipeline.errors import UserError
from pipeline.store.fingerprint import cache_key
from pipeline.store.storage import Store


@dataclass
class CacheInputs:
    """One split's cache, resolved on the driver: its key, what the key hashes, the source's shard plan and the
    model and tokenizer directories."""

    split: str
    key: str
    inputs: dict[str, Any]  # what the key hashes, recorded in the manifest
    plan: SourcePlan
    model_dir: str
    tokenizer_dir: str
    chat_template: str | None
    fmt: str


def sources_dir(cfg: Config) -> Path:
    """Where `datasets` sources are exported to Parquet (on this machine when cache_dir is a URI)."""
    return Path(cfg.cache_dir) / "sources" if "://" not in cfg.cache_dir else \
        Path.home() / ".cache" / "dpo-pipeline" / "sources"


def resolve_inputs(cfg: Config, split: str, src: DataSource) -> CacheInputs:
    """Resolve model/tokenizer/data, hash them and derive the cache key."""
    model = resolve_model(cfg.model.path, cfg.model.revision)
    tok_path = cfg.tokenizer.path or cfg.model.path
    tokenizer = resolve_tokenizer(tok_path, cfg.model.revision if cfg.tokenizer.path is None else None)
    template = read_chat_template(cfg.tokenizer.chat_template)
    plan = plan_source(src, cfg.scoring.shard_size, sources_dir(cfg))
    if plan.num_rows == 0:
        raise UserError(f"data.{split}.path {src.path!r} has no rows; point it at a non-empty file")
    inputs = {
        "model": {"path": cfg.model.path, **model.identity},
        "tokenizer": {"path": tok_path, **tokenizer.identity},
        "chat_template_sha256": effective_template_sha(tokenizer.local_dir, template),
        "data": {"path": src.path, "sha256": plan.sha256, "rows": plan.num_rows, "format": src.format,
                 "implicit_prompt_marker": cfg.data.implicit_prompt_marker},
        "truncation": {"max_length": cfg.data.max_length, "max_prompt_length": cfg.data.max_prompt_length},
        "dtype": cfg.model.dtype,
    }
    return CacheInputs(split, cache_key(keyed_inputs(inputs)), inputs, plan, model.local_dir, tokenizer.local_dir,
                    template, src.format)


def keyed_inputs(inputs: dict[str, Any]) -> dict[str, Any]:
    """The inputs without their paths: paths are recorded for people, not hashed (moving a file must not
    invalidate the cache)."""
    keyed = json.loads(json.dumps(inputs))
    for part in ("model", "tokenizer", "data"):
        keyed[part].pop("path", None)
    return keyed


def damaged_files(store: Store, manifest: dict[str, Any]) -> list[str]:
    """The cache files (and rejects file) whose bytes differ from the manifest's sha256, or that are missing."""
    entries = manifest["files"] + ([manifest["rejects"]] if "rejects" in manifest else [])
    return [f["path"] for f in entries if store.sha256(f["path"]) != f["sha256"]]


@dataclass
class CacheRef:
    split: str
    key: str
    uri: str
    files: list[str]
    pairs: int
    model_dir: str
    tokenizer_dir: str
    chat_template: str | None
    file_rows: list[int] = field(default_factory=list)  # pairs per file, as `files`


def find_cache(cfg: Config, split: str) -> CacheRef:
    """The complete stage-1 cache of this split's inputs; refuses a cache built for other inputs, or one whose
    files no longer match the manifest's checksums."""
    src = cfg.data.train if split == "train" else cfg.data.eval
    prep = resolve_inputs(cfg, split, src)
    explicit = cfg.train.cache_path if split == "train" else None
    store = Store(explicit) if explicit else Store(cfg.cache_dir).child(prep.key)
    if not store.exists("manifest.json"):
        where = explicit or f"{cfg.cache_dir}/{prep.key}"
        raise UserError(f"no complete reference cache for the {split} split at {where}; build it with "
                        f"`dpo-pipeline cache CONFIG` (same config) first")
    manifest = store.read_json("manifest.json")
    got, want = keyed_inputs(manifest.get("inputs", {})), keyed_inputs(prep.inputs)
    for part in ("model", "tokenizer", "chat_template_sha256", "data", "truncation", "dtype"):
        if got.get(part) != want.get(part):
            raise UserError(f"the cache at {store.uri} was built for a different {part.replace('_sha256', '')} "
                            f"({got.get(part)!r} != {want.get(part)!r}); rebuild it with `dpo-pipeline cache "
                            f"CONFIG` or fix the config")
    damaged = damaged_files(store, manifest)
    if damaged:
        raise UserError(f"the cache at {store.uri} is damaged: {', '.join(damaged[:3])}"
                        f"{' and more' if len(damaged) > 3 else ''} no longer match(es) the manifest's sha256; "
                        f"run `dpo-pipeline cache CONFIG` (same config) to recompute only the damaged part(s)")
    return CacheRef(split, manifest["key"], store.uri, [f"{store.uri}/{f['path']}" for f in manifest["files"]],
                    manifest["counts"]["pairs"], prep.model_dir, prep.tokenizer_dir, prep.chat_template,
                    [f["rows"] for f in manifest["files"]])
