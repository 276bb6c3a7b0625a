"""A training worker's checkpoints (after torchtitan's `CheckpointManager`): what the loop calls at a checkpoint,
at the end and at a restart, so that the loop itself reads as a loop.

At each checkpoint: the previous checkpoint's background save is reported first (a run that dies in this export
resumes from the last complete one), then `checkpoints/step_NNNNNN/` is exported as a Hugging Face model directory
(or a LoRA adapter) by rank 0 (the weights gathered one group at a time, a collective; at a URI run_dir uploaded
in the background, old exports pruned once it is up), then every rank writes its shards of the training state
(model, optimizer) with `trainer_state.json` (step, scheduler, loss state), which is reported to Ray Train as one
checkpoint once every rank has written its part: in the background under `train.checkpoint.async_save`.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter as now
from typing import Any

import ray.train
import torch
import torch.distributed as dist
from ray.train import CheckpointUploadMode

from pipeline.config.schema import CheckpointConfig, LoraSettings
from pipeline.data.modeling import merge_adapter
from pipeline.dpo.lora import adapter_export, is_trained
from pipeline.dpo.parallel import (
    PolicyLogps,
    async_save_sharded_state,
    hf_weight_groups,
    load_sharded_state,
    on_every_rank,
    save_sharded_state,
    state_bytes,
)
from pipeline.runtime.console import say
from pipeline.store.checkpoints import (
    ADAPTER_CONFIG,
    SHARD_BYTES,
    export_adapter,
    export_checkpoint,
    export_hf,
    prune_checkpoints,
    state_staging,
)
from pipeline.store.storage import Store


@dataclass(frozen=True)
class Export:
    """What a Hugging Face export is written as."""

    dtype: torch.dtype  # of the exported weights (train.checkpoint.dtype resolved)
    model_dir: str  # the base model: a LoRA merge reads its weights
    adapter_base: str  # LoRA exports' base_model_name_or_path
    lora: LoraSettings | None


@dataclass
class Trained:
    """What a checkpoint holds: the sharded policy around the language model, its optimizer, the tokenizer."""

    lm: torch.nn.Module
    policy: PolicyLogps
    optimizer: torch.optim.Optimizer
    tokenizer: Any


class Checkpointer:
    """Checkpoints of one worker: `restore` at setup, `poll` after each step, `save` at a checkpoint step, `close`
    at the end. Counts how long the loop stopped for them (`waited_s`, logged as `checkpoint/waited_s`)."""

    def __init__(self, settings: CheckpointConfig, run_store: Store, model: Trained, export: Export, rank: int,
                 device: torch.device, sync_logs: Callable[[], None]):
        """`sync_logs`: puts the run's logged rows on storage with each export (`MetricsLogger.sync`)."""
        self.settings, self.run_store, self.model, self.export = settings, run_store, model, export
        self.rank, self.device, self.sync_logs = rank, device, sync_logs
        self.staging = state_staging(settings.staging_dir, state_bytes(model.policy), settings.async_save)
        # The background writer coordinates over a group of its own (gloo: host memory, any device).
        self.save_group = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self.saved_step: int | None = None  # the step the newest checkpoint holds
        self.upload: Callable[[], None] | None = None  # waits for the last export's upload (rank 0)
        self.pending: tuple[Future, Path, dict[str, Any]] | None = None  # the training state being written
        self.blocked_s: list[float] = []  # per checkpoint: how long the loop stopped for it
        self.reporting_s = 0.0  # checking for and reporting background saves between checkpoints; the waits at the end

    @property
    def waited_s(self) -> float:
        """What checkpoints have cost the loop so far."""
        return sum(self.blocked_s) + self.reporting_s

    def restore(self) -> dict[str, Any] | None:
        """Ray Train's latest checkpoint, if any, loaded into the policy and optimizer (read in place on the run's
        storage: each rank fetches only its shards); returns its trainer state (step, scheduler, loss_state)."""
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return None
        load_sharded_state(f"{ckpt.path}/state", ckpt.filesystem, self.model.policy, self.model.optimizer)
        with ckpt.filesystem.open_input_stream(f"{ckpt.path}/trainer_state.json") as f:
            trainer_state = json.loads(f.read())
        self.saved_step = trainer_state["step"]
        if self.rank == 0:
            say(f"resumed from step {self.saved_step} ({ckpt.path})")
        return trainer_state

    def poll(self) -> None:
        """Between checkpoints: report the background save if every rank has finished it (never waits)."""
        t0 = now()
        self._report_saved(wait=False)
        self.reporting_s += now() - t0

    def save(self, step: int, trainer_state: dict[str, Any], metrics: dict[str, Any]) -> None:
        """Checkpoint `step` unless the newest checkpoint holds it already. `trainer_state`: what a restart needs
        beside the shards (JSON); `metrics`: reported to Ray Train with the checkpoint."""
        if self.saved_step == step:
            return
        name = f"step_{step:06d}"
        t0 = now()
        self._report_saved(wait=True)
        self._export_hf(name)
        self._save_state(name, {"step": step, "hf_checkpoint": name, **trainer_state}, {**metrics, "step": step,
                                                                                        "hf_checkpoint": name})
        self.saved_step = step
        self.blocked_s.append(now() - t0)

    def close(self) -> None:
        """Wait for the last save's report and the last export's upload."""
        t0 = now()
        self._report_saved(wait=True)
        self._finish_export()
        self.reporting_s += now() - t0
        if self.rank == 0 and self.blocked_s:
            say(f"checkpoints: the loop waited {self.waited_s:.2f} s for {len(self.blocked_s)} (longest save "
                f"{max(self.blocked_s):.2f} s)")

    def _export_hf(self, name: str) -> None:
        """`checkpoints/<name>`: the weights gathered one group at a time in the export dtype (every rank takes part),
        written by rank 0; at a URI run_dir uploaded in the background."""
        self._finish_export()
        lora, model = self.export.lora, self.model
        groups = hf_weight_groups(model.policy, self.export.dtype, SHARD_BYTES, self.device,
                                  select=is_trained if lora else None)
        if self.rank != 0:
            for _ in groups[1]:  # take part in the gathers
                pass
            return
        if lora:
            tensors, config = adapter_export(model.lm, groups[1], self.export.adapter_base)
            merge = functools.partial(merge_adapter, self.export.model_dir, self.export.dtype) if lora.merge else None
            write = functools.partial(export_adapter, tensors, config, model.tokenizer, merge=merge)
            self.upload = export_checkpoint(self.run_store, name, write, last=ADAPTER_CONFIG)
        else:
            write = functools.partial(export_hf, groups, model.lm, model.tokenizer, self.export.dtype)
            self.upload = export_checkpoint(self.run_store, name, write)
        self.sync_logs()  # the rows and TensorBoard events up to this checkpoint, on storage
        if self.run_store.local:
            self._finish_export()

    def _finish_export(self) -> None:
        """Wait for the last export's upload, then prune old checkpoints (rank 0)."""
        if self.upload is None:
            return
        self.upload()
        self.upload = None
        if self.settings.keep:
            prune_checkpoints(self.run_store, self.settings.keep)

    def _save_state(self, name: str, trainer_state: dict[str, Any], meta: dict[str, Any]) -> None:
        """The sharded training state (every rank) and trainer_state.json (rank 0), reported to Ray Train as one
        checkpoint once every rank has written its part: in the background under async_save (one save in flight at
        a time: `save` has reported the last one), else before returning."""
        local = Path(tempfile.mkdtemp(prefix="dpo-state-", dir=self.staging))
        if self.rank == 0:
            (local / "trainer_state.json").write_text(json.dumps(trainer_state))
        policy, optimizer = self.model.policy, self.model.optimizer
        if not self.settings.async_save:
            save_sharded_state(local / "state", policy, optimizer)
            self._report(local, meta)
            return
        self.pending = (async_save_sharded_state(local / "state", policy, optimizer, self.save_group), local, meta)

    def _report_saved(self, wait: bool) -> None:
        """Report the background save to Ray Train when every rank has finished writing it (all ranks agree: a
        collective while one is in flight), or wait for it."""
        if self.pending is None:
            return
        future, local, meta = self.pending
        if not wait and not on_every_rank(future.done(), self.device):
            return
        future.result()  # a failed write fails the step here
        self.pending = None
        self._report(local, meta)

    def _report(self, local: Path, meta: dict[str, Any]) -> None:
        """Under async_save Ray Train uploads the state to run_dir's storage in a background thread and registers
        it once uploaded (in report order; the worker waits for it before it ends), so steps go on during the
        upload (the state of a node at 8B: ~96 GB); else here. The local copy is deleted once uploaded."""
        mode = CheckpointUploadMode.ASYNC if self.settings.async_save else CheckpointUploadMode.SYNC
        ray.train.report(meta, checkpoint=ray.train.Checkpoint.from_directory(str(local)),
                         checkpoint_dir_name=f"checkpoint_{meta['step']:06d}", checkpoint_upload_mode=mode,
                         delete_local_checkpoint_after_upload=True)
