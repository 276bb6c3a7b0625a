"""Full-file reads of a 1 GB source during one `run` (issue 14, item 7).

Builds a ~1 GB JSONL source of short generated rows, a tiny model and a complete cache for that source (a small
stand-in file under the source's real key: scoring 1 GB on 2 cores is not the point), then runs the driver work of
one `dpo-pipeline run` with the real code paths, each stage's lookup as the stage makes it:

    plan (orchestrate.plan)  ->  cache stage (reuse check)  ->  training's find_cache  ->  evaluation's prompts

The run happens in a fresh process (nothing remembered in memory), twice: a first run (nothing remembered under
cache_dir either) and a rerun of the same config. Bytes read are the process's `rchar` (/proc/self/io: every byte
read through read(2), whatever library reads it); full-file reads = bytes read // source size. Seconds are wall
clock and CPU time of the process (the CPU time is the steadier figure on a shared machine). Cache files hashed
are counted by wrapping `Store.sha256` (the one function that hashes cache files). The source is deleted after.

    PYTHONPATH=$PWD python benchmarks/scale_reads.py [--gb 1.0]

`measure()` returns the figures (benchmarks/scale.py calls it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]


def _rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def _write_source(path: Path, target_bytes: int) -> int:
    """Short standard rows (~95 bytes each), written in blocks; returns the row count."""
    rows, size = 0, 0
    with open(path, "w") as f:
        while size < target_bytes:
            block = "".join(f'{{"id": "r{i}", "prompt": "Question {i}: is this fine?", "chosen": " Yes, it is '
                            f'fine.", "rejected": " No."}}\n' for i in range(rows, rows + 100_000))
            f.write(block)
            rows, size = rows + 100_000, size + len(block)
    return rows


def _config(work: Path, source: Path):
    from pipeline.config import load_config  # noqa: PLC0415 (a benchmark's child processes import what they need)

    return load_config(None, [f"model.path={work / 'tiny-model'}", f"data.train.path={source}",
                              f"cache_dir={work / 'cache'}", f"run_dir={work / 'run'}", "scoring.engine=hf",
                              "eval.num_prompts=8", "data.max_length=128", "data.max_prompt_length=64"])


def _setup(work: Path, gb: float) -> dict:
    """The source, the tiny model, and a complete cache under the source's key; then nothing remembered is kept,
    so that the measured run starts as a first run would."""
    import pyarrow as pa  # noqa: PLC0415

    from pipeline.caches.layout import CacheSpec, resolve_inputs  # noqa: PLC0415
    from pipeline.demo.tiny import build_tiny_assets  # noqa: PLC0415
    from pipeline.store.storage import Store  # noqa: PLC0415
    from stages.cache import CACHE_SCHEMA  # noqa: PLC0415

    source = work / "source.jsonl"
    rows = _write_source(source, int(gb * (1 << 30)))
    build_tiny_assets(work / "tiny-model")
    cfg = _config(work, source)
    prep = resolve_inputs(CacheSpec.of(cfg), "train", cfg.data.train)
    store = Store(cfg.cache_dir).child(prep.key)
    digest = store.write_parquet("data/part-00000.parquet", pa.Table.from_pylist([], schema=CACHE_SCHEMA))
    rejects = store.write_bytes("rejects.jsonl", b"")
    store.write_json("manifest.json", {
        "schema_version": 1, "key": prep.key, "split": "train", "inputs": prep.inputs, "engine": "hf",
        "counts": {"rows": rows, "pairs": rows, "rejected": 0, "reasons": {}, "tokens": 0},
        # A stand-in: the rows the plan counts, without scoring a gigabyte on 2 cores.
        "files": [{"path": "data/part-00000.parquet", "rows": rows, "sha256": digest}],
        "rejects": {"path": "rejects.jsonl", "rows": 0, "sha256": rejects}})
    shutil.rmtree(work / "cache" / "sources", ignore_errors=True)  # plans remembered by a newer version
    return {"rows": rows, "bytes": source.stat().st_size, "key": prep.key}


def _driver_run(work: Path) -> dict:
    """The driver work of one `run` that reads the source or the cache, phase by phase, in this (fresh) process."""
    from pipeline import orchestrate  # noqa: PLC0415
    from pipeline.caches.layout import CacheSpec, find_cache  # noqa: PLC0415
    from pipeline.data.models import load_tokenizer  # noqa: PLC0415
    from pipeline.evaluation.inputs import PromptSource, load_prompts  # noqa: PLC0415
    from pipeline.runtime.session import connect  # noqa: PLC0415
    from pipeline.store import storage  # noqa: PLC0415
    from stages import cache  # noqa: PLC0415

    hashed: Counter[str] = Counter()
    real = storage.Store.sha256

    def counting(self, rel):
        hashed[rel] += 1
        return real(self, rel)

    storage.Store.sha256 = counting
    cfg = _config(work, work / "source.jsonl")
    tok = load_tokenizer(str(work / "tiny-model"))
    phases = {
        "plan": lambda: orchestrate.plan(cfg, evaluate=False),
        "cache": lambda: cache.run(cfg),
        "train find_cache": lambda: find_cache(CacheSpec.of(cfg), "train"),
        "eval prompts": lambda: load_prompts(PromptSource.of(cfg), tok, storage.Store(cfg.run_dir).child("eval"),
                                             {"tokenizer": str(work / "tiny-model"), "chat_template": None},
                                             lambda: connect(cfg.ray, cfg.run_dir, cfg.shared_paths())),
    }
    out = {}
    for name, phase in phases.items():
        r0, t0, c0 = _rchar(), time.perf_counter(), time.process_time()
        phase()
        out[name] = {"bytes_read": _rchar() - r0, "seconds": round(time.perf_counter() - t0, 2),
                     "cpu_seconds": round(time.process_time() - c0, 2)}
    out["cache_file_hashes"] = sum(hashed.values())
    return out


def _child(*args: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{args[0]} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure(gb: float = 1.0) -> dict:
    """Figures of a first run and a rerun: bytes read and seconds per phase, full-file reads of the source."""
    work = Path(tempfile.mkdtemp(prefix="scale-reads-"))
    try:
        setup = _child("--setup", str(work), str(gb))
        result = {"source_bytes": setup["bytes"], "source_rows": setup["rows"]}
        for run in ("first_run", "rerun"):
            phases = _child("--run", str(work))
            read = sum(p["bytes_read"] for k, p in phases.items() if k != "cache_file_hashes")
            timed = [p for k, p in phases.items() if k != "cache_file_hashes"]
            result[run] = {"phases": phases, "full_file_reads": read // setup["bytes"],
                           "seconds": round(sum(p["seconds"] for p in timed), 2),
                           "cpu_seconds": round(sum(p["cpu_seconds"] for p in timed), 2)}
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--setup", nargs=2, metavar=("WORK", "GB"))
    parser.add_argument("--run", metavar="WORK")
    args = parser.parse_args()
    if args.setup:
        print(json.dumps(_setup(Path(args.setup[0]), float(args.setup[1]))))
        return
    if args.run:
        print(json.dumps(_driver_run(Path(args.run))))
        return
    result = measure(args.gb)
    gb = result["source_bytes"] / (1 << 30)
    for run in ("first_run", "rerun"):
        r = result[run]
        print(f"{run.replace('_', ' ')}: full-file reads of a {gb:.2f} GB source during one run: "
              f"{r['full_file_reads']} ({r['seconds']} s, {r['cpu_seconds']} s CPU)")
        for name, p in r["phases"].items():
            if name != "cache_file_hashes":
                print(f"  {name:<17} {p['bytes_read'] / (1 << 20):9.1f} MiB read  {p['seconds']:6.2f} s  "
                      f"{p['cpu_seconds']:6.2f} s CPU")
        print(f"  cache files hashed: {r['phases']['cache_file_hashes']}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
