"""The training memory plan (pipeline/dpo/memory.py) against measurement on this machine: for three Llama-shaped
models x {1, 2} workers x activation checkpointing off/on, each worker builds the policy as a training worker does
(meta skeleton, FSDP2, its slices of the weights), then runs 2 optimizer steps of one micro-batch of full-length
pairs; its peak resident memory during the steps (sampled every 2 ms) above what it held before the model (imports,
process group) is compared with the plan's total for the same settings (CPU workers: fp32 compute); the loading
peak (reading the checkpoint) is reported beside it. Pure torch, gloo ranks, no Ray.

    python benchmarks/memory_plan.py [--max-length 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import load_config
from pipeline.data.modeling import empty_causal_lm
from pipeline.dpo.memory import model_shape, training_memory
from pipeline.dpo.metrics import StepSums
from pipeline.dpo.parallel import PolicyLogps, apply_fsdp, load_hf_weights, materialize
from pipeline.dpo.step import StepCompute, make_optimizer, optimizer_step

# name -> (hidden, intermediate, layers, heads); vocab 32000, untied head.
SIZES = {"25M": (256, 704, 4, 4), "70M": (512, 1408, 6, 8), "170M": (768, 2048, 12, 12)}


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pairs(n: int, max_length: int, seed: int) -> pa.Table:
    """n pairs whose prompt + each response fill max_length tokens (the plan's padded worst case)."""
    rng = np.random.default_rng(seed)
    half = max_length // 2
    ids = lambda k: [rng.integers(3, 32000, k).tolist() for _ in range(n)]  # noqa: E731
    return pa.table({"prompt_input_ids": pa.array(ids(half), pa.list_(pa.int32())),
                     "chosen_input_ids": pa.array(ids(max_length - half), pa.list_(pa.int32())),
                     "rejected_input_ids": pa.array(ids(max_length - half), pa.list_(pa.int32())),
                     "ref_chosen_logps": rng.normal(-40, 5, n), "ref_rejected_logps": rng.normal(-40, 5, n)})


def worker(rank: int, world: int, model_dir: str, ac: bool, max_length: int, init: str, out: str) -> None:
    torch.set_num_threads(max(1, 2 // world))
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        base = rss_mb()
        policy = apply_fsdp(PolicyLogps(empty_causal_lm(model_dir)), torch.float32, activation_checkpointing=ac)
        materialize(policy, "cpu")
        load_hf_weights(policy, model_dir)
        load_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB -> MB
        cfg = load_config(None, ["model.path=/m", "data.train.path=/d.jsonl"])
        opt = make_optimizer(policy.parameters(), 1e-5)
        compute = StepCompute(policy, None, cfg.train.losses, pad_id=0, device="cpu")
        peak, stop = [rss_mb()], threading.Event()

        def sample() -> None:  # the training steps' peak (the load's, above, reads the checkpoint's pages)
            while not stop.wait(0.002):
                peak[0] = max(peak[0], rss_mb())
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        for step in range(2):
            compute.accumulate(pairs(1, max_length, 10 * step + rank), 1, StepSums())
            optimizer_step(policy, opt, 1.0)
        stop.set()
        sampler.join()
        Path(f"{out}.{rank}").write_text(json.dumps({"base_mb": base, "peak_mb": peak[0], "load_peak_mb": load_peak}))
    finally:
        dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--max-length", type=int, default=512)
    ap.add_argument("--sizes", nargs="+", default=list(SIZES))
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            hidden, inter, layers, heads = SIZES[size]
            model_dir = Path(tmp) / size
            torch.manual_seed(0)
            config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                                 num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                                 tie_word_embeddings=False)
            LlamaForCausalLM(config).save_pretrained(model_dir)
            shape = model_shape(str(model_dir))
            for world in (1, 2):
                for ac in (False, True):
                    cfg = load_config(None, ["model.path=/m", "data.train.path=/d.jsonl",
                                             f"data.max_length={args.max_length}", "data.max_prompt_length=8",
                                             f"train.parallel.num_workers={world}", "train.micro_batch_pairs=1",
                                             f"train.global_batch_pairs={world}",
                                             f"train.parallel.activation_checkpointing={str(ac).lower()}"])
                    plan = training_memory(shape, cfg.train, args.max_length)
                    out = Path(tmp) / f"m-{size}-{world}-{ac}"
                    mp.spawn(worker, args=(world, str(model_dir), ac, args.max_length,
                                           f"file://{tmp}/pg-{size}-{world}-{ac}", str(out)), nprocs=world)
                    got = [json.loads(Path(f"{out}.{r}").read_text()) for r in range(world)]
                    measured = max(g["peak_mb"] - g["base_mb"] for g in got)
                    loading = max(g["load_peak_mb"] - g["base_mb"] for g in got)
                    row = {"model": size, "params_m": round(shape.params / 1e6, 1), "workers": world,
                           "activation_checkpointing": ac, "planned_mb": round(plan.total / 2**20),
                           "measured_mb": round(measured), "ratio": round(measured / (plan.total / 2**20), 2),
                           "loading_peak_mb": round(loading),
                           "terms_mb": {t.name: round(t.bytes / 2**20) for t in plan.terms}}
                    rows.append(row)
                    print(f"{size:>5} {row['params_m']:>6}M W={world} AC={'on ' if ac else 'off'} "
                          f"planned {row['planned_mb']:>6} MB measured {row['measured_mb']:>6} MB "
                          f"(measured/planned {row['ratio']}; loading peak {row['loading_peak_mb']} MB)", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"max_length": args.max_length, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
