"""Scale check of stage 1: the driver's peak memory while the cache stage runs, against the number of pairs.

Each size runs in a fresh subprocess (the driver), which builds the cache with the tiny model and the `hf` engine
on generated short pairs and reports its own peak RSS (`getrusage(RUSAGE_SELF).ru_maxrss`: the driver only, not
the Ray workers) and wall time. Target: the driver's peak RSS flat within 15% from the smallest to the largest size.

    python benchmarks/scale_cache.py [--sizes 10000 50000 200000] [--root CODE_DIR]

`--root` runs another checkout of the code (e.g. an export of main, for a before/after comparison). The texts are
very short (1-3 words a side) and `scoring.batch_size` large, so that 200k pairs score in minutes on 2 cores: the
figure measured is the driver's memory, not scoring speed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.compute as pc
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
# Words of the tiny tokenizer's training corpus (pipeline/demo/tiny.py): a few tokens each.
WORDS = "the a movie film story plot scene music good bad great dull very quite and but I you we love hate".split()

# Runs in the child: the driver of one cache stage. ru_maxrss is in KiB on Linux.
DRIVER = """
import json, resource, sys, threading, time
import psutil
from pipeline.config import load_config
from stages import cache

peak_uss = [0]
def sample():  # the driver's own pages (USS): RSS also counts the shared object-store pages it maps
    me = psutil.Process()
    while True:
        peak_uss[0] = max(peak_uss[0], me.memory_full_info().uss)
        time.sleep(0.5)
threading.Thread(target=sample, daemon=True).start()

class Quiet:
    def __init__(self, total, desc): pass
    def update(self, n): pass
    def __enter__(self): return self
    def __exit__(self, *exc): return False

cfg = load_config(None, json.loads(sys.argv[1]))
t0 = time.perf_counter()
(result,) = cache.run(cfg, progress_factory=Quiet)
wall = time.perf_counter() - t0
print(json.dumps({"wall_s": wall, "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "peak_uss_mib": peak_uss[0] / 2**20, "pairs": result.counts["pairs"],
                  "rejected": result.counts["rejected"], "shards": result.shards_total, "uri": result.uri}))
"""


def build_data(path: Path, pairs: int, words: tuple[int, int] = (1, 3), seed: int = 0) -> None:
    """Pairs of `words` (min, max) words a side, from the tiny tokenizer's vocabulary, each with a unique id."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(*words)))

    with open(path, "w") as f:
        for i in range(pairs):
            chosen = text()
            f.write(json.dumps({"id": f"p{i}", "prompt": text(), "chosen": chosen, "rejected": chosen + " no"})
                    + "\n")


def cached_tokens(uri: str) -> int:
    """Tokens of every cached pair (prompt + both responses)."""
    manifest = json.loads(Path(uri, "manifest.json").read_text())
    cols = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    total = 0
    for f in manifest["files"]:
        table = pq.read_table(Path(uri, f["path"]), columns=cols)
        total += sum(pc.sum(pc.list_value_length(table.column(c))).as_py() or 0 for c in cols)
    return total


def run_size(pairs: int, work: Path, model: Path, root: Path, batch_size: int, shard_size: int,
             words: tuple[int, int] = (1, 3)) -> dict:
    data = work / f"data-{pairs}.jsonl"
    build_data(data, pairs, words)
    max_length = 32 if words[1] <= 3 else 256
    overrides = [f"model.path={model}", f"data.train.path={data}", f"data.max_length={max_length}",
                 f"data.max_prompt_length={max_length // 2}",
                 f"cache_dir={work / f'cache-{pairs}'}", f"run_dir={work / f'run-{pairs}'}", "scoring.engine=hf",
                 f"scoring.batch_size={batch_size}", f"scoring.shard_size={shard_size}", "ray.num_cpus=2"]
    env = {**os.environ, "PYTHONPATH": str(root), "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(overrides)], cwd=root, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"the cache stage failed for {pairs} pairs:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"size": pairs, **row, "tokens": cached_tokens(row.pop("uri"))}


def measure(sizes=(10_000, 50_000, 200_000), root: str | Path = ROOT, batch_size: int = 1024,
            shard_size: int = 1000, words: tuple[int, int] = (1, 3)) -> list[dict]:
    """Driver peak RSS (MiB) and wall time (s) of the cache stage per size, each in a fresh driver process."""
    root = Path(root).resolve()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = work / "tiny-model"
        subprocess.run([sys.executable, "-m", "pipeline.cli", "tiny-assets", str(model)], cwd=root, check=True,
                       env={**os.environ, "PYTHONPATH": str(root)}, capture_output=True)
        return [run_size(n, work, model, root, batch_size, shard_size, words) for n in sizes]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 200_000])
    p.add_argument("--root", default=str(ROOT), help="the checkout whose code runs (default: this one)")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--shard-size", type=int, default=1000)
    p.add_argument("--words", type=int, nargs=2, default=[1, 3], metavar=("MIN", "MAX"),
                   help="words a side (prompt, chosen): 1 3 (default) is ~8 tokens a pair; 4 30 is ~50, the length "
                        "of real short pairs")
    p.add_argument("--out", help="also write the rows as JSON here")
    args = p.parse_args()
    rows = measure(args.sizes, args.root, args.batch_size, args.shard_size, tuple(args.words))
    first = rows[0]
    print(f"{'pairs':>8} {'tokens':>11} {'shards':>7} {'wall s':>8} {'peak RSS MiB':>13} {'peak USS MiB':>13} "
          f"{'RSS B/token over first':>23}")
    for r in rows:
        extra = r["tokens"] - first["tokens"]
        slope = (r["peak_rss_mib"] - first["peak_rss_mib"]) * 2**20 / extra if extra else float("nan")
        print(f"{r['size']:>8} {r['tokens']:>11} {r['shards']:>7} {r['wall_s']:>8.1f} {r['peak_rss_mib']:>13.0f} "
              f"{r['peak_uss_mib']:>13.0f} {slope:>23.1f}")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "results": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
