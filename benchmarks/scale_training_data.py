"""Training's data path at scale, measured: the bytes each worker reads in one epoch with 1 and 2 workers, and the
driver's peak memory as the cache grows (the driver plans the lanes from the manifest; it never reads the data).

    python benchmarks/scale_training_data.py [--reads-pairs 4096] [--driver-pairs 10000 50000 200000]

Caches are built by the real cache stage (tiny model, `hf` engine, short pairs). Each training run is a fresh
subprocess, so its driver's peak RSS (getrusage) is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.caches.layout import CacheSpec, find_cache
from pipeline.config import load_config
from pipeline.demo import tiny
from stages import cache, train
from stages.train import read_train_columns

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def _config(work: Path, pairs: int, *overrides: str):
    return load_config(None, [
        f"model.path={work / 'model'}", f"data.train.path={work / f'pairs-{pairs}.jsonl'}", "data.max_length=64",
        "data.max_prompt_length=32", f"cache_dir={work / 'cache'}", f"run_dir={work / 'runs' / str(pairs)}",
        "scoring.engine=hf", "scoring.batch_size=512", "scoring.shard_size=512", "train.global_batch_pairs=32",
        "train.micro_batch_pairs=16", "train.optim.lr=1e-4", "train.log_every=1", "ray.num_cpus=3",
        "eval.include_reference_model=false", *overrides])


def build(work: Path, pairs: int) -> None:
    """The tiny model (once) and `pairs` short pairs, cached."""
    if not (work / "model" / "config.json").exists():
        tiny.build_tiny_assets(work / "model")
    rng = random.Random(pairs)

    def text(n):
        return " ".join(rng.choice(tiny.WORDS) for _ in range(rng.randint(2, n)))

    with open(work / f"pairs-{pairs}.jsonl", "w") as f:
        for _ in range(pairs):
            f.write(json.dumps({"prompt": text(8), "chosen": text(12), "rejected": text(12)}) + "\n")
    cache.run(_config(work, pairs))


def train_child(work: str, pairs: int, overrides: list[str]) -> None:
    """In a subprocess: train, then print the driver's peak RSS and the workers' largest read."""
    cfg = _config(Path(work), pairs, *overrides)
    result = train.run(cfg)
    rows = [json.loads(line) for line in Path(result.run_dir, "metrics.jsonl").read_text().splitlines()]
    print(json.dumps({"driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                      "steps": result.steps, "worker_read_mb": rows[-1]["data/read_mb"]}))


def run_train(work: Path, pairs: int, *overrides: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", str(work), str(pairs), *overrides],
                         capture_output=True, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def needed_mb(work: Path, pairs: int) -> float:
    """The bytes of TRAIN_COLUMNS in the whole cache (decoded, as a worker counts them)."""
    files = find_cache(CacheSpec.of(_config(work, pairs)), "train").files
    return sum(read_train_columns(f).nbytes for f in files) / 2**20


def measure(reads_pairs: int = 4096, driver_pairs=(10_000, 50_000, 200_000)) -> dict:
    with tempfile.TemporaryDirectory(prefix="scale-train-data-") as tmp:
        work = Path(tmp)
        build(work, reads_pairs)
        need = needed_mb(work, reads_pairs)
        reads = []
        for w in (1, 2):
            r = run_train(work, reads_pairs, f"train.parallel.num_workers={w}", "train.parallel.num_cpus_per_worker=1",
                          f"run_dir={work / 'runs' / f'reads-w{w}'}")
            reads.append({"workers": w, "steps": r["steps"], "worker_read_mb": r["worker_read_mb"], "needed_mb": need,
                          "fraction": r["worker_read_mb"] / need})
        driver = []
        for n in driver_pairs:
            build(work, n)
            r = run_train(work, n, "train.max_steps=2", "train.parallel.num_workers=2",
                          "train.parallel.num_cpus_per_worker=1")
            driver.append({"pairs": n, "driver_peak_mb": r["driver_peak_mb"]})
    return {"reads": reads, "driver": driver}


def print_tables(res: dict) -> None:
    print(f"{'workers':>7} {'steps':>5} {'read per worker':>15} {'of needed':>9}")
    for r in res["reads"]:
        print(f"{r['workers']:>7} {r['steps']:>5} {r['worker_read_mb']:>13.1f}MB {r['fraction']:>9.2f}")
    print(f"{'pairs':>8} {'train driver peak RSS':>21}")
    for r in res["driver"]:
        print(f"{r['pairs']:>8} {r['driver_peak_mb']:>19.0f}MB")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        train_child(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
        sys.exit(0)
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reads-pairs", type=int, default=4096)
    ap.add_argument("--driver-pairs", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    ap.add_argument("--json")
    args = ap.parse_args()
    res = measure(args.reads_pairs, args.driver_pairs)
    print_tables(res)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
