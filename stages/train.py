"""Stage 2: DPO training on Ray Train with FSDP2, reading reference log-probs from the stage-1 cache.

Driver (`run`): find the cache of the configured inputs (refusing one built for other inputs; a reference-free loss
needs none: token files instead, written by Ray tasks when missing, pipeline/caches/tokens.py), deal its files to
data lanes, and run a `TorchTrainer` whose workers get a `WorkerPlan`; the driver never reads the training data.
Workers (`train_loop`): a `DPOWorker` goes through setup (build the policy on the meta device, shard it with
`apply_fsdp`, read its shards of the weights, restore the latest checkpoint) -> train (for each optimizer step read
its rows of the global batch, accumulate micro-batch gradients, step, log, evaluate and checkpoint every
train.checkpoint.every steps) -> save (the last step) -> cleanup. FSDP details: pipeline/dpo/parallel.py.

Batches are world-size invariant (W workers compute exactly the steps one worker would, tested) and each worker reads
about 1/W of the cache, only the columns a step uses: pipeline/data/lanes.py.

Checkpoints: `<run_dir>/checkpoints/step_NNNNNN/` is a Hugging Face model directory in train.checkpoint.dtype
(moved into place when complete; at a URI run_dir, uploaded in the background with config.json last); the sharded
training state (model, optimizer, scheduler, data position) is a Ray Train checkpoint under `<run_dir>/ray/`,
written in the background (train.checkpoint.async_save) and listed by Ray only once every worker has reported it.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from time import perf_counter as now
from typing import Any

import pyarrow as pa
import ray
import ray.train
import ray.train.torch
import torch
from ray.train.torch import TorchTrainer

from pipeline import faults
from pipeline.caches.layout import CacheRef, CacheSpec
from pipeline.caches.tokens import training_pairs
from pipeline.config import Config, LoggingConfig, ModelConfig, TrainConfig, to_yaml
from pipeline.data.lanes import LanePlan, plan_steps, read_train_columns, train_columns, worker_batches
from pipeline.data.modeling import disable_dropout, empty_causal_lm
from pipeline.data.models import load_tokenizer, on_this_node, resolve_model
from pipeline.dpo.lora import AdaptersDisabled, add_adapters, initial_adapter_values, is_adapter_param
from pipeline.dpo.losses import LossState
from pipeline.dpo.memory import check_fits, model_shape, training_memory
from pipeline.dpo.metrics import StepSums
from pipeline.dpo.parallel import (
    PolicyLogps,
    apply_fsdp,
    compute_dtype,
    full_shapes,
    load_hf_weights,
    materialize,
    process_group_backend,
    set_device_math,
    set_full_values,
)
from pipeline.dpo.step import StepCompute, lr_schedule, make_optimizer, optimizer_step, packing_mode, worker_maxima
from pipeline.runtime.cluster import check_spare_cpu, rank_node_ids, spread
from pipeline.runtime.console import ROUTER, RemoteBar, say
from pipeline.runtime.session import connect, quiet_worker_logs
from pipeline.runtime.trackers import open_trackers
from pipeline.store.checkpoints import (
    checkpoint_hash,
    export_dtype,
    list_checkpoints,
    remove_interrupted_exports,
    training_failed,
)
from pipeline.store.fingerprint import sha256_json
from pipeline.store.layout import RunLayout
from pipeline.store.storage import Store
from pipeline.training.checkpointer import Checkpointer, Export, Trained
from pipeline.training.metrics_log import MetricsLogger

# ---------------------------------------------------------------- driver


@dataclass
class TrainResult:
    steps: int
    checkpoints: list[str]
    final_metrics: dict[str, Any]
    run_dir: str


# Settings that change neither the weights (packing, recompute_head: tested) nor which checkpoints are written.
_UNKEYED = {"log_every": True, "eval_every": True, "cache_path": True, "init_from": True, "packing": True,
            "parallel": {"num_cpus_per_worker", "recompute_head", "gpu_memory_gb"},
            "checkpoint": {"max_failures", "keep", "async_save", "staging_dir"}}


def train_key(cfg: Config, cache_key: str) -> str:
    """Key of a training run's outputs: the train cache's key and the settings that shape the weights."""
    init = checkpoint_hash(cfg.train.init_from) if cfg.train.init_from else None  # the weights, not their path
    return sha256_json({"cache": cache_key, "train": cfg.train.model_dump(mode="json", exclude=_UNKEYED),
                        **({"init": init} if init else {})})[:20]


def run(cfg: Config) -> TrainResult:
    """Train from the split's reference cache, or, with a reference-free loss, from token files (written here by
    Ray tasks when missing, `pipeline/caches/tokens.py`): no reference cache is needed then."""
    spec, join_ray = CacheSpec.of(cfg), functools.partial(connect, cfg.ray, cfg.run_dir, cfg.shared_paths())
    train_data = training_pairs(spec, cfg.train.needs_reference, "train", join_ray)
    eval_data = training_pairs(spec, cfg.train.needs_reference, "eval", join_ray) \
        if cfg.data.eval and cfg.train.eval_every else None
    lanes, per_epoch, total = plan_steps(cfg.train, train_data.files, train_data.file_rows)
    shape = model_shape(train_data.model_dir, cfg.train.lora, cfg.model.trust_remote_code)  # the memory plan fits
    memory = training_memory(shape, cfg.train, cfg.data.max_length, cfg.model.dtype)
    check_fits(memory, cfg.train.parallel.gpu_memory_gb)
    run_store = RunLayout.of(cfg).run  # a local path (resolved here) or a URI
    run_store.write_bytes("config.yaml", to_yaml(cfg).encode())
    remove_interrupted_exports(run_store)
    connect(cfg.ray, cfg.run_dir, cfg.shared_paths())
    if eval_data:
        check_spare_cpu(cfg.train.parallel)
    # Paths resolved here: Ray Train workers run in another working directory.
    init = resolve_model(cfg.train.init_from, key="train.init_from") if cfg.train.init_from else None
    plan = WorkerPlan(
        train=cfg.train, model=cfg.model, logging=cfg.logging, params=cfg.model_dump(mode="json"),
        evaluates=cfg.data.eval is not None, run_dir=run_store.uri, model_dir=train_data.model_dir,
        tokenizer_dir=train_data.tokenizer_dir,
        chat_template=train_data.chat_template, lanes=lanes.lanes, rows_per_lane=lanes.rows_per_lane,
        steps_per_epoch=per_epoch, total_steps=total, fault_env=faults.env(),
        adapter_base=train_data.model_dir if Path(cfg.model.path).is_dir() else cfg.model.path,
        policy_dir=init.local_dir if init else train_data.model_dir)
    trainer = _trainer(cfg, plan, run_store, _eval_dataset(cfg, eval_data))
    ROUTER.expect("training")
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise training_failed(e, run_store) from None
    ROUTER.wait_closed("training", timeout=30.0)  # the workers' last lines (forwarded asynchronously) come first
    ckpts = list_checkpoints(run_store)
    metrics = {k: v for k, v in (result.metrics or {}).items() if isinstance(v, (int, float, str))}
    # The record `dpo-pipeline run`/`plan` read to skip a finished run with the same inputs (written last).
    run_store.write_json("train.json", {"key": train_key(cfg, train_data.key), "steps": total,
                                        "checkpoints": ckpts, "final_metrics": metrics,
                                        "worker_nodes": (result.metrics or {}).get("worker_nodes")})
    return TrainResult(total, ckpts, dict(result.metrics or {}), run_store.uri)


def _eval_dataset(cfg: Config, eval_data: CacheRef | None) -> dict[str, Any]:
    """The eval split as a Ray dataset (`eval`), streamed whole to every worker, in the cache's order."""
    if eval_data is None:
        return {}
    return {"eval": ray.data.read_parquet(eval_data.files, columns=list(train_columns(cfg.train)))}


