"""Benchmark: one DPO training step on one GPU, no Ray: tokens/s and model FLOP utilization (MFU).

The step is the trainer's own (`pipeline.dpo.step.StepCompute` + `optimizer_step`, cached reference log-probs, FSDP2
over a one-rank process group, bf16 compute with fp32 master weights and fp32 gradient reduction), on a model built
from a config (no download): `qwen2-0.5b` (494M params, Qwen2-0.5B's shape) or `llama-1b` (1.24B, Llama-3.2-1B's
shape). Pairs have random tokens and varied lengths (prompts 64-512, responses 32-512 tokens).

MFU counts the FLOPs the step needs, over real (unpadded) tokens only:
    6 * (decoder-block params) * tokens  +  6 * layers * d_attn * sum(T_seq^2)   (causal attention, fwd+bwd)
    + 6 * (LM-head params) * scored tokens                                           (the head sees responses only)
divided by the step's wall time and the GPU's dense bf16 peak (790 TFLOP/s on an H200 as measured there, and the
matmul rate measured by this script). Variants measure each optimization before/after in the same process.

    python benchmarks/bench_gpu_step.py [--preset qwen2-0.5b] [--variants fsdp,fsdp-masked,...] [--out F.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runs from a checkout without installing the package
from pipeline.config import LossConfig  # noqa: E402
from pipeline.dpo.batching import by_length, collate, collate_packed, pair_tokens  # noqa: E402
from pipeline.dpo.metrics import StepSums  # noqa: E402
from pipeline.dpo.parallel import PolicyLogps, apply_fsdp  # noqa: E402
from pipeline.dpo.step import StepCompute, make_optimizer, micro_batches, optimizer_step  # noqa: E402

PRESETS = {
    # Qwen2-0.5B's shape (tied embeddings).
    "qwen2-0.5b": dict(arch="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       tie_word_embeddings=True),
    # Llama-3.2-1B's shape (tied embeddings).
    "llama-1b": dict(arch="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True),
    # The CPU suite's mid-size model (benchmarks/suite.py), for before/after runs on a CPU.
    "mid": dict(arch="llama", vocab_size=512, hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=8, tie_word_embeddings=False),
    # For a dry run on a CPU.
    "tiny": dict(arch="llama", vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
}

# name -> options: fsdp (FSDP2, default on), mask (pass the padding mask), micro (micro-batch multiplier),
# compile (torch.compile each decoder block), foreach (AdamW's foreach path instead of the trainer's fused one),
# keep_head (no recompute of the head's logits in backward), packed (`train.packing`).
VARIANTS = {
    "fsdp-masked": dict(mask=True),  # before: the padding mask -> masked (non-flash) attention
    "fsdp": dict(),  # the trainer's path: no mask, causal kernel
    "fsdp-micro2x": dict(micro=2),
    "fsdp-micro4x": dict(micro=4),
    "fsdp-foreach": dict(foreach=True),
    # before: gradients reduce-scattered after every micro-batch, and AdamW's default foreach path
    "fsdp-sync-each": dict(sync_each=True),
    "fsdp-compile": dict(compile=True),
    "best": dict(micro=4, compile=True),
    "fsdp-keep-head": dict(keep_head=True),  # before: the LM head's fp32 logits kept for backward
    "packed": dict(packed=True),  # padding-free rows (`train.packing: true`), the same micro-batches
    "packed-micro4x": dict(packed=True, micro=4),
    "packed-best": dict(packed=True, micro=4, compile=True),
    "plain-autocast": dict(fsdp=False),  # no FSDP: plain module under bf16 autocast, to see FSDP's cost
}


def build_model(preset: str, device, attn: str | None = None):
    """The preset's model in fp32, training mode; `attn`: its attention kernel (default: transformers')."""
    spec = dict(PRESETS[preset])
    arch = spec.pop("arch")
    cfg_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if arch == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    cfg = cfg_cls(**spec, max_position_embeddings=2048)
    torch.manual_seed(0)
    with torch.device(device):
        lm = model_cls._from_config(cfg, attn_implementation=attn) if attn else model_cls(cfg)
    return lm.float().train(), cfg


def build_pairs(n: int, vocab: int, seed: int = 0, scale: float = 1.0) -> pa.Table:
    """`scale` shrinks the lengths (prompts 64-512 and responses 32-512 tokens at 1)."""
    rng = np.random.default_rng(seed)

    def ids(lo, hi):
        lo, hi = max(1, int(lo * scale)), max(1, int(hi * scale))
        return pa.array([rng.integers(10, vocab, rng.integers(lo, hi + 1)).tolist() for _ in range(n)],
                        pa.list_(pa.int32()))

    return pa.table({"prompt_input_ids": ids(64, 512), "chosen_input_ids": ids(32, 512),
                     "rejected_input_ids": ids(32, 512), "ref_chosen_logps": rng.normal(-900, 50, n),
                     "ref_rejected_logps": rng.normal(-900, 50, n)})


def step_flops(table: pa.Table, cfg, block_params: int, head_params: int) -> float:
    p = pc.list_value_length(table.column("prompt_input_ids")).to_numpy().astype(np.float64)
    total = 0.0
    for side in ("chosen", "rejected"):
        r = pc.list_value_length(table.column(f"{side}_input_ids")).to_numpy().astype(np.float64)
        t = p + r
        d_attn = cfg.num_attention_heads * (cfg.hidden_size // cfg.num_attention_heads)
        total += 6 * block_params * t.sum() + 6 * cfg.num_hidden_layers * d_attn * (t ** 2).sum()
        total += 6 * head_params * (r.sum())  # the head scores response tokens (the first is predicted from the prompt)
    return total


def matmul_tflops(device, dtype=torch.bfloat16, n=8192, reps=10) -> float:
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def run_variant(name: str, args, device, batches: list[pa.Table], flops: list[float]) -> dict:
    v = VARIANTS[name]
    lm, cfg = build_model(args.preset, device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    policy = PolicyLogps(lm, recompute_head=not v.get("keep_head"))
    if v.get("fsdp", True):
        policy = apply_fsdp(policy, dtype, compile_blocks=bool(v.get("compile")))  # as `train.parallel.compile: true`
        if v.get("sync_each"):
            policy.set_requires_gradient_sync = lambda *a, **k: None  # keep FSDP's default: sync every backward
    cuda = device.type == "cuda"
    opt = make_optimizer(policy.parameters(), lr=1e-6, fused=not v.get("foreach"))
    compute = StepCompute(policy, None, [LossConfig()], pad_id=0, device=device, attention_mask=bool(v.get("mask")),
                          packing=bool(v.get("packed")))
    micro = args.micro_batch * v.get("micro", 1)
    autocast = (torch.autocast(device.type, dtype=dtype) if not v.get("fsdp", True) and dtype != torch.float32
                else torch.autocast(device.type, enabled=False))
    times, losses = [], []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    prof = None
    for i, table in enumerate(batches):
        if args.profile and i == args.warmup:  # the steps after the warm-up, op by op
            kinds = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
            prof = torch.profiler.profile(activities=kinds)
            prof.__enter__()
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        sums = StepSums()
        with autocast:
            compute.accumulate(table, micro, sums)
        optimizer_step(policy, opt, 1.0)
        m = sums.reduce(device)  # waits for the step
        times.append(time.perf_counter() - t0)
        losses.append(m["loss"])
        print(f"  {name} step {i}: {times[-1]:.3f} s, loss {m['loss']:.4f}, {m['tokens']:.0f} tokens", flush=True)
    if prof:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by=f"self_{'cuda' if cuda else 'cpu'}_time_total", row_limit=15))
    w = args.warmup
    step_s = statistics.median(times[w:])
    tokens = statistics.median(_tokens(t) for t in batches[w:])
    row = {"variant": name, "micro_batch_pairs": micro, "step_s": step_s,
           "tokens_per_s": tokens / step_s, "pairs_per_s": args.pairs_per_step / step_s,
           "tflops": statistics.median(f / t for f, t in zip(flops[w:], times[w:])) / 1e12,
           "first_loss": losses[0], "peak_mem_gb": torch.cuda.max_memory_allocated() / 2 ** 30 if cuda else None,
           "padding": padding_fraction(batches[w:], micro, bool(v.get("packed")))}
    del policy, opt, compute, lm
    if cuda:
        torch.cuda.empty_cache()
    return row


def padding_fraction(batches: list[pa.Table], micro: int, packed: bool) -> float:
    """The share of the step's forward positions that are padding, with the step's own micro-batches."""
    real = total = 0
    for table in batches:
        grouped = by_length(table)
        for i, n in micro_batches(grouped, micro):
            b = (collate_packed if packed else collate)(grouped.slice(i, n))
            real, total = real + b.tokens, total + b.input_ids.numel()
    return 1 - real / total


def _tokens(t: pa.Table) -> int:
    return int(pair_tokens(t).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="qwen2-0.5b", choices=sorted(PRESETS))
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--pairs-per-step", type=int, default=64)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the GPU's dense bf16 peak (H200 measured)")
    p.add_argument("--length-scale", type=float, default=1.0, help="shrink the sequence lengths (CPU runs)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (CPU runs)")
    p.add_argument("--profile", action="store_true",
                   help="print each variant's top ops over the steps after the warm-up (their times include the "
                        "profiler's overhead)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29517")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1)

    lm, cfg = build_model(args.preset, "meta")
    params = sum(x.numel() for x in lm.parameters())
    block = sum(x.numel() for x in lm.get_decoder().layers.parameters())
    head = lm.get_output_embeddings().weight.numel()
    del lm
    batches = [build_pairs(args.pairs_per_step, cfg.vocab_size, seed=i, scale=args.length_scale)
               for i in range(args.steps)]
    flops = [step_flops(t, cfg, block, head) for t in batches]
    measured_peak = matmul_tflops(device) if cuda else None
    gpu = torch.cuda.get_device_name(device) if cuda else "cpu"
    print(f"{gpu}; torch {torch.__version__}; model {args.preset}: {params / 1e6:.0f}M params "
          f"({block / 1e6:.0f}M in blocks, head {head / 1e6:.0f}M); {args.pairs_per_step} pairs/step, "
          f"~{statistics.mean(_tokens(t) for t in batches):.0f} tokens/step; bf16 matmul 8192^3: "
          f"{measured_peak or float('nan'):.0f} TFLOP/s", flush=True)

    # The first pass over new shapes pays one-time costs (kernel selection per shape): measured ~1 s/step more
    # for whichever variant ran first. One untimed pass of the trainer's path makes every variant start warm.
    if cuda:
        run_variant("fsdp", args, device, batches, flops)
    rows = []
    for name in args.variants.split(","):
        try:
            rows.append(run_variant(name, args, device, batches, flops))
        except Exception as e:  # one failing variant (e.g. compile) must not lose the others' figures
            print(f"  {name} failed: {type(e).__name__}: {str(e)[:300]}", flush=True)
            rows.append({"variant": name, "error": f"{type(e).__name__}: {str(e)[:300]}"})
    print(f"\n{'variant':<16} {'micro':>5} {'step s':>7} {'tokens/s':>9} {'TFLOP/s':>8} {'MFU':>6} "
          f"{'mem GB':>7} {'loss@1':>8} {'padding':>8}")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16} failed: {r['error'][:80]}")
            continue
        r["mfu"] = r["tflops"] / args.peak_tflops
        r["mfu_vs_measured_matmul"] = r["tflops"] / measured_peak if measured_peak else None
        print(f"{r['variant']:<16} {r['micro_batch_pairs']:>5} {r['step_s']:>7.3f} {r['tokens_per_s']:>9.0f} "
              f"{r['tflops']:>8.1f} {r['mfu']:>6.1%} {r['peak_mem_gb'] or 0:>7.1f} {r['first_loss']:>8.4f} "
              f"{r['padding']:>8.1%}")
    if args.out:
        Path(args.out).write_text(json.dumps({"gpu": gpu, "torch": torch.__version__, "preset": args.preset,
                                              "params": params, "block_params": block, "head_params": head,
                                              "matmul_tflops": measured_peak, "args": vars(args),
                                              "results": rows}, indent=2) + "\n")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
