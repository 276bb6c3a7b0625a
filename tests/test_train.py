"""Integration tier: DPO training on Ray Train + FSDP2 (gloo, CPU, fp32) from the stage-1 cache."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import ray
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.caches import layout as cache_layout
from pipeline.caches.layout import CacheSpec
from pipeline.data import lanes
from pipeline.engines.actors import ReferenceEngine
from pipeline.errors import UserError
from pipeline.store.checkpoints import recorded_hash
from pipeline.store.fingerprint import model_files_hash
from pipeline.store.storage import Store
from stages import train
from tests.conftest import DATA, TRAIN_STEPS, copy_cache, make_config

pytestmark = pytest.mark.ray


def params(ckpt: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def metrics(run_dir: str) -> list[dict]:
    """The run's metrics.jsonl rows (run_dir: a local path or a URI)."""
    return [json.loads(line) for line in Store(run_dir).read_bytes("metrics.jsonl").decode().splitlines()]


def assert_same_params(a: Path, b: Path, atol: float) -> None:
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys() and pa
    worst = max((pa[k] - pb[k]).abs().max().item() for k in pa)
    assert worst <= atol, f"max parameter difference {worst}"


@pytest.fixture(scope="module")
def base(tiny_model, tmp_path_factory, standard_cache):
    """The session's cache (hf engine) of standard.jsonl (+ conversational eval), and a config factory over it."""
    root = tmp_path_factory.mktemp("train")
    copy_cache(standard_cache, root)

    def config(name: str, *overrides: str):
        return make_config(tiny_model, root, "scoring.engine=hf", f"data.eval.path={DATA / 'conversational.jsonl'}",
                           *TRAIN_STEPS, f"run_dir={root / name}", *overrides)
    return config


def test_training_reads_only_the_columns_a_step_uses(base):
    ref = cache_layout.find_cache(CacheSpec.of(base("columns")), "train")
    full = pq.read_schema(ref.files[0]).names
    assert "ref_chosen_token_logps" in full  # the cache has the per-token lists...
    got = lanes.read_train_columns(ref.files[0], lanes.train_columns(base("columns").train))
    assert got.column_names == list(lanes.TRAIN_COLUMNS)  # ...training reads only these
    assert set(lanes.TRAIN_COLUMNS) < set(full)
    # LD-DPO reads the per-token reference log-probs too (cached reference only)
    assert lanes.train_columns(base("ld", "train.loss.ld_alpha=0.5").train)[-2:] == lanes.TOKEN_LOGP_COLUMNS
    assert lanes.train_columns(base("ld", "train.loss.ld_alpha=0.5", "train.ref_logps=in_loop").train) == \
        lanes.TRAIN_COLUMNS
    assert lanes.train_columns(base("free", "train.loss.type=simpo").train) == lanes.PAIR_COLUMNS  # no reference


@pytest.fixture(scope="module")
def one_worker(straight_run):
    """The session's straight run (conftest.py): 4 steps, 1 worker, from this module's cache settings."""
    return straight_run


def test_step0_loss_is_ln2_and_metrics_are_logged(one_worker):
    cfg, result = one_worker
    rows = metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    # Step 1's metrics are computed before its update: policy == reference.
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-4
    assert abs(rows[0]["rewards/margins"]) < 1e-4
    # It learns: held-out loss falls below ln 2 and keeps falling (each step sees other pairs: train loss is noisy).
    assert rows[3]["eval/loss"] < rows[1]["eval/loss"] < math.log(2)
    for key in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
                "grad_norm", "lr", "tokens_per_s", "pairs_per_s", "peak_rss_mb"):
        assert all(math.isfinite(r[key]) for r in rows), key
    assert "eval/loss" in rows[1] and "eval/rewards/accuracies" in rows[3]
    assert any(Path(cfg.run_dir, "tensorboard").iterdir())
    assert [Path(c).name for c in result.checkpoints] == ["step_000002", "step_000004"]


def test_checkpoints_load_in_transformers_and_match_training_state(one_worker, tiny_model):
    cfg, result = one_worker
    ckpt = Path(result.checkpoints[-1])
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(ckpt)
    assert tok.chat_template and len(tok) == model.config.vocab_size
    start = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), start.parameters()))
    assert moved > 1e-4  # the checkpoint holds trained weights, not the initial ones
    assert not list(ckpt.parent.glob(".tmp-*"))  # no half-written export left behind
    # The training state was staged in train.checkpoint.staging_dir, and each copy deleted once uploaded.
    staging = Path(cfg.train.checkpoint.staging_dir)
    assert staging.is_dir() and not list(staging.iterdir())


@pytest.fixture(scope="module")
def in_loop(base):
    """2 steps with the in-loop reference, activation checkpointing, bf16 exports and the training state saved in
    the foreground."""
    cfg = base("in_loop", "train.ref_logps=in_loop", "train.max_steps=2",
               "train.parallel.activation_checkpointing=true", "train.checkpoint.dtype=bfloat16",
               "train.checkpoint.async_save=false")
    return cfg, train.run(cfg)


