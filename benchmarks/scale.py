"""The scale figures of docs/SCALE.md, measured in one run (`make scale`): each part prints its table and the whole
is written to docs/scale.json.

    python benchmarks/scale.py [--quick] [--only cache train_data train_memory metrics eval reads]

- cache:        driver peak RSS of `cache` vs pairs (10k, 50k, 200k; tiny model, hf engine) - benchmarks/scale_cache.py
- train_data:   bytes each training worker reads per epoch with 1 and 2 workers; driver peak RSS of `train` vs pairs
                - benchmarks/scale_training_data.py
- train_memory: host memory of 2 FSDP2 ranks loading ~0.1B/0.5B/1B models, checkpoint export size/time, time the
                loop is blocked per checkpoint, before/after - benchmarks/scale_train.py
- metrics:      bytes uploaded per logged step to a local S3 server (moto) at 10 vs 100 steps
- eval:         driver peak RSS of `eval` vs prompts (1k, 5k, 20k) - benchmarks/scale_eval.py
- reads:        full-file reads of a 1 GB source during one `run` - benchmarks/scale_reads.py
`--quick` runs the smallest sizes only (a smoke run of the script, not the figures).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
from pathlib import Path

import boto3
from moto.server import ThreadedMotoServer

from pipeline.training.metrics_log import MetricsLogger

ROOT = Path(__file__).resolve().parents[1]


def metrics_upload(steps=(10, 100, 1000)) -> list[dict]:
    """Bytes the rank-0 metrics logger uploads per logged step to an s3:// run_dir (a moto server on loopback):
    `steps` logged steps then a checkpoint (`sync`: the open rows and the TensorBoard file go up), before the
    end-of-run metrics.jsonl."""
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3").create_bucket(Bucket="scale")
    rows = []
    try:
        for n in steps:
            logger = MetricsLogger(f"s3://scale/runs/m{n}", enabled=True)
            for step in range(1, n + 1):
                logger.log(step, {"loss": 0.5, "rewards/margins": 0.1, "grad_norm": 1.0, "lr": 1e-6},
                           echo=lambda _: None)
            logger.sync()
            rows.append({"steps": n, "uploaded_bytes": logger.uploaded_bytes,
                         "bytes_per_step": logger.uploaded_bytes / n})
            logger.close()
    finally:
        server.stop()
    return rows


def run_part(name: str, quick: bool):
    if name == "metrics":
        return metrics_upload()
    module, kwargs = {
        "cache": ("scale_cache", {"sizes": (10_000,)} if quick else {}),
        "train_data": ("scale_training_data", {"reads_pairs": 1024, "driver_pairs": (2_000,)} if quick else {}),
        "train_memory": ("scale_train", {"sizes": ("0.1",)} if quick else {}),
        "eval": ("scale_eval", {"sizes": (1_000,), "new_tokens": 4} if quick else {"new_tokens": 4}),
        "reads": ("scale_reads", {"gb": 0.05} if quick else {}),
    }[name]
    return importlib.import_module(module).measure(**kwargs)


def main() -> None:
    parts = ["cache", "train_data", "train_memory", "metrics", "eval", "reads"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=parts, default=parts)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "docs" / "scale.json"))
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() and not args.quick else {}
    for name in args.only:
        t0 = time.perf_counter()
        results[name] = run_part(name, args.quick)
        print(f"\n== {name} ({time.perf_counter() - t0:.0f} s)\n{json.dumps(results[name], indent=1)}", flush=True)
        if not args.quick:  # each part recorded as soon as it is measured
            results["measured"] = time.strftime("%Y-%m-%d")
            out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