def _trainer(cfg: Config, plan: WorkerPlan, run_store: Store, datasets: dict[str, Any]) -> TorchTrainer:
    parallel = cfg.train.parallel
    return TorchTrainer(
        train_loop, train_loop_config=plan.to_dict(),
        torch_config=ray.train.torch.TorchConfig(backend=process_group_backend(parallel)),
        scaling_config=ray.train.ScalingConfig(num_workers=parallel.num_workers, use_gpu=parallel.use_gpu,
                                               resources_per_worker={"CPU": parallel.num_cpus_per_worker},
                                               placement_strategy="SPREAD" if spread(cfg.ray) else "PACK"),
        run_config=ray.train.RunConfig(
            # Ray Train writes its training state through the same pyarrow filesystem (local disk, s3, gs).
            name="ray", storage_path=run_store.root, storage_filesystem=None if run_store.local else run_store.fs,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.checkpoint.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.checkpoint.keep)), datasets=datasets,
        # The eval split is not split: every worker streams it whole and scores its slice of each chunk.
        # (Ray Train replaces each dataset's execution options with these: preserve_order must be set here.)
        dataset_config=ray.train.DataConfig(datasets_to_split=[],
                                            execution_options=ray.data.ExecutionOptions(preserve_order=True)),
    )


# ---------------------------------------------------------------- workers