def test_exports_are_in_the_asked_dtype_with_their_content_hash(in_loop, one_worker):
    bf16, fp32 = Path(in_loop[1].checkpoints[-1]), Path(one_worker[1].checkpoints[-1])
    assert {t.dtype for t in params(bf16).values()} == {torch.bfloat16}
    assert json.loads((bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    assert {t.dtype for t in params(fp32).values()} == {torch.float32}  # auto: the tiny model's own dtype
    assert sum(f.stat().st_size for f in bf16.glob("*.safetensors")) < \
        0.6 * sum(f.stat().st_size for f in fp32.glob("*.safetensors"))
    for ckpt in (bf16, fp32):  # recorded as written, equal to hashing the files afterwards
        assert recorded_hash(ckpt) == model_files_hash(ckpt)


@pytest.mark.vllm
def test_bf16_checkpoint_loads_in_vllm(in_loop):
    ckpt = in_loop[1].checkpoints[-1]
    seq = np.array([1, 40, 41, 42, 43, 44, 45, 46, 2])
    # In a Ray actor, as the stages run it: an engine in the test process leaves vLLM threads that can abort
    # the interpreter at exit.
    scorer = ray.remote(ReferenceEngine).remote("vllm", {"model_dir": ckpt, "dtype": "float32", "max_length": 64,
                                                         "engine_kwargs": {"enforce_eager": True}})
    try:
        got = ray.get(scorer.token_logps.remote([seq], [3]))[0]
    finally:
        ray.kill(scorer)
    model = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([seq])).logits[0], -1)
    want = logp[2:-1].gather(-1, torch.tensor(seq[3:])[:, None])[:, 0].numpy()
    np.testing.assert_allclose(got, want, atol=1e-4)


def test_two_workers_equal_one_worker(base, one_worker):
    # 1 CPU left for Ray Data
    cfg = base("w2", "train.parallel.num_workers=2", "train.parallel.num_cpus_per_worker=0.5")
    result = train.run(cfg)
    assert_same_params(Path(result.checkpoints[-1]), Path(one_worker[1].checkpoints[-1]), atol=1e-5)
    for a, b in zip(metrics(cfg.run_dir), metrics(one_worker[0].run_dir)):
        assert abs(a["loss"] - b["loss"]) < 1e-5


def test_cached_and_in_loop_reference_give_the_same_losses(in_loop, one_worker):
    # Activation checkpointing on as well: recomputing blocks in backward must not change the numbers.
    cfg, _ = in_loop
    for a, b in zip(metrics(cfg.run_dir), metrics(one_worker[0].run_dir)[:2]):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4


def test_mismatched_cache_is_refused(base):
    eval_cache = cache_layout.find_cache(CacheSpec.of(base("x")), "eval")
    with pytest.raises(UserError, match="was built for a different data"):
        cache_layout.find_cache(CacheSpec.of(base("x", f"train.cache_path={eval_cache.uri}")), "train")
    with pytest.raises(UserError, match="no complete reference cache"):
        cache_layout.find_cache(CacheSpec.of(base("x", "data.max_length=100")), "train")


def test_three_new_losses_train_as_one_weighted_combination(base, s3_ray, tmp_path, monkeypatch):
    """3 steps (then a fourth, resumed) of BCO (its running mean checkpointed and restored), f-DPO
    (Jensen–Shannon) on LD-DPO log-probs (the cache's per-token reference log-probs) and ORPO with WPO weights, with
    run_dir on S3 (a local moto server) and every upload of the training state slowed by 3 s: step 3 runs while
    step 2's state uploads (the loop waits for the save, not the upload), and the rerun resumes from the uploaded
    state."""
    loss = ("train.loss=[{type: bco_pair, weight: 0.5}, {type: f_divergence, divergence: js_divergence, "
            "ld_alpha: 0.5}, {type: orpo, weight: 0.2, wpo: true}]")
    uploads = tmp_path / "uploads"
    monkeypatch.setenv("DPO_PIPELINE_FAULT", f"point=state_upload,token={uploads},action=sleep:3")
    cfg = base("combo", loss, "train.max_steps=3", f"run_dir={s3_ray}/combo")
    result = train.run(cfg)
    rows = metrics(cfg.run_dir)
    first = rows[0]
    # Step 1, policy == reference: BCO is 2 ln 2 (δ = 0), f-DPO ln 2; the total is the weighted sum.
    assert first["loss/bco_pair"] == pytest.approx(2 * math.log(2), abs=1e-4)
    assert first["loss/f_divergence"] == pytest.approx(math.log(2), abs=1e-4)
    assert first["loss"] == pytest.approx(0.5 * first["loss/bco_pair"] + first["loss/f_divergence"]
                                          + 0.2 * first["loss/orpo"], abs=1e-5)
    assert abs(first["bco/batch_reward"]) < 1e-4 and 0 < first["wpo/weight"] and math.isfinite(first["orpo/log_odds"])
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    # The running mean is the mean of the steps' batch rewards, and is saved with the training state.
    assert rows[1]["bco/reward_mean"] == pytest.approx((rows[0]["bco/batch_reward"] + rows[1]["bco/batch_reward"]) / 2)
    state = Store(cfg.run_dir).read_json("ray/checkpoint_000002/trainer_state.json")
    assert state["loss_state"] == {"bco_mean": pytest.approx(rows[1]["bco/reward_mean"]), "bco_steps": 2}
    assert [c.rsplit("/", 1)[-1] for c in result.checkpoints] == ["step_000002", "step_000003"]
    # Both states were uploaded, each slowed by 3 s, and no step waited for that: what the loop waited for
    # checkpoints by step 3 (step 2's save, its report) is less than one upload (with async_save off: 3.5 s).
    assert [float(b) - float(a) >= 3 for a, b in (line.split() for line in uploads.read_text().splitlines())] == \
        [True, True]
    assert rows[2]["checkpoint/waited_s"] < 3
    # One more step, resumed from the uploaded state: δ continues from the restored mean (not from 0).
    train.run(base("combo", loss, "train.max_steps=4", f"run_dir={s3_ray}/combo"))
    rows = metrics(cfg.run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[3]["bco/reward_mean"] == pytest.approx(sum(r["bco/batch_reward"] for r in rows) / 4, abs=1e-9)
