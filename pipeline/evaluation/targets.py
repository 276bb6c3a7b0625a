"""Evaluation targets (the models evaluation and pair generation sample): a checkpoint or an adapter as a
`Target`, the content hash of its weights, and its job with the keys that say what is done already."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.config import ModelConfig
from pipeline.data.adapters import AdapterInfo, base_mismatch, read_adapter
from pipeline.data.models import resolve_model
from pipeline.engines.chunks import read_metadata
from pipeline.engines.lora import serving_problem
from pipeline.errors import UserError
from pipeline.store.checkpoints import checkpoint_hash, is_adapter
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store


@dataclass
class Target:
    """One model to evaluate: the reference or a checkpoint."""

    name: str
    path: str
    step: int | None
    is_reference: bool = False
    error: str | None = None  # found unusable before any engine started
    adapter: AdapterInfo | None = None  # a LoRA adapter of the reference model (else a full model)


@dataclass
class TargetJob:
    """A target left to evaluate: where its results go, its keys, and what is sampled already."""

    target: Target
    store: Store  # <eval_dir>/<name>
    sample_key: str  # weights + sampling settings: the key of sampled.json
    key: str  # sample_key + scoring settings: the key of result.json
    sampled: bool = False  # sampled.parquet and sampled.json are there, with this sample_key
    sampled_meta: dict[str, Any] = field(default_factory=dict)  # sampled.json
    parts: dict[int, dict[str, Any]] = field(default_factory=dict)  # chunks sampled before a crash: first -> counts

    @property
    def parts_dir(self) -> Store:
        return self.store.child(f"sampled-parts/{self.sample_key[:16]}")

    def find_parts(self) -> None:
        """The chunks an interrupted run wrote for this sample key (other keys' parts are dropped)."""
        for stale in self.store.listdir("sampled-parts"):
            if stale != self.sample_key[:16]:
                self.store.delete(f"sampled-parts/{stale}")
        for name in self.parts_dir.listdir():
            if name.endswith(".parquet") and name[:-len(".parquet")].isdigit():
                self.parts[int(name[:-len(".parquet")])] = read_metadata(f"{self.parts_dir.uri}/{name}")


def checkpoint_target(name: str, path: str) -> Target:
    """A checkpoint's target: a full model or a LoRA adapter (read from its config and weights' header), or a
    failed one with its reason."""
    target = Target(name, path, step_of(Path(path).name), error=checkpoint_problem(path))
    if target.error is None and is_adapter(path):
        try:
            target.adapter = read_adapter(path)
        except ValueError as e:
            target.error = f"{path}: {e}"
    return target


def check_adapters(model: ModelConfig, targets: list[Target]) -> None:
    """Adapters are evaluated on an engine of the reference model (`model.path`): each must be one of its adapters
    and one vLLM gives the exact log-probs of (see `pipeline.engines.lora`)."""
    if not targets:
        return
    base = resolve_model(model.path, model.revision).local_dir
    for target in targets:
        problem = serving_problem(target.adapter)
        if problem is not None:
            raise UserError(f"{target.path} is a LoRA adapter vLLM cannot evaluate exactly ({problem}); evaluate "
                            f"its merged model instead ({target.path}/merged, written with train.lora.merge)")
        mismatch = base_mismatch(target.adapter, base, model.path, model.trust_remote_code)
        if mismatch is not None:
            recorded = f" ({target.adapter.base})" if target.adapter.base else ""
            raise UserError(f"{target.path} is not a LoRA adapter of model.path {model.path}: {mismatch}; set "
                            f"model.path to the adapter's base model{recorded}")

def step_of(name: str) -> int | None:
    match = re.fullmatch(r"step_(\d+)", name)
    return int(match.group(1)) if match else None

def checkpoint_problem(path: str) -> str | None:
    """Why a checkpoint directory (local or URI) cannot be evaluated, or None."""
    store = Store(path)
    if not store.exists(""):
        return f"{path} does not exist"
    if not store.exists("config.json") and not is_adapter(path):
        return (f"{path} has no config.json or adapter_config.json: not a Hugging Face model or PEFT adapter "
                f"directory")
    return None

def target_job(target: Target, store: Store, sampling: dict[str, Any], scoring: dict[str, Any]) -> TargetJob | None:
    """The target's job, with its saved samples when their key matches; None when its result is current."""
    weights: Any = weights_hash(target, store)
    if target.adapter is not None:  # its samples are those of its base model with it
        weights = {"adapter": weights, "base": scoring["reference"]["model"]}
    sample_key = sha256_json({"sampling": sampling, "weights": weights})
    key = sha256_json({"sample_key": sample_key, "scoring": scoring})
    if store.exists("result.json") and store.read_json("result.json")["key"] == key:
        return None
    job = TargetJob(target, store, sample_key, key)
    if store.exists("sampled.json") and store.read_json("sampled.json")["sample_key"] == sample_key:
        job.sampled, job.sampled_meta = True, store.read_json("sampled.json")
    else:
        job.find_parts()  # chunks written before an interruption
    return job


def weights_hash(target: Target, store: Store) -> str:
    """Content hash of a target's weights: the one our training recorded in the checkpoint when it wrote it, else
    the files hashed (a checkpoint at a URI downloaded once); recorded with the files' (size, mtime) and reused
    while they match."""
    stamp = sha256_json(Store(target.path).stamp())  # local or URI: the files' (path, size, mtime)
    if store.exists("identity.json"):
        record = store.read_json("identity.json")
        if record.get("stamp") == stamp:
            return record["sha256"]
    digest = checkpoint_hash(target.path)
    store.write_json("identity.json", {"path": target.path, "stamp": stamp, "sha256": digest})
    return digest
