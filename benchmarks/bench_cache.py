"""Benchmark of stage 1: reference-scoring throughput of the cache stage, `vllm` vs `hf` engine.

Same model, data and settings for both engines, run one after the other in one process. Prints a table beside
the machine's measured fp32 matmul FLOP/s, so efficiency = tokens/s x 2 x params / matmul FLOP/s can be read,
and writes the figures to docs/bench_cache.json.

    python benchmarks/bench_cache.py [--pairs 512] [--layers 6] [--hidden 512]

Tokens counted are the tokens the engine runs the model over: prompt + response, for chosen and for rejected.
"stage" time is the whole `dpo-pipeline cache` run (planning, Ray, engine start, tokenization, writing);
"scoring" time runs from the first scored batch reaching the driver to the last one, i.e. without start-up.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from pipeline.config import load_config
from pipeline.demo import tiny
from stages import cache

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def matmul_flops(n: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    t = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - t)


def build_model(out: Path, hidden: int, layers: int) -> int:
    """The tiny tokenizer with a larger Llama built from a config (head_dim 64). Returns the parameter count."""
    tok = tiny.build_tokenizer(out)
    spec = tiny.TinyModelSpec(hidden_size=hidden, intermediate_size=3 * hidden, num_layers=layers,
                         num_heads=hidden // 64, num_kv_heads=hidden // 64, max_position_embeddings=2048,
                         initializer_range=0.02)
    model = tiny.build_model(out, len(tok), spec, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return sum(p.numel() for p in model.parameters())


def build_data(path: Path, pairs: int, seed: int = 0) -> None:
    """Prompts of 8-96 words and responses of 8-160 words (~1.3 tokens a word with the tiny tokenizer)."""
    rng = random.Random(seed)

    def text(lo: int, hi: int) -> str:
        return " ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(lo, hi))) + "."

    with open(path, "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": text(8, 96), "chosen": text(8, 160), "rejected": text(8, 160)}) + "\n")


class Clock:
    """A progress 'bar' that records when batches reach the driver."""

    def __init__(self, total: int, desc: str):
        self.stamps: list[tuple[float, int]] = []

    def update(self, n: int) -> None:
        self.stamps.append((time.perf_counter(), n))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_engine(engine: str, model_dir: Path, data: Path, work: Path, args) -> dict:
    cfg = load_config(None, [
        f"model.path={model_dir}", f"data.train.path={data}", "data.max_length=512", "data.max_prompt_length=192",
        f"cache_dir={work / engine / 'cache'}", f"run_dir={work / engine / 'run'}", f"scoring.engine={engine}",
        f"scoring.batch_size={args.batch_size}", f"scoring.shard_size={args.shard_size}",
        f"scoring.num_cpus_per_actor={args.actor_cpus}", f"ray.num_cpus={args.ray_cpus}",
        "scoring.cpu_kv_cache_gb=2"])
    clocks: list[Clock] = []

    def factory(total, desc):
        clocks.append(Clock(total, desc))
        return clocks[-1]

    t0 = time.perf_counter()
    (result,) = cache.run(cfg, progress_factory=factory)
    stage_s = time.perf_counter() - t0
    table = pq.read_table(f"{result.uri}/data")
    prompt = pc.sum(pc.list_value_length(table.column("prompt_input_ids"))).as_py()
    resp = sum(pc.sum(pc.list_value_length(table.column(c))).as_py() for c in ("chosen_input_ids",
                                                                             "rejected_input_ids"))
    tokens = 2 * prompt + resp
    stamps = clocks[0].stamps
    rows_after_first = sum(n for _, n in stamps[1:])
    scoring_s = stamps[-1][0] - stamps[0][0]
    tokens_per_row = tokens / table.num_rows
    return {"engine": engine, "pairs": table.num_rows, "tokens": tokens, "stage_s": stage_s,
            "data_uri": f"{result.uri}/data",
            "stage_tokens_per_s": tokens / stage_s, "scoring_s": scoring_s,
            "scoring_tokens_per_s": rows_after_first * tokens_per_row / scoring_s if scoring_s > 0 else None}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--shard-size", type=int, default=64)
    p.add_argument("--actor-cpus", type=float, default=2, help="CPUs per scorer actor (threads for hf)")
    p.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs of the local Ray instance")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_cache.json"))
    args = p.parse_args()

    flops = matmul_flops()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.hidden, args.layers)
        build_data(work / "data.jsonl", args.pairs)
        rows = [run_engine(e, work / "model", work / "data.jsonl", work, args) for e in ("vllm", "hf")]
    for r in rows:
        r["efficiency_stage"] = r["stage_tokens_per_s"] * 2 * params / flops
        r["efficiency_scoring"] = (r["scoring_tokens_per_s"] or 0) * 2 * params / flops
    print(f"\nmachine: fp32 matmul {flops / 1e9:.0f} GFLOP/s ({os.cpu_count()} cores); model: "
          f"{params / 1e6:.1f}M params; {rows[0]['pairs']} pairs, {rows[0]['tokens']} tokens scored")
    print(f"{'engine':<6} {'stage s':>8} {'stage tok/s':>12} {'eff.':>6} {'scoring tok/s':>14} {'eff.':>6}")
    for r in rows:
        print(f"{r['engine']:<6} {r['stage_s']:>8.1f} {r['stage_tokens_per_s']:>12.0f} "
              f"{r['efficiency_stage']:>6.1%} {r['scoring_tokens_per_s'] or 0:>14.0f} {r['efficiency_scoring']:>6.1%}")
    Path(args.out).write_text(json.dumps({"matmul_flops": flops, "params": params, "args": vars(args),
                                          "results": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
