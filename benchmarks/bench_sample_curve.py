"""Sampling throughput against vLLM's concurrency on this machine: tokens/s of the evaluation stage's engine
(`benchmarks/bench_sample.py --engines vllm`) as `max_num_seqs` (sequences decoded together) and the CPU KV cache
(`VLLM_CPU_KVCACHE_SPACE`, GiB; `eval.cpu_kv_cache_gb`) vary. Each point in a fresh process (the KV-cache size is
fixed per process); the same model, prompts and completion length throughout.

    python benchmarks/bench_sample_curve.py [--seqs 8,32,64,128,256] [--kv-gb 1,4] [--prompts 128]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).parent


def point(seqs: int, kv_gb: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "point.json"
        subprocess.run([sys.executable, str(HERE / "bench_sample.py"), "--engines", "vllm", "--prompts",
                        str(args.prompts), "--samples-per-prompt", str(args.samples_per_prompt), "--new-tokens",
                        str(args.new_tokens), "--engine-kwargs", json.dumps({"max_num_seqs": seqs}), "--out",
                        str(out)], check=True, capture_output=True, text=True, cwd=HERE,
                       env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": str(kv_gb)})
        r = json.loads(out.read_text())
    row = r["results"][0]
    return {"max_num_seqs": seqs, "kv_cache_gb": kv_gb, "tokens_per_s": row["tokens_per_s"],
            "sampling_s": row["sampling_s"], "start_s": row["start_s"], "efficiency": row["efficiency"],
            "sequences": args.prompts * args.samples_per_prompt}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seqs", default="8,32,64,128,256")
    p.add_argument("--kv-gb", default="1,4")
    p.add_argument("--prompts", type=int, default=128)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--out", default=str(HERE.parent / "docs" / "bench_sample_curve.json"))
    args = p.parse_args()
    seqs = [int(s) for s in args.seqs.split(",")]
    kvs = [int(k) for k in args.kv_gb.split(",")]
    # The curve at the smallest KV cache; the larger ones where it could bind (the most concurrent sequences).
    cases = [(s, kvs[0]) for s in seqs] + [(seqs[-1], k) for k in kvs[1:]]
    rows = []
    print("| max_num_seqs | KV cache GiB | tokens/s | sampling s | engine start s |\n|---:|---:|---:|---:|---:|",
          flush=True)
    for s, k in cases:
        rows.append(point(s, k, args))
        r = rows[-1]
        print(f"| {s} | {k} | {r['tokens_per_s']:,.0f} | {r['sampling_s']:.2f} | {r['start_s']:.1f} |", flush=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
