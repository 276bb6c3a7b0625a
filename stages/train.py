"""Stage 2: DPO training on Ray Train with FSDP2, reading reference log-probs from the stage-1 cache.

Driver: find the cache of the configured inputs (refusing one built for other inputs), build one Ray dataset per
epoch, and run a `TorchTrainer`. Workers: load the policy, shard it (`apply_fsdp`), and for each optimizer step
take their slice of the global batch, accumulate micro-batch gradients, step, log, evaluate and checkpoint.

Batches are world-size invariant: every worker streams the epoch's pairs in the same seeded order and keeps
positions [r·G/W, (r+1)·G/W) of each global batch of G pairs, so W workers compute exactly the steps one worker
would (tested). Every worker gets the same number of batches; a last partial global batch is dropped.

Checkpoints: `<run_dir>/checkpoints/step_NNNNNN/` is a Hugging Face model directory (moved into place when
complete; at a URI run_dir, uploaded with config.json last); the sharded training state (model, optimizer,
scheduler, data position) is a Ray Train checkpoint under `<run_dir>/ray/`, which Ray lists only once every worker
has reported it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from ray.train.torch import TorchTrainer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from tqdm import tqdm

from pipeline.config import Config, to_yaml
from pipeline.data.models import load_hf_model, load_tokenizer
from pipeline.dpo.metrics import MetricsLogger, StepSums
from pipeline.dpo.parallel import PolicyLogps, apply_fsdp
from pipeline.dpo.step import StepCompute, make_optimizer, optimizer_step
from pipeline.errors import RunFailed, UserError, error_line
from pipeline.runtime import faults
from pipeline.runtime.cluster import spread
from pipeline.runtime.session import connect, quiet_worker_logs
from pipeline.store.cache_layout import find_cache
from pipeline.store.checkpoints import export_hf, list_checkpoints, remove_interrupted_exports
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store

# ---------------------------------------------------------------- driver


def _epoch_dataset(files: list[str], seed: int, epoch: int, shuffle: bool):
    """The epoch's pairs in an order fixed by (seed, epoch): cache files in a seeded order, rows within each
    file block sorted by a seeded hash of their id. Deterministic, so every worker sees the same stream."""
    files = list(files)
    if shuffle:
        random.Random(f"{seed}:{epoch}").shuffle(files)
    ds = ray.data.read_parquet(files, override_num_blocks=len(files))
    if shuffle:
        ds = ds.map_batches(_shuffle_block, fn_kwargs={"seed": seed, "epoch": epoch}, batch_format="pyarrow",
                            batch_size=None)
    return ds


def _check_cpus(cfg: Config) -> None:
    """Ray Data streams the cache to the workers only with at least one CPU the workers do not hold; without it
    the run would wait forever (measured with Ray 2.60)."""
    total = ray.cluster_resources().get("CPU", 0)
    held = cfg.train.parallel.num_workers * cfg.train.parallel.num_cpus_per_worker
    if total - held < 1:
        raise UserError(f"train.parallel.num_workers × train.parallel.num_cpus_per_worker = {held:g} CPUs leaves "
                        f"less than 1 of the cluster's {total:g} for data loading; lower "
                        f"train.parallel.num_cpus_per_worker (e.g. "
                        f"{max(0.25, (total - 1) / cfg.train.parallel.num_workers):g}) or add CPUs")


def _shuffle_block(batch, seed: int, epoch: int):
    keys = [hashlib.blake2b(f"{seed}:{epoch}:{i}".encode(), digest_size=8).digest()
            for i in batch.column("id").to_pylist()]
    order = sorted(range(len(keys)), key=keys.__getitem__)
    return batch.take(pa.array(order, pa.int64()))


@dataclass
class TrainResult:
    steps: int
    checkpoints: list[str]
    final_metrics: dict[str, Any]
    run_dir: str


def plan_steps(cfg: Config, pairs: int) -> tuple[int, int]:
    """(steps per epoch, total steps)."""
    per_epoch = pairs // cfg.train.global_batch_pairs
    if per_epoch == 0:
        raise UserError(f"the cache has {pairs} pairs, fewer than train.global_batch_pairs="
                        f"{cfg.train.global_batch_pairs}; lower the global batch")
    total = per_epoch * cfg.train.epochs
    return per_epoch, min(total, cfg.train.max_steps or total)


# Settings that change neither the weights nor which checkpoints are written.
_UNKEYED = {"log_every": True, "eval_every": True, "cache_path": True, "parallel": {"num_cpus_per_worker"},
            "checkpoint": {"max_failures", "keep"}}


def train_key(cfg: Config, cache_key: str) -> str:
    """Key of a training run's outputs: the train cache's key and the settings that shape the weights."""
    return sha256_json({"cache": cache_key, "train": cfg.train.model_dump(mode="json", exclude=_UNKEYED)})[:20]


def run(cfg: Config) -> TrainResult:
    train_cache = find_cache(cfg, "train")
    eval_cache = find_cache(cfg, "eval") if cfg.data.eval and cfg.train.eval_every else None
    per_epoch, total = plan_steps(cfg, train_cache.pairs)
    run_store = Store(cfg.run_dir)  # a local path (resolved here) or a URI
    run_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    remove_interrupted_exports(run_store)
    connect(cfg)
    _check_cpus(cfg)
    epochs = math.ceil(total / per_epoch)
    datasets = {f"train_{e}": _epoch_dataset(train_cache.files, cfg.train.seed, e, cfg.train.shuffle)
                for e in range(epochs)}
    if eval_cache:
        datasets["eval"] = _epoch_dataset(eval_cache.files, 0, 0, shuffle=False)
    t = cfg.train
    trainer = TorchTrainer(
        train_loop,
        # Paths resolved here: Ray Train workers run in another working directory.
        train_loop_config={"cfg": cfg.model_dump(mode="json"), "per_epoch": per_epoch, "total": total,
                           "fault": faults.env(),
                           "run_dir": run_store.uri, "model_dir": train_cache.model_dir,
                           "tokenizer_dir": train_cache.tokenizer_dir, "chat_template": train_cache.chat_template},
        scaling_config=ray.train.ScalingConfig(num_workers=t.parallel.num_workers, use_gpu=t.parallel.use_gpu,
                                               resources_per_worker={"CPU": t.parallel.num_cpus_per_worker},
                                               placement_strategy="SPREAD" if spread(cfg) else "PACK"),
        run_config=ray.train.RunConfig(
            # Ray Train writes its training state through the same pyarrow filesystem (local disk, s3, gs).
            name="ray", storage_path=run_store.root, storage_filesystem=None if run_store.local else run_store.fs,
            failure_config=ray.train.FailureConfig(max_failures=t.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=t.checkpoint.keep)),
        datasets=datasets,
        # Not split: every worker streams the whole epoch in the same order and keeps its slice of each batch.
        # (Ray Train replaces each dataset's execution options with these: preserve_order must be set here.)
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        failures = getattr(e, "worker_failures", None)  # WorkerGroupError: {rank: the worker's exception}
        cause = next(iter(failures.values())) if failures else e
        done = list_checkpoints(run_store)
        kept = f"the last complete checkpoint is {done[-1].rsplit('/', 1)[-1]}" if done else "no checkpoint yet"
        raise RunFailed(f"training failed ({error_line(cause)}); {kept}: rerun the same command to resume from it, or "
                        f"set train.checkpoint.max_failures to restart automatically") from None
    ckpts = list_checkpoints(run_store)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    # The record `dpo-pipeline run`/`plan` read to skip a finished run with the same inputs (written last).
    run_store.write_json("train.json", {"key": train_key(cfg, train_cache.key), "steps": total,
                                        "checkpoints": ckpts, "final_metrics": metrics,
                                        "worker_nodes": (result.metrics or {}).get("worker_nodes")})
    return TrainResult(total, ckpts, dict(result.metrics or {}), run_store.uri)


# ---------------------------------------------------------------- workers


def _lr_lambda(warmup: int, total: int, schedule: str):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point."""
    faults.adopt(config.get("fault", {}))
    _Worker(Config.model_validate(config["cfg"]), config).run()


