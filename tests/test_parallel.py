"""Loading a sharded model without a full copy per rank: the meta-device skeleton, sharded, then filled slice by
slice, holds exactly the weights a plain transformers load gives; FSDP2 keeps gradients sharded between micro-batches
(2 gloo ranks, in-process spawn: one pair of processes for all of them)."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config.schema import ParallelConfig
from pipeline.data.modeling import attention_implementation, empty_causal_lm, load_hf_model
from pipeline.dpo.parallel import (
    PolicyLogps,
    compute_dtype,
    hf_weight_groups,
    load_hf_weights,
    materialize,
    process_group_backend,
    set_device_math,
    shard_model,
    state_bytes,
)
from pipeline.dpo.step import make_optimizer
from pipeline.errors import UserError
from tests.test_batching import _pairs as pairs
from tests.test_step import accumulate_on_rank, reference_grads


def _load_sharded(rank: int, world: int, model_dir: str, out: str) -> None:
    policy = shard_model(PolicyLogps(empty_causal_lm(model_dir)))
    materialize(policy, "cpu")
    load_hf_weights(policy, model_dir)
    full = {}  # gathered on rank 0, a group at a time
    for group in hf_weight_groups(policy, torch.float32, 40_000)[1]:
        full.update(group)
    if rank == 0:
        torch.save({**full, **{f"buffer:{n}": b for n, b in policy.lm.named_buffers()}}, out)


def _jobs_on_ranks(rank: int, world: int, init: str, jobs: list) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for job, args in jobs:
            job(rank, world, *args)
            dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, Path]:
    """Every two-rank check of this module, run in one pair of gloo processes (each start imports torch and
    transformers: ~8 s of CPU) instead of a pair per check: name -> what rank 0 saved."""
    root = tmp_path_factory.mktemp("two-ranks")
    models = {"fp32-untied": _tiny_llama(root / "fp32", torch.float32, tied=False),
              "bf16-tied": _tiny_llama(root / "bf16", torch.bfloat16, tied=True),
              "no-safetensors": _tiny_llama(root / "bin", torch.float32, tied=False, safetensors=False)}
    outs = {name: root / f"{name}.pt" for name in [*models, "accumulate"]}
    jobs = [(_load_sharded, (str(models[name]), str(outs[name]))) for name in models]
    jobs.append((accumulate_on_rank, (str(outs["accumulate"]),)))
    mp.spawn(_jobs_on_ranks, args=(2, f"file://{root / 'pg'}", jobs), nprocs=2)
    return {"models": models, **outs}


def _tiny_llama(out: Path, dtype: torch.dtype, tied: bool, safetensors: bool = True) -> Path:
    config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    torch.manual_seed(1)
    model = LlamaForCausalLM(config).to(dtype)
    model.save_pretrained(out)
    if not safetensors:  # an older checkpoint: pytorch_model.bin
        (out / "model.safetensors").unlink()
        torch.save(model.state_dict(), out / "pytorch_model.bin")
    return out


@pytest.mark.parametrize("name, tied", [("fp32-untied", False), ("bf16-tied", True)])
@pytest.mark.subprocess
def test_meta_device_load_equals_a_full_load(two_ranks, name, tied):
    model_dir = two_ranks["models"][name]
    got = torch.load(two_ranks[name])
    want = load_hf_model(str(model_dir), "float32")  # the fp32 master copy training starts from
    want_params = dict(want.state_dict())
    assert set(want_params) <= set(k for k in got if not k.startswith("buffer:")) | {"lm_head.weight"}
    for key, tensor in want_params.items():
        if key in got:
            assert got[key].dtype == torch.float32
            assert torch.equal(got[key], tensor), key
    if tied:
        assert torch.equal(got.get("lm_head.weight", got["model.embed_tokens.weight"]),
                           want.model.embed_tokens.weight)
    for key, buf in want.named_buffers():  # rotary inv_freq: computed at construction, kept through to_empty
        assert torch.equal(got[f"buffer:{key}"], buf), key


@pytest.mark.subprocess
def test_a_model_without_safetensors_is_broadcast_from_rank0(two_ranks):
    model_dir = two_ranks["models"]["no-safetensors"]
    assert not list(model_dir.glob("*.safetensors"))
    got = torch.load(two_ranks["no-safetensors"])
    for key, tensor in load_hf_model(str(model_dir)).state_dict().items():
        assert torch.equal(got[key], tensor), key


@pytest.mark.subprocess
def test_gradients_stay_sharded_between_micro_batches_on_two_ranks(two_ranks):
    """Gradient accumulation on 2 ranks holds each parameter's gradient as this rank's 1/2 shard between
    micro-batches (no unsharded copy of the whole model's gradient), and the step's gradient is the formula's
    over all 12 pairs (1 rank: test_step.py's test_fsdp_step_gradient_equals_the_formula)."""
    got = torch.load(two_ranks["accumulate"])
    assert len(got["seen"]) == 3
    for grads in got["seen"][1:]:  # before micro-batches 2 and 3 (deferred: none of them held as a shard)
        assert all(g is not None for g in grads.values()), [k for k, g in grads.items() if g is None]
        assert all(local == shard for local, shard, _ in grads.values())
        held, whole = sum(g[0] for g in grads.values()), sum(g[2] for g in grads.values())
        assert held <= whole / 2 + 64 * len(grads), (held, whole)  # 1/W of the model, up to shard rounding
    _, want = reference_grads(pairs(12, seed=3))
    assert got["grads"].keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got["grads"][k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def test_an_incomplete_model_directory_is_a_user_error(tmp_path):
    from safetensors.torch import load_file, save_file

    model_dir = _tiny_llama(tmp_path / "model", torch.float32, tied=False)
    (weights,) = model_dir.glob("*.safetensors")
    state = load_file(weights)
    del state["model.norm.weight"]
    save_file(state, weights, metadata={"format": "pt"})
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg1'}", rank=0, world_size=1)
    try:
        policy = shard_model(PolicyLogps(empty_causal_lm(str(model_dir))))
        materialize(policy, "cpu")
        with pytest.raises(Exception, match="no weights for 'model.norm.weight'"):
            load_hf_weights(policy, str(model_dir))
    finally:
        dist.destroy_process_group()


class _CountingS3:
    """Counts the bytes read through a pyarrow filesystem's random-access files."""

    def __init__(self, fs):
        self.fs, self.read = fs, 0

    def __getattr__(self, name):
        return getattr(self.fs, name)

    def open_input_file(self, path):
        f = self.fs.open_input_file(path)
        counter = self

        class Counting:
            def __getattr__(self, name):
                return getattr(f, name)

            def read(self, n=-1):
                data = f.read(n) if n is not None and n >= 0 else f.read()
                counter.read += len(data)
                return data
        return Counting()


def test_sharded_state_restores_straight_from_s3(s3, tmp_path):
    """The training state saved to local disk, uploaded, then loaded through the S3 filesystem in place: the same
    weights and optimizer state, and no copy of the checkpoint on local disk."""
    import pyarrow.fs as pafs

    from pipeline.dpo.parallel import load_sharded_state, save_sharded_state
    from pipeline.dpo.step import make_optimizer
    from pipeline.store.storage import Store

    def model_and_optimizer(seed):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        opt = make_optimizer(model.parameters(), 1e-2, 0.0)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        return model, opt

    saved, saved_opt = model_and_optimizer(0)
    save_sharded_state(tmp_path / "state", saved, saved_opt)
    run = Store(f"{s3}/runs/restore")  # moto's buckets live on across tests of one process: a prefix of its own
    run.upload_dir(tmp_path / "state", "ray/checkpoint_000002/state", last=".metadata")

    restored, restored_opt = model_and_optimizer(1)
    fs, path = pafs.FileSystem.from_uri(f"{s3}/runs/restore/ray/checkpoint_000002/state")
    counting = _CountingS3(fs)
    load_sharded_state(path, counting, restored, restored_opt)
    for a, b in zip(saved.state_dict().values(), restored.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(saved_opt.state_dict()["state"][0]["exp_avg"], restored_opt.state_dict()["state"][0]["exp_avg"])
    total = sum(f.size for f in fs.get_file_info(pafs.FileSelector(path)))
    assert 0 < counting.read <= total  # ranged reads through the filesystem, no more than the files hold


@pytest.mark.parametrize("setting, use_gpu, want", [
    ("auto", True, torch.bfloat16), ("auto", False, torch.float32),
    ("float32", True, torch.float32), ("bfloat16", False, torch.bfloat16)])
def test_compute_dtype_is_bf16_on_gpus_unless_set(setting, use_gpu, want):
    assert compute_dtype(ParallelConfig(param_dtype=setting, use_gpu=use_gpu)) == want


def test_tf32_is_enabled_for_gpu_workers_only(monkeypatch):
    asked = []
    monkeypatch.setattr(torch, "set_float32_matmul_precision", asked.append)
    threads = torch.get_num_threads()
    try:
        set_device_math(torch.device("cpu"), 1.0)
        assert asked == [] and torch.get_num_threads() == 1
        set_device_math(torch.device("cuda", 0), 2.0)
        assert asked == ["high"] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_the_plan_names_the_compute_dtype(tiny_model, tmp_path):
    from pipeline.orchestrate import plan
    from tests.conftest import make_config

    for gpu, want in (("true", "bfloat16 on GPUs"), ("false", "float32 on CPUs")):
        (train_step,) = [s for s in plan(make_config(tiny_model, tmp_path, f"train.parallel.use_gpu={gpu}"),
                                         evaluate=False) if s.stage == "train"]
        assert want in train_step.why, train_step.why


@pytest.mark.parametrize("use_gpu, offload, want", [
    (False, False, "gloo"), (True, False, "nccl"), (True, True, "cpu:gloo,cuda:nccl")])
def test_process_group_backend_per_setting(use_gpu, offload, want):
    """CPU offload on GPUs keeps gradients and optimizer state on the CPU: its collectives need gloo beside NCCL."""
    assert process_group_backend(ParallelConfig(use_gpu=use_gpu, cpu_offload=offload)) == want


def test_attention_kernel_choice(tmp_path, monkeypatch):
    """auto: transformers' default (sdpa) on a CPU, and on a GPU without flash-attn; flash-attention 2 on a GPU
    with it, for a model that supports it. An explicit flash_attention_2 without the package is a user error."""
    model_dir = _tiny_llama(tmp_path / "model", torch.float32, tied=False)
    config = LlamaConfig.from_pretrained(model_dir)
    assert attention_implementation("auto", config, "cpu") is None
    assert empty_causal_lm(str(model_dir)).config._attn_implementation == "sdpa"
    assert empty_causal_lm(str(model_dir), attn_implementation="eager").config._attn_implementation == "eager"
    assert attention_implementation("sdpa", config, "cuda") == "sdpa"
    installed = {"flash_attn": False}
    real = importlib.util.find_spec

    def find_spec(name, *args):
        return (object() if installed[name] else None) if name in installed else real(name, *args)
    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    assert attention_implementation("auto", config, "cuda") is None
    with pytest.raises(UserError, match="flash-attn package is not installed.*set model.attn_implementation: sdpa"):
        attention_implementation("flash_attention_2", config, "cuda")
    installed["flash_attn"] = True
    assert attention_implementation("auto", config, "cuda") == "flash_attention_2"
    assert attention_implementation("auto", config, "cpu") is None
    assert attention_implementation("auto", object(), "cuda") is None  # not a transformers causal LM's config


def test_a_hub_snapshot_of_the_drivers_cache_is_fetched_again_on_a_node_without_it(tmp_path, monkeypatch):
    """The driver resolves a hub id to a snapshot in its own HF cache; a worker on a node where that path does not
    exist fetches the same commit into its own cache. Local directories and URIs are left as they are."""
    from pipeline.data import models

    commit = "a" * 40
    fetched = []

    def snapshot_download(repo, revision=None):
        fetched.append((repo, revision))
        return str(tmp_path / "node-cache" / revision)
    monkeypatch.setattr(models, "snapshot_download", snapshot_download)
    drivers = f"/driver/hf/hub/models--meta-llama--Llama-3.1-8B/snapshots/{commit}"
    assert models.on_this_node(drivers) == str(tmp_path / "node-cache" / commit)
    assert fetched == [("meta-llama/Llama-3.1-8B", commit)]
    here = tmp_path / "hub" / f"models--org--m/snapshots/{commit}"
    here.mkdir(parents=True)
    for path in (str(here), str(tmp_path), "s3://bucket/models--org--m/snapshots/" + commit, "/no/such/dir"):
        assert models.on_this_node(path) == path  # on this node already, a URI, or not a hub snapshot
    assert len(fetched) == 1

    def offline(repo, revision=None):
        raise OSError("no network")
    monkeypatch.setattr(models, "snapshot_download", offline)
    with pytest.raises(UserError, match="not on this node .* could not be fetched .*HF_TOKEN.* shared HF_HOME"):
        models.on_this_node(drivers)


def test_the_state_a_rank_writes_is_its_weights_and_adams_moments():
    """`state_bytes`, counted before the first step (the staging dir's free-space check), is what the state holds
    after it: every weight, and AdamW's two moments for the trainable ones only (a frozen part: LoRA's base)."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1))
    lm.model.embed_tokens.weight.requires_grad_(False)
    optimizer = make_optimizer([p for p in lm.parameters() if p.requires_grad], lr=1e-3)
    predicted = state_bytes(lm)
    lm(input_ids=torch.randint(0, 96, (2, 8))).logits.sum().backward()
    optimizer.step()
    moments = sum(v.numel() * v.element_size() for state in optimizer.state.values() for k, v in state.items()
                  if k in ("exp_avg", "exp_avg_sq"))
    assert moments > 0 and len(optimizer.state) == sum(p.requires_grad for p in lm.parameters())
    assert predicted == sum(p.numel() * p.element_size() for p in lm.parameters()) + moments