@dataclass
class WorkerPlan:
    """What every worker is given: the config sections it reads, and what the driver resolved. Crosses to the
    workers as `to_dict()` (JSON types) in `train_loop_config`."""

    train: TrainConfig
    model: ModelConfig
    logging: LoggingConfig
    params: dict[str, Any]  # the whole config as JSON: the trackers' run parameters
    evaluates: bool  # an eval split is configured (data.eval): train.eval_every evaluates on it
    run_dir: str  # a resolved local path or a URI
    model_dir: str
    tokenizer_dir: str
    chat_template: str | None
    lanes: list[list[tuple[str, int, int]]]  # LanePlan.lanes: per lane, its pieces (file, first row, end row)
    rows_per_lane: int
    steps_per_epoch: int
    total_steps: int
    fault_env: dict[str, str] = field(default_factory=dict)  # faults.env() of the driver
    adapter_base: str = ""  # LoRA exports' base_model_name_or_path: the hub id as configured, else model_dir
    policy_dir: str = ""  # the policy's initial weights (`train.init_from`, default model_dir)

    def to_dict(self) -> dict[str, Any]:
        return {**{f.name: getattr(self, f.name) for f in fields(self)},
                **{k: getattr(self, k).model_dump(mode="json") for k in _SECTIONS}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerPlan:
        dirs = {k: on_this_node(d[k]) for k in ("model_dir", "tokenizer_dir", "policy_dir")}  # as this node sees them
        return cls(**{**d, **dirs, **{k: section.model_validate(d[k]) for k, section in _SECTIONS.items()}})


_SECTIONS = {"train": TrainConfig, "model": ModelConfig, "logging": LoggingConfig}


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point: the worker's lifecycle."""
    plan = WorkerPlan.from_dict(config)
    faults.adopt(plan.fault_env)
    worker = DPOWorker(plan)
    worker.setup()
    worker.train()
    worker.save()  # the last step, unless a periodic checkpoint holds it already
    worker.cleanup()


class DPOWorker:
    """DPO training on one Ray Train worker: setup (models, sharding, optimizer, restored state) -> train (steps,
    evaluation, logging, periodic checkpoints) -> save (a checkpoint of the current step) -> cleanup. Checkpoints
    (exports, the background state save, reporting to Ray Train): pipeline/training/checkpointer.py."""

    def __init__(self, plan: WorkerPlan):
        self.plan, self.settings = plan, plan.train  # the train section
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.step = 0
        self.metrics: dict[str, float] = {}  # the last step's
        self.read_bytes = 0  # cache bytes this worker has read (decoded)

    # ------------------------------------------------------------ lifecycle

    def setup(self) -> None:
        quiet_worker_logs()
        self.device = ray.train.torch.get_device()  # this worker's GPU under train.parallel.use_gpu, else the CPU
        set_device_math(self.device, self.settings.parallel.num_cpus_per_worker)  # threads; TF32 on a GPU
        torch.manual_seed(self.settings.seed)
        tokenizer = load_tokenizer(self.plan.tokenizer_dir, self.plan.chat_template)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        lm, self.policy = self._policy()
        in_loop = self.settings.ref_logps == "in_loop" and self.settings.needs_reference
        reference = self._reference() if in_loop else None  # a reference-free loss loads none
        optim = self.settings.optim
        # Under LoRA only the adapters (and modules_to_save copies) train: optimizer state for those alone.
        self.optimizer = make_optimizer([p for p in self.policy.parameters() if p.requires_grad], optim.lr,
                                        optim.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_schedule(optim.warmup_steps, self.plan.total_steps, optim.schedule))
        self.compute = StepCompute(self.policy, reference, self.settings.losses, pad_id, self.device,
                                   packing=packing_mode(self.settings.packing, self.device))
        if (padded := self.compute.check_packing()) and self.rank == 0:  # (every rank: one forward)
            say(f"train.packing auto: padded rows, {padded}")
        trackers = open_trackers(self.plan.logging, self.plan.run_dir, self.plan.params) if self.rank == 0 else None
        self.logger = MetricsLogger(self.plan.run_dir, enabled=self.rank == 0,
                                    tensorboard="tensorboard" in self.plan.logging.report_to, trackers=trackers)
        self.nodes = rank_node_ids()  # recorded in train.json: where the training ran
        export = Export(export_dtype(self.settings.checkpoint.dtype, self.plan.model_dir), self.plan.model_dir,
                        self.plan.adapter_base, self.settings.lora)
        self.checkpointer = Checkpointer(self.settings.checkpoint, Store(self.plan.run_dir),
                                         Trained(lm, self.policy, self.optimizer, tokenizer), export, self.rank,
                                         self.device, sync_logs=self.logger.sync)
        if (state := self.checkpointer.restore()) is not None:  # resumed: weights and optimizer restored
            self.step = state["step"]
            self.scheduler.load_state_dict(state["scheduler"])
            self.compute.state = LossState(**state.get("loss_state", {}))
        self.logger.resume_at(self.step)  # steps logged after the restored checkpoint are done (and logged) again
        self.bar = RemoteBar(self.plan.total_steps, "training", "step", initial=self.step, disable=self.rank != 0)

    def train(self) -> None:
        while self.step < self.plan.total_steps:
            self._train_epoch()

    def save(self) -> None:
        """Checkpoint the current step (unless a checkpoint holds it already)."""
        self.checkpointer.save(self.step, {"scheduler": self.scheduler.state_dict(),
                                           "loss_state": asdict(self.compute.state)},
                               {**self.metrics, "worker_nodes": self.nodes})

    def cleanup(self) -> None:
        self.checkpointer.close()
        self.bar.close()
        self.logger.close()

    # ------------------------------------------------------------ setup

    def _policy(self) -> tuple[torch.nn.Module, PolicyLogps]:
        """The language model and the sharded policy around it, in fp32 (the master copy): built on the meta
        device, sharded, then each rank reads only its own shards' slices of the weights (nothing the size of the
        model is allocated on any rank)."""
        parallel = self.settings.parallel
        model = self.plan.model
        lm = empty_causal_lm(self.plan.policy_dir, "float32", model.trust_remote_code, model.attn_implementation,
                             self.device)
        if not self.settings.dropout:
            disable_dropout(lm)
        if self.settings.lora:
            lm = add_adapters(lm, self.settings.lora)  # the base frozen, adapters trainable
        lm.train()
        policy = apply_fsdp(PolicyLogps(lm, parallel.recompute_head), compute_dtype(parallel),
                            parallel.activation_checkpointing, parallel.cpu_offload, parallel.compile)
        self._fill(policy, self.plan.policy_dir)
        if self.settings.lora:
            # The same initial adapters on every rank (B = 0: the policy starts as the reference).
            shapes = full_shapes(policy, is_adapter_param)
            set_full_values(policy, initial_adapter_values(shapes, self.settings.seed))
        return lm, policy

    def _reference(self) -> torch.nn.Module:
        """The frozen in-loop reference, sharded, in the model's dtype (loaded the same way as the policy); under
        LoRA the policy itself with its adapters disabled (no second model)."""
        if self.settings.lora:
            return AdaptersDisabled(self.policy)
        model = self.plan.model
        ref = empty_causal_lm(self.plan.model_dir, model.dtype, model.trust_remote_code, model.attn_implementation,
                              self.device).eval()
        ref.requires_grad_(False)
        ref = apply_fsdp(PolicyLogps(ref), getattr(torch, self.plan.model.dtype))
        self._fill(ref, self.plan.model_dir)
        return ref

    def _fill(self, model: PolicyLogps, weights_dir: str) -> None:
        # With CPU offload FSDP keeps the shards on the CPU and moves them to the GPU per use.
        materialize(model, "cpu" if self.settings.parallel.cpu_offload else self.device)
        load_hf_weights(model, weights_dir)

    # ------------------------------------------------------------ train

    def _train_epoch(self) -> None:
        """The rest of the current epoch: this worker's rows of each global batch, from its own lanes."""
        epoch, skip = divmod(self.step, self.plan.steps_per_epoch)
        lanes = LanePlan(self.plan.lanes, self.plan.rows_per_lane)
        batches = worker_batches(lanes, self.rank, self.world, self.settings.seed, epoch, self.settings.shuffle,
                                 skip, self._read)
        for i, batch in enumerate(batches, start=skip):
            if i >= self.plan.steps_per_epoch or self.step >= self.plan.total_steps:
                break
            self._step(batch)
            faults.reach("train_step")

    def _read(self, uri: str) -> pa.Table:
        table = read_train_columns(uri, train_columns(self.settings))
        self.read_bytes += table.nbytes
        return table

    def _step(self, batch) -> None:
        """One optimizer step, then what is due after it: evaluation, logging, a checkpoint."""
        self.metrics = self._train_step(batch)
        self.step += 1
        self.bar.update(1)
        if self.settings.eval_every and self.step % self.settings.eval_every == 0 and self.plan.evaluates:
            self.metrics.update(self._evaluate())
        self.checkpointer.poll()  # a background save every rank has finished is reported
        self.metrics["checkpoint/waited_s"] = self.checkpointer.waited_s  # so far: saves' cost to steps
        if self.step % self.settings.log_every == 0 or self.step == self.plan.total_steps:
            self.logger.log(self.step, self.metrics, echo=self.bar.write, total=self.plan.total_steps)
        if self.settings.checkpoint.every and self.step % self.settings.checkpoint.every == 0:
            self.save()

    def _train_step(self, batch) -> dict[str, float]:
        """This rank's G/W pairs of the global batch: forward/backward, clip, optimizer step."""
        t0 = now()
        sums = StepSums()
        self.compute.accumulate(batch, self.settings.micro_batch_pairs, sums, self.settings.micro_batch_tokens)
        lr = self.scheduler.get_last_lr()[0]
        norm = optimizer_step(self.policy, self.optimizer, self.settings.optim.max_grad_norm)
        self.scheduler.step()
        metrics = sums.reduce(self.device)
        metrics.update(self.compute.state.update(metrics))
        elapsed = now() - t0
        metrics.update({"grad_norm": float(norm), "lr": lr, "tokens_per_s": metrics.pop("tokens") / elapsed,
                        "pairs_per_s": metrics.pop("pairs") / elapsed,
                        **worker_maxima(self.read_bytes, self.optimizer, self.device)})
        return metrics

    def _evaluate(self) -> dict[str, float]:
        """Loss and reward accuracy/margin on the eval split; each rank scores its slice of every chunk."""
        sums = StepSums()
        micro = self.settings.micro_batch_pairs
        for batch in ray.train.get_dataset_shard("eval").iter_batches(batch_size=micro * self.world,
                                                                      batch_format="pyarrow", drop_last=True):
            self.compute.evaluate(batch.slice(self.rank * micro, micro), sums)
        m = sums.reduce(self.device)
        return {"eval/loss": m["loss"], "eval/rewards/accuracies": m["rewards/accuracies"],
                "eval/rewards/margins": m["rewards/margins"]}