class _Worker:
    """setup -> run (steps, eval, checkpoints) -> cleanup, on one Ray Train worker."""

    def __init__(self, cfg: Config, paths: dict[str, Any]):
        self.cfg, self.t, self.run_store = cfg, cfg.train, Store(paths["run_dir"])
        self.per_epoch, self.total = paths["per_epoch"], paths["total"]
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

        quiet_worker_logs()
        self.device = ray.train.torch.get_device()  # this worker's GPU under train.parallel.use_gpu, else the CPU
        torch.set_num_threads(max(1, int(self.t.parallel.num_cpus_per_worker)))
        torch.manual_seed(self.t.seed)
        model_dir = paths["model_dir"]
        self.tokenizer = load_tokenizer(paths["tokenizer_dir"], paths["chat_template"])
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        param_dtype = getattr(torch, self.t.parallel.param_dtype)
        # Every rank loads the same weights in fp32 (the master copy); fully_shard then keeps each rank's shard.
        self.lm = load_hf_model(model_dir, "float32", str(self.device), cfg.model.trust_remote_code)
        self.lm.train()
        self.policy = apply_fsdp(PolicyLogps(self.lm), param_dtype, self.t.parallel.activation_checkpointing,
                                 self.t.parallel.cpu_offload, self.t.parallel.compile)
        self.reference = None
        if self.t.ref_logps == "in_loop":
            ref = load_hf_model(model_dir, cfg.model.dtype, str(self.device), cfg.model.trust_remote_code)
            ref.requires_grad_(False)
            self.reference = apply_fsdp(PolicyLogps(ref), getattr(torch, cfg.model.dtype))
        self.opt = make_optimizer(self.policy.parameters(), self.t.optim.lr, self.t.optim.weight_decay)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(self.t.optim.warmup_steps, self.total,
                                                                            self.t.optim.schedule))
        self.compute = StepCompute(self.policy, self.reference, self.t.loss, self.pad_id, self.device)
        self.step = 0
        self.logger = MetricsLogger(paths["run_dir"], enabled=self.rank == 0)
        self.nodes = self._worker_nodes()
        self._restore()
        self.logger.resume_at(self.step)  # steps logged after the restored checkpoint are done (and logged) again

    def _worker_nodes(self) -> list[str]:
        """The Ray node id of every rank (a collective), recorded in train.json: where the training ran."""
        node = ray.get_runtime_context().get_node_id()
        if not dist.is_initialized():
            return [node]
        nodes: list[Any] = [None] * self.world
        dist.all_gather_object(nodes, node)
        return nodes

    # ------------------------------------------------------------ state

    def _restore(self) -> None:
        ckpt = ray.train.get_checkpoint()
        if ckpt is None:
            return
        with ckpt.as_directory() as d:
            model_sd, optim_sd = get_state_dict(self.policy, self.opt)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=str(Path(d) / "state"))
            set_state_dict(self.policy, self.opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
            meta = json.loads((Path(d) / "trainer_state.json").read_text())
        self.step = meta["step"]
        self.sched.load_state_dict(meta["scheduler"])
        if self.rank == 0:
            print(f"resumed from step {self.step} ({ckpt.path})")

    def _checkpoint(self, metrics: dict[str, float]) -> None:
        name = f"step_{self.step:06d}"
        full = get_model_state_dict(self.policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank == 0:
            state = {k.removeprefix("lm."): v for k, v in full.items()}
            store = self.run_store
            if store.local:
                export_hf(state, self.lm, self.tokenizer, Path(store.path(f"checkpoints/{name}")))
            else:  # written on this worker's disk, then uploaded (config.json last: the checkpoint is complete)
                with tempfile.TemporaryDirectory() as tmp:
                    export_hf(state, self.lm, self.tokenizer, Path(tmp) / name)
                    store.upload_dir(Path(tmp) / name, f"checkpoints/{name}", last="config.json")
            if self.t.checkpoint.keep:  # the same rule as Ray's num_to_keep for the training state
                olds = sorted(n for n in store.listdir("checkpoints") if n.startswith("step_"))
                for old in olds[:-self.t.checkpoint.keep]:
                    store.delete(f"checkpoints/{old}")
            self.logger.sync()
        with tempfile.TemporaryDirectory() as local:
            model_sd, optim_sd = get_state_dict(self.policy, self.opt)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(Path(local) / "state"))
            if self.rank == 0:
                Path(local, "trainer_state.json").write_text(json.dumps(
                    {"step": self.step, "scheduler": self.sched.state_dict(), "hf_checkpoint": name}))
            ray.train.report({**metrics, "step": self.step, "hf_checkpoint": name, "worker_nodes": self.nodes},
                             checkpoint=ray.train.Checkpoint.from_directory(local),
                             checkpoint_dir_name=f"checkpoint_{self.step:06d}")

    # ------------------------------------------------------------ compute

    def _train_step(self, global_batch) -> dict[str, float]:
        t0 = now()
        sums = StepSums()
        per_rank = self.t.global_batch_pairs // self.world
        self.compute.accumulate(global_batch.slice(self.rank * per_rank, per_rank), self.t.micro_batch_pairs, sums)
        lr = self.sched.get_last_lr()[0]
        norm = optimizer_step(self.policy, self.opt, self.t.optim.max_grad_norm)
        self.sched.step()
        metrics = sums.reduce(self.device)
        elapsed = now() - t0
        metrics.update({"grad_norm": float(norm), "lr": lr, "tokens_per_s": metrics.pop("tokens") / elapsed,
                        "pairs_per_s": metrics.pop("pairs") / elapsed, "peak_rss_mb": self._peak_rss_mb()})
        return metrics

    def _peak_rss_mb(self) -> float:
        """The largest peak resident memory of any worker process so far (a collective)."""
        rss = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0], dtype=torch.float64)
        if dist.is_initialized():
            rss = rss.to(self.device)
            dist.all_reduce(rss, op=dist.ReduceOp.MAX)
        return float(rss.item())

    def _evaluate(self) -> dict[str, float]:
        sums = StepSums()
        chunk = self.t.micro_batch_pairs * self.world
        for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=chunk, batch_format="pyarrow",
                                                                      drop_last=True):
            self.compute.evaluate(batch.slice(self.rank * self.t.micro_batch_pairs, self.t.micro_batch_pairs), sums)
        m = sums.reduce(self.device)
        return {"eval/loss": m["loss"], "eval/rewards/accuracies": m["rewards/accuracies"],
                "eval/rewards/margins": m["rewards/margins"]}

    # ------------------------------------------------------------ loop

    def run(self) -> None:
        bar = tqdm(total=self.total, initial=self.step, desc="training", unit="step", disable=self.rank != 0)
        G = self.t.global_batch_pairs
        last_saved = self.step if self.step else -1  # a resumed step is already in a checkpoint
        metrics: dict[str, float] = {}
        while self.step < self.total:
            epoch, skip = divmod(self.step, self.per_epoch)
            batches = ray.train.get_dataset_shard(f"train_{epoch}").iter_batches(
                batch_size=G, batch_format="pyarrow", drop_last=True)
            for i, global_batch in enumerate(batches):
                if i < skip:  # resuming mid-epoch: these steps are in the restored state
                    continue
                if i >= self.per_epoch or self.step >= self.total:
                    break
                metrics = self._train_step(global_batch)
                self.step += 1
                bar.update(1)
                if self.t.eval_every and self.step % self.t.eval_every == 0 and self.cfg.data.eval:
                    metrics.update(self._evaluate())
                if self.step % self.t.log_every == 0 or self.step == self.total:
                    self.logger.log(self.step, metrics, echo=bar.write)
                if self.t.checkpoint.every and self.step % self.t.checkpoint.every == 0:
                    self._checkpoint(metrics)
                    last_saved = self.step
                faults.reach("train_step")
        if last_saved != self.step:
            self._checkpoint(metrics)
        bar.close()
        self.logger.close()


def now() -> float:
    return time.perf_counter()
