"""What only a GPU can show, in one run of a few minutes on one H100/H200 with that machine's own torch and
transformers (no Ray, no vLLM; one GPU, so one rank). Each check prints one line and goes into the JSON report:

1. bf16 by default: the compute dtype `train.parallel.use_gpu: true` gets (`compute_dtype`), the dtype the
   gathered parameters compute in, and TF32 for fp32 matmuls (`set_device_math`).
2. packed equals padded: one micro-batch's loss and gradient with `train.packing` on and off (flash-attention 2
   when installed, `model.attn_implementation: auto`; its varlen kernel for the packed rows), and each one's time.
3. the memory plan (`pipeline.dpo.memory`) against `torch.cuda.max_memory_allocated` over training steps, with
   activation checkpointing off and on.
4. an async training-state save: how long the loop is blocked (`async_save_sharded_state` returning) against the
   whole save.
5. MFU of the training step at ~1B with the best settings measured so far (benchmarks/bench_gpu_step.py `best`).

    python benchmarks/gpu_check.py [--preset llama-1b] [--out gpu_check.json]
    python benchmarks/gpu_check.py --preset tiny --device cpu --steps 2   # a dry run on a CPU
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing the package
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu_step import PRESETS, build_model, build_pairs, matmul_tflops, run_variant, step_flops  # noqa: E402

from pipeline.config import LossConfig, load_config  # noqa: E402
from pipeline.config.schema import ParallelConfig  # noqa: E402
from pipeline.data.modeling import attention_implementation  # noqa: E402
from pipeline.dpo.memory import shape_of_model, training_memory  # noqa: E402
from pipeline.dpo.metrics import StepSums  # noqa: E402
from pipeline.dpo.parallel import (  # noqa: E402
    PolicyLogps,
    apply_fsdp,
    async_save_sharded_state,
    compute_dtype,
    decoder_blocks,
    full_tensor,
    set_device_math,
)
from pipeline.dpo.step import StepCompute, make_optimizer, optimizer_step  # noqa: E402

build = build_model  # (preset, device, attn) -> (fp32 model in training mode, its config)


def check_dtype(device) -> dict:
    set_device_math(device, 1)
    dtype = compute_dtype(ParallelConfig(use_gpu=True))
    return {"compute_dtype": str(dtype), "float32_matmul_precision": torch.get_float32_matmul_precision()}


def check_packing(args, device) -> dict:
    attn = attention_implementation("auto", build(args.preset, "meta", None)[1], device)
    table = build_pairs(8, PRESETS[args.preset]["vocab_size"], seed=1, scale=args.scale)
    out = {"attn_implementation": attn or "default (sdpa)"}
    grads = {}
    for packed in (False, True):
        lm, _ = build(args.preset, device, attn)
        policy = apply_fsdp(PolicyLogps(lm), torch.bfloat16 if device.type == "cuda" else torch.float32)
        compute = StepCompute(policy, None, [LossConfig()], pad_id=0, device=device, packing=packed)
        sums = StepSums()
        sync(device)
        t0 = time.perf_counter()
        compute.accumulate(table, 8, sums)
        m = sums.reduce(device)
        sync(device)
        out[f"{'packed' if packed else 'padded'}_s"] = time.perf_counter() - t0
        out[f"{'packed' if packed else 'padded'}_loss"] = m["loss"]
        grads[packed] = torch.cat([full_tensor(p.grad).flatten().float() for p in policy.parameters()])
        del policy, compute, lm
    out["loss_diff"] = abs(out["packed_loss"] - out["padded_loss"])
    out["grad_rel_diff"] = float((grads[True] - grads[False]).norm() / grads[False].norm())
    return out


def check_memory(args, device) -> dict:
    out = {}
    max_length = int(1024 * args.scale)
    for ac in (False, True):
        lm, cfg = build(args.preset, device, None)
        shape = shape_of_model(lm)
        train = load_config(None, ["model.path=/m", "data.train.path=/d.jsonl", f"data.max_length={max_length}",
                                   "data.max_prompt_length=8", f"train.parallel.use_gpu={device.type == 'cuda'}",
                                   "train.micro_batch_pairs=2", "train.global_batch_pairs=2",
                                   f"train.parallel.activation_checkpointing={ac}"]).train
        plan = training_memory(shape, train, max_length)
        del lm
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        lm, _ = build(args.preset, device, None)
        policy = apply_fsdp(PolicyLogps(lm), compute_dtype(train.parallel), activation_checkpointing=ac)
        opt = make_optimizer(policy.parameters(), 1e-6)
        compute = StepCompute(policy, None, train.losses, pad_id=0, device=device)
        half = max_length // 2
        ids = lambda k, n: pa.array([[k] * n] * 2, pa.list_(pa.int32()))  # noqa: E731
        table = pa.table({"prompt_input_ids": ids(5, half), "chosen_input_ids": ids(6, max_length - half),
                          "rejected_input_ids": ids(7, max_length - half), "ref_chosen_logps": [-900.0] * 2,
                          "ref_rejected_logps": [-900.0] * 2})  # both sequences at max_length: the plan's case
        for _ in range(args.steps):
            compute.accumulate(table, 2, StepSums())
            optimizer_step(policy, opt, 1.0)
        measured = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
        out[f"ac_{'on' if ac else 'off'}"] = {"planned_gb": plan.total / 1e9, "terms_gb": {
            t.name: t.bytes / 1e9 for t in plan.terms}, "measured_gb": measured / 1e9 if measured else None}
        del policy, opt, compute, lm
    return out


def check_async_save(args, device) -> dict:
    lm, _ = build(args.preset, device, None)
    policy = apply_fsdp(PolicyLogps(lm), torch.float32)
    opt = make_optimizer(policy.parameters(), 1e-6)
    compute = StepCompute(policy, None, [LossConfig()], pad_id=0, device=device)
    compute.accumulate(build_pairs(2, PRESETS[args.preset]["vocab_size"], scale=args.scale), 2, StepSums())
    optimizer_step(policy, opt, 1.0)  # the optimizer's state exists
    group = dist.new_group(backend="gloo")
    with tempfile.TemporaryDirectory() as tmp:
        sync(device)
        t0 = time.perf_counter()
        future = async_save_sharded_state(Path(tmp) / "state", policy, opt, group)
        blocked = time.perf_counter() - t0
        future.result()
        total = time.perf_counter() - t0
        size = sum(f.stat().st_size for f in Path(tmp).rglob("*") if f.is_file())
    return {"blocked_s": blocked, "whole_save_s": total, "state_gb": size / 1e9}


def check_mfu(args, device) -> dict:
    if device.type != "cuda":
        return {"skipped": "MFU needs a GPU"}
    ns = argparse.Namespace(preset=args.preset, dtype="bf16", micro_batch=8, pairs_per_step=64, warmup=2,
                            profile=False)
    lm, cfg = build(args.preset, "meta", None)
    blocks = decoder_blocks(lm)
    block_params = sum(p.numel() for b in blocks for p in b.parameters())
    head_params = lm.get_output_embeddings().weight.numel()
    batches = [build_pairs(64, cfg.vocab_size, seed=10 + i) for i in range(2 + args.steps)]
    flops = [step_flops(t, cfg, block_params, head_params) for t in batches]
    row = run_variant("best", ns, device, batches, flops)
    peak = matmul_tflops(device)
    return {**row, "matmul_tflops": peak, "mfu": row["tflops"] / peak}


def sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="llama-1b", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--scale", type=float, default=1.0, help="sequence lengths (1: prompts 64-512, max_length 1024)")
    ap.add_argument("--out")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(0)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)
    report = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu", "preset": args.preset,
              "torch": torch.__version__}
    try:
        for name, check in (("dtype", check_dtype), ("packing", check_packing), ("memory", check_memory),
                            ("async_save", check_async_save), ("mfu", check_mfu)):
            t0 = time.perf_counter()
            report[name] = check(args, device) if name != "dtype" else check(device)
            print(f"{name} ({time.perf_counter() - t0:.0f} s): {json.dumps(report[name], default=str)}", flush=True)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=1, default=str))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
