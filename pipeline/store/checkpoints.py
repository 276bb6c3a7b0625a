"""Checkpoint layout: `<run_dir>/checkpoints/step_NNNNNN/` is a Hugging Face model directory, complete once its
config.json exists (written, or uploaded, last), or a PEFT LoRA adapter of the reference model (`train.lora`),
complete once its adapter_config.json exists (written last; no config.json). Training exports checkpoints here
(`export_checkpoint`, then `prune_checkpoints` under train.keep_checkpoints); evaluation and `run` list them.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline import faults
from pipeline.errors import RunFailed, error_line
from pipeline.store.fingerprint import combine_file_hashes, model_files_hash, sha256_file
from pipeline.store.storage import Store, check_free_space, local_copy, staging_dir

# The file written last into a checkpoint: it marks a full model's, or an adapter's, export complete.
MODEL_MARKER = "config.json"
ADAPTER_MARKER = "adapter_config.json"


def list_checkpoints(run_store: Store) -> list[str]:
    """The complete checkpoints of a run, oldest first: `<run_dir>/checkpoints/step_*` holding a config.json
    (a full model) or an adapter_config.json (a LoRA adapter), each written last."""
    names = sorted(n for n in run_store.listdir("checkpoints") if n.startswith("step_") and any(
        run_store.exists(f"checkpoints/{n}/{marker}") for marker in (MODEL_MARKER, ADAPTER_MARKER)))
    return [f"{run_store.uri}/checkpoints/{n}" for n in names]


def is_adapter(path: str | Path) -> bool:
    """Whether a checkpoint directory (local or URI) is a PEFT adapter (adapter_config.json, no config.json) rather
    than a full model."""
    store = Store(str(path))
    return store.exists(ADAPTER_MARKER) and not store.exists(MODEL_MARKER)


def remove_interrupted_exports(run_store: Store) -> None:
    """Delete exports a crash interrupted (`.tmp-*`, never listed as checkpoints)."""
    for name in run_store.listdir("checkpoints"):
        if name.startswith(".tmp-"):
            run_store.delete(f"checkpoints/{name}")


# Weight files are written (and, at a URI, uploaded) in parts of at most this many bytes; rank 0 holds one part.
SHARD_BYTES = 2 << 30
# Written into every export: the content hash evaluation keys its results by, so it never re-reads the weights.
RECORD = "dpo_checkpoint.json"


def export_hf(groups: tuple[int, Iterable[dict]], lm, tokenizer, dtype: torch.dtype, out_dir: Path) -> None:
    """Write a Hugging Face model directory atomically (temp dir, then rename) from `groups` = (count, iterator of
    {name: tensor}) as `pipeline.dpo.parallel.hf_weight_groups` yields them: one safetensors file per group (with
    an index when there are several), each hashed as it is written, the hashes recorded in
    `dpo_checkpoint.json`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    config = copy.deepcopy(lm.config)
    config.dtype = dtype  # what the weights are stored in: loaders use it as the default dtype
    config.save_pretrained(tmp)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(tmp)
    hashes = {"config.json": sha256_file(tmp / "config.json")}
    count, parts = groups
    weight_map = {}
    for i, part in enumerate(parts):
        name = "model.safetensors" if count == 1 else f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        save_file(part, tmp / name, metadata={"format": "pt"})
        hashes[name] = sha256_file(tmp / name)  # just written: read back from the page cache
        weight_map.update(dict.fromkeys(part, name))
        del part
    if count > 1:
        index = {"metadata": {"total_size": sum((tmp / f).stat().st_size for f in set(weight_map.values()))},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
        hashes["model.safetensors.index.json"] = sha256_file(tmp / "model.safetensors.index.json")
    hashes = dict(sorted(hashes.items()))
    (tmp / RECORD).write_text(json.dumps({"model_files_sha256": combine_file_hashes(hashes),
                                          "dtype": str(dtype).removeprefix("torch."), "files": hashes}, indent=2))
    faults.reach("checkpoint_export")
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():  # a step redone after a resume: replace the earlier export
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


ADAPTER_CONFIG = "adapter_config.json"  # a LoRA checkpoint's marker (written last), as config.json is a model's
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def export_adapter(tensors: dict[str, torch.Tensor], adapter_config, tokenizer, out_dir: Path,
                   merge: Callable[[Path, Path], None] | None = None) -> None:
    """Write a LoRA checkpoint atomically: the adapter in PEFT format (`tensors` under peft's saved names,
    `adapter_config` a peft config whose `save_pretrained` writes adapter_config.json), the tokenizer, the hash
    record, and with `merge(adapter_dir, merged_dir)` the merged full model in `merged/`."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    adapter_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if merge is not None:
        merge(tmp, tmp / "merged")
        tokenizer.save_pretrained(str(tmp / "merged"))
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.") if tensors else None
    (tmp / RECORD).write_text(json.dumps({"model_files_sha256": model_files_hash(tmp, top_level=True), "dtype": dtype,
                                          "adapter": True}, indent=2))
    faults.reach("checkpoint_export")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def export_checkpoint(run_store: Store, name: str, write: Callable[[Path], None],
                      last: str = "config.json") -> Callable[[], None]:
    """Export `<run_dir>/checkpoints/<name>` with `write(out_dir)` (`export_hf` or `export_adapter`): in place at
    a local run_dir; at a URI, written on this machine's disk, then uploaded (files in parallel, `last` last: the
    checkpoint is complete) by a background thread, so training goes on. Returns the function that waits for the
    upload to finish."""
    if run_store.local:
        write(Path(run_store.path(f"checkpoints/{name}")))
        return lambda: None
    tmp = tempfile.TemporaryDirectory()
    write(Path(tmp.name) / name)
    pool = ThreadPoolExecutor(1)

    def upload():
        with tmp:
            run_store.upload_dir(Path(tmp.name) / name, f"checkpoints/{name}", last=last)
    future = pool.submit(upload)
    pool.shutdown(wait=False)
    return future.result


def export_dtype(setting: str, model_dir: str) -> torch.dtype:
    """train.checkpoint.dtype: `auto` is the dtype the reference model's weights are stored in (config.json's
    `dtype`, `torch_dtype` in older files; float32 when it names none)."""
    if setting == "auto":
        config = json.loads((Path(model_dir) / "config.json").read_text())
        setting = config.get("dtype") or config.get("torch_dtype") or "float32"
    return getattr(torch, setting)


def recorded_hash(model_dir: str | Path) -> str | None:
    """The content hash an export recorded (equal to `model_files_hash` of its files), if it is one of ours; a
    local directory or a URI (only the small record is read)."""
    store = Store(str(model_dir))
    return store.read_json(RECORD)["model_files_sha256"] if store.exists(RECORD) else None


def checkpoint_hash(path: str) -> str:
    """`model_files_hash` of a checkpoint directory (local or URI): the recorded one of our exports, else the
    files hashed (a URI downloaded once to a node-local copy). For an adapter: of its adapter files (config and
    weights; a merged model in `merged/` is not part of it)."""
    recorded = recorded_hash(path)
    if recorded is not None:
        return recorded
    adapter = is_adapter(path)
    return model_files_hash(local_copy(path, top_level=adapter), top_level=adapter)


def prune_checkpoints(run_store: Store, keep: int) -> None:
    """Delete all but the `keep` newest `checkpoints/step_*` (the same rule as Ray's num_to_keep)."""
    names = sorted(n for n in run_store.listdir("checkpoints") if n.startswith("step_"))
    for old in names[:-keep]:
        run_store.delete(f"checkpoints/{old}")


def training_failed(error: Exception, run_store: Store) -> RunFailed:
    """The one-line failure of a training run (Ray Train's `TrainingFailedError`: the first worker's exception),
    naming the last complete training-state checkpoint under `<run_dir>/ray/`, which a rerun resumes from."""
    failures = getattr(error, "worker_failures", None)  # WorkerGroupError: {rank: the worker's exception}
    cause = next(iter(failures.values())) if failures else error
    done = sorted(n for n in run_store.listdir("ray") if re.fullmatch(r"checkpoint_\d{6}", n))
    kept = f"the last complete checkpoint is step_{done[-1][-6:]}" if done else "no checkpoint yet"  # Ray Train's
    return RunFailed(f"training failed ({error_line(cause)}); {kept}: rerun the same command to resume from it, or "
                     f"set train.checkpoint.max_failures to restart automatically")


def state_staging(directory: str | None, state_bytes: int, async_save: bool) -> Path:
    """Where a rank writes its part of the training state before Ray Train uploads it (`train.checkpoint.staging_dir`,
    else the node-local staging dir), checked for room: two copies under async_save (one uploading while the next is
    written), else one."""
    need, what = (2 * state_bytes, "this rank's training state (two copies under async_save)") if async_save \
        else (state_bytes, "this rank's training state")
    return check_free_space(directory or staging_dir() / "train-state", need, "train.checkpoint.staging_dir", what)
