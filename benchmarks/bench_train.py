"""Benchmark of stage 2: DPO training throughput and memory, cached reference vs in-loop reference.

Same model, data, batch sizes and worker setup for both modes, run one after the other in one process; the
cache is built once (hf engine) before either. Figures are medians over the steps after the first two (warm-up)
from `metrics.jsonl`; peak RSS is the largest of any worker. Writes docs/bench_train.json.

    python benchmarks/bench_train.py [--pairs 256] [--steps 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from bench_cache import ROOT, build_data, build_model

from pipeline.config import load_config
from stages import cache, train

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def measure(work: Path, args, modes: tuple[str, ...], extra: tuple[str, ...] = (), tag: str = "") -> list[dict]:
    """Our stage 2 on `work/model` and `work/data.jsonl` (cache built first, hf engine), one row per mode;
    `extra`: more config overrides, `tag`: a suffix of the run directories."""
    base = [f"model.path={work / 'model'}", f"data.train.path={work / 'data.jsonl'}", "data.max_length=512",
            "data.max_prompt_length=192", f"cache_dir={work / 'cache'}", "scoring.engine=hf",
            f"ray.num_cpus={args.ray_cpus}", f"train.max_steps={args.steps}",
            f"train.global_batch_pairs={args.global_batch}", f"train.micro_batch_pairs={args.micro_batch}",
            f"train.parallel.num_cpus_per_worker={args.worker_cpus}", "train.optim.lr=1e-5", "train.shuffle=false",
            *extra]
    cache.run(load_config(None, base + [f"run_dir={work / 'cache-run'}"]))
    rows = []
    for mode in modes:
        run_dir = work / f"{mode}{tag}"
        cfg = load_config(None, base + [f"run_dir={run_dir}", f"train.ref_logps={mode}"])
        train.run(cfg)
        m = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][2:]
        rows.append({"mode": mode, "steps_measured": len(m),
                     "pairs_per_s": statistics.median(r["pairs_per_s"] for r in m),
                     "tokens_per_s": statistics.median(r["tokens_per_s"] for r in m),
                     "peak_rss_mb": max(r["peak_rss_mb"] for r in m)})
    return rows


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--worker-cpus", type=float, default=2, help="CPUs (torch threads) of the one train worker")
    p.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs of the local Ray instance")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_train.json"))
    return p


def main() -> None:
    args = parser().parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.hidden, args.layers)
        build_data(work / "data.jsonl", args.pairs)
        rows = measure(work, args, ("cached", "in_loop"))
    cached, in_loop = rows
    print(f"\nmodel: {params / 1e6:.1f}M params, fp32; global batch {args.global_batch} pairs, micro "
          f"{args.micro_batch}; 1 worker with {args.worker_cpus:g} CPUs")
    print(f"{'mode':<8} {'pairs/s':>8} {'tokens/s':>9} {'peak RSS MB':>12}")
    for r in rows:
        print(f"{r['mode']:<8} {r['pairs_per_s']:>8.2f} {r['tokens_per_s']:>9.0f} {r['peak_rss_mb']:>12.0f}")
    print(f"cached / in_loop: {cached['pairs_per_s'] / in_loop['pairs_per_s']:.2f}x pairs/s, "
          f"{cached['peak_rss_mb'] / in_loop['peak_rss_mb']:.2f}x peak RSS")
    save(args, params, rows)


def save(args, params: int, rows: list[dict]) -> None:
    Path(args.out).write_text(json.dumps({"params": params, "args": vars(args), "results": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
