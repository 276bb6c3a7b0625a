"""Training at scale, measured on this machine: host memory of 2 FSDP2 ranks while loading models of ~0.1B, ~0.5B
and ~1B parameters, and the cost of a checkpoint, before and after the meta-device load / streamed export / async
state save. Pure torch (2 gloo processes, no Ray): the figures are the library's, not the scheduler's.

    python benchmarks/scale_train.py [--sizes 0.1 0.5 1] [--json out.json]

before: every rank loads the whole model in fp32 (transformers), then shards it; a checkpoint gathers the full
        fp32 state dict on rank 0 and writes it (huggingface_hub), then saves the training state (dcp.save).
after:  every rank builds the model on the meta device, shards it and reads only its slices (DCP's Hugging Face
        reader); a checkpoint gathers one ≤ 2 GB group at a time, cast to the export dtype (bf16), and the training
        state is saved in the background (dcp.async_save): the loop waits only for the copy to host memory.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from huggingface_hub import save_torch_state_dict
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.data.modeling import empty_causal_lm, load_hf_model
from pipeline.dpo import parallel
from pipeline.dpo.step import make_optimizer
from pipeline.store.checkpoints import SHARD_BYTES, export_hf

# name -> (hidden, intermediate, layers, heads); vocab 32000, untied head.
SIZES = {"0.1": (768, 2048, 12, 12), "0.5": (1536, 4096, 16, 12), "1": (2048, 5632, 16, 16)}


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


class AnonPeak:
    """Peak anonymous resident memory (RssAnon: what the process allocated, not file pages it mapped), sampled
    every 5 ms by a thread."""

    def __init__(self):
        self.peak = 0.0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self.stop.wait(0.005):
            self.peak = max(self.peak, _status_mb("RssAnon"))

    def reset(self) -> float:
        self.peak = now = _status_mb("RssAnon")
        return now


def phase_start() -> float:
    """Reset this process's peak resident memory (Linux: clear_refs 5) and return the current one."""
    Path("/proc/self/clear_refs").write_text("5")
    return _status_mb("VmRSS")


def phase_peak(start: float) -> float:
    """Peak resident memory since `phase_start`, above what was resident then (MB)."""
    return _status_mb("VmHWM") - start


def build(size: str, out: Path) -> int:
    """A random Llama of the given size saved in bf16 (as hub models are); returns its parameter count."""
    hidden, inter, layers, heads = SIZES[size]
    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, tie_word_embeddings=False)
    with torch.device("meta"):
        n = sum(p.numel() for p in LlamaForCausalLM(config).parameters())
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    del model
    return n


def _checkpoint(rank: int, mode: str, policy, optimizer, work: str) -> dict:
    """One checkpoint: the Hugging Face export, then the training state; times and memory above the state."""

    class Tok:
        def save_pretrained(self, d):
            Path(d, "tokenizer_config.json").write_text("{}")

    out = Path(work, f"export-{mode}")
    mark = phase_start()
    t0 = time.perf_counter()
    if mode == "before":
        full = get_model_state_dict(policy, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if rank == 0:
            out.mkdir()
            policy.lm.config.save_pretrained(out)
            save_torch_state_dict({k.removeprefix("lm."): v for k, v in full.items()}, out)
        del full
    else:
        groups = parallel.hf_weight_groups(policy, torch.bfloat16, SHARD_BYTES)
        if rank == 0:
            export_hf(groups, policy.lm, Tok(), torch.bfloat16, out)
        else:
            for _ in groups[1]:
                pass
    dist.barrier()
    export_s, export_peak = time.perf_counter() - t0, phase_peak(mark)
    mark = phase_start()
    t0 = time.perf_counter()
    if mode == "before":
        parallel.save_sharded_state(Path(work, f"state-{mode}"), policy, optimizer)
        state_blocked = time.perf_counter() - t0
        state_total = state_blocked
    else:
        group = dist.new_group(backend="gloo")
        future = parallel.async_save_sharded_state(Path(work, f"state-{mode}"), policy, optimizer, group)
        state_blocked = time.perf_counter() - t0
        future.result()
        state_total = time.perf_counter() - t0
    dist.barrier()
    save_peak = phase_peak(mark)
    export_bytes = sum(f.stat().st_size for f in out.glob("*.safetensors")) if rank == 0 else 0
    return {"export_peak_mb": export_peak, "save_peak_mb": save_peak, "export_s": export_s,
            "export_bytes": export_bytes, "state_blocked_s": state_blocked, "state_total_s": state_total}


def rank_main(rank: int, world: int, mode: str, model_dir: str, work: str, result: str, checkpoint: bool) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)

    dist.init_process_group("gloo", init_method=f"file://{work}/pg", rank=rank, world_size=world)
    anon = AnonPeak()
    base, anon_base = phase_start(), anon.reset()
    t0 = time.perf_counter()
    if mode == "before":
        policy = parallel.shard_model(parallel.PolicyLogps(load_hf_model(model_dir, "float32")))
    else:
        policy = parallel.shard_model(parallel.PolicyLogps(empty_causal_lm(model_dir, "float32")))
        parallel.materialize(policy, "cpu")
        parallel.load_hf_weights(policy, model_dir)
    dist.barrier()
    load_s, load_peak, load_anon = time.perf_counter() - t0, phase_peak(base), anon.peak - anon_base
    optimizer = make_optimizer(policy.parameters(), 1e-5, 0.0)
    for p in policy.parameters():  # the sharded training state: grads and Adam moments allocated
        p.grad = torch.zeros_like(p)
    optimizer.step()
    dist.barrier()
    state_mb = _status_mb("VmRSS") - base  # the sharded training state, resident

    figures = {"load_peak_mb": load_peak, "load_anon_mb": load_anon, "state_mb": state_mb, "load_s": load_s}
    if checkpoint:
        figures.update(_checkpoint(rank, mode, policy, optimizer, work))
    Path(result, f"{rank}.json").write_text(json.dumps(figures))
    dist.destroy_process_group()


