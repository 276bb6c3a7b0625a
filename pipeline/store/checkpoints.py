"""Checkpoint layout: `<run_dir>/checkpoints/step_NNNNNN/` is a Hugging Face model directory, complete once its
config.json exists (written, or uploaded, last). Training exports checkpoints here (`export_checkpoint`, then
`prune_checkpoints` under train.keep_checkpoints); evaluation and `run` list them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from huggingface_hub import save_torch_state_dict

from pipeline.runtime import faults
from pipeline.store.storage import Store


def list_checkpoints(run_store: Store) -> list[str]:
    """The complete Hugging Face checkpoints of a run, oldest first: `<run_dir>/checkpoints/step_*` holding a
    config.json (written last)."""
    names = sorted(n for n in run_store.listdir("checkpoints")
                   if n.startswith("step_") and run_store.exists(f"checkpoints/{n}/config.json"))
    return [f"{run_store.uri}/checkpoints/{n}" for n in names]


def remove_interrupted_exports(run_store: Store) -> None:
    """Delete exports a crash interrupted (`.tmp-*`, never listed as checkpoints)."""
    for name in run_store.listdir("checkpoints"):
        if name.startswith(".tmp-"):
            run_store.delete(f"checkpoints/{name}")


def export_hf(full_state: dict, lm, tokenizer, out_dir: Path) -> None:
    """Write a Hugging Face model directory atomically (temp dir, then rename)."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out_dir.name}-", dir=out_dir.parent))
    lm.config.save_pretrained(tmp)
    if getattr(lm, "generation_config", None) is not None:
        lm.generation_config.save_pretrained(tmp)
    save_torch_state_dict(full_state, tmp)
    faults.reach("checkpoint_export")
    tokenizer.save_pretrained(str(tmp))
    if out_dir.exists():  # a step redone after a resume: replace the earlier export
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def export_checkpoint(run_store: Store, name: str, full_state: dict, lm, tokenizer) -> None:
    """Export `<run_dir>/checkpoints/<name>`: in place at a local run_dir; at a URI, written on this machine's disk,
    then uploaded (config.json last: the checkpoint is complete)."""
    if run_store.local:
        export_hf(full_state, lm, tokenizer, Path(run_store.path(f"checkpoints/{name}")))
        return
    with tempfile.TemporaryDirectory() as tmp:
        export_hf(full_state, lm, tokenizer, Path(tmp) / name)
        run_store.upload_dir(Path(tmp) / name, f"checkpoints/{name}", last="config.json")


def prune_checkpoints(run_store: Store, keep: int) -> None:
    """Delete all but the `keep` newest `checkpoints/step_*` (the same rule as Ray's num_to_keep)."""
    names = sorted(n for n in run_store.listdir("checkpoints") if n.startswith("step_"))
    for old in names[:-keep]:
        run_store.delete(f"checkpoints/{old}")