def measure(sizes=("0.1", "0.5", "1"), world: int = 2, checkpoint_sizes=("0.1", "0.5")) -> list[dict]:
    """Per size and mode: load + training state on `world` ranks; a checkpoint too for `checkpoint_sizes` (at 1B the
    background save's host copy of the state would not fit beside it in this machine's 24 GB)."""
    rows = []
    for size in sizes:
        root = Path(tempfile.mkdtemp(prefix=f"scale-train-{size}-"))
        try:
            n = build(size, root / "model")
            for mode in ("before", "after"):
                work, result = root / f"work-{mode}", root / f"result-{mode}"
                work.mkdir()
                result.mkdir()
                mp.spawn(rank_main, args=(world, mode, str(root / "model"), str(work), str(result),
                                                 size in checkpoint_sizes), nprocs=world)
                ranks = [json.loads((result / f"{r}.json").read_text()) for r in range(world)]
                row = {"size": size, "params_m": n / 1e6, "mode": mode, "weights_fp32_mb": 4 * n / 2**20,
                       "state_sharded_mb": 16 * n / 2**20,  # fp32 params + grads + 2 Adam moments, all ranks
                       "load_peak_mb": sum(r["load_peak_mb"] for r in ranks),
                       "load_anon_mb": sum(r["load_anon_mb"] for r in ranks),
                       "state_mb": sum(r["state_mb"] for r in ranks), "load_s": max(r["load_s"] for r in ranks)}
                if size in checkpoint_sizes:  # peaks above the resident state, of the worst rank
                    row.update({k: max(r[k] for r in ranks) for k in ("export_peak_mb", "save_peak_mb", "export_s",
                                                                      "state_blocked_s", "state_total_s")})
                    row["export_mb"] = ranks[0]["export_bytes"] / 2**20
                rows.append(row)
                shutil.rmtree(work)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    return rows


def print_table(rows: list[dict]) -> None:
    """Memory: MB above what the 2 processes held before loading, summed over both ranks; export/save peaks are the
    worst rank's, above its resident training state."""
    print(f"{'size':>5} {'params':>7} {'mode':>6} | {'load peak':>9} {'/fp32':>5} {'anon':>5} | {'state':>7} | "
          f"{'load s':>6} | {'export':>7} {'s':>5} {'+peak':>7} | {'state blocked':>13} {'written':>7} {'+peak':>7}")
    for r in rows:
        line = (f"{r['size']:>5} {r['params_m']:>6.0f}M {r['mode']:>6} | {r['load_peak_mb']:>7.0f}MB "
                f"{r['load_peak_mb'] / r['weights_fp32_mb']:>5.2f} {r['load_anon_mb'] / r['weights_fp32_mb']:>5.2f} | "
                f"{r['state_mb']:>5.0f}MB | {r['load_s']:>6.1f} | ")
        if "export_mb" in r:
            line += (f"{r['export_mb']:>5.0f}MB {r['export_s']:>5.1f} {r['export_peak_mb']:>5.0f}MB | "
                     f"{r['state_blocked_s']:>12.2f}s {r['state_total_s']:>6.2f}s {r['save_peak_mb']:>5.0f}MB")
        print(line)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["0.1", "0.5", "1"], choices=list(SIZES))
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = measure(args.sizes)
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
