"""Driver memory of stage 3 against the number of prompts: peak RSS of the process that runs `evaluate.run`.

Per size, a fresh subprocess evaluates the tiny model (`dpo-pipeline tiny-assets`) as one checkpoint target plus
the reference model on N generated prompts (1 sample each, `--new-tokens` tokens, a lexicon rule reward, the win
rate against the reference's samples, the transformers reference scorer), and records the driver's
`ru_maxrss` (its own peak; Ray workers and vLLM engine processes are other processes) and the wall time.

    python benchmarks/scale_eval.py [--sizes 1000 5000 20000] [--new-tokens 8] [--code ROOT]

`--code` runs the stage of another checkout (e.g. main, for the figures before a change): its root goes first on
the subprocess's PYTHONPATH. The goal (issue 14, item 9): peak RSS flat within 15% from 1k to 20k prompts.

Measured 2026-11-30 on the shared 2-core machine, `--new-tokens 4`, one size per invocation (`--sizes N`):
driver peak RSS 642.9 / 666.9 / 725.1 MB at 1k / 5k / 20k prompts before (commit 87b5a68, the driver holding
every sample: +12.8%, growing with the samples), 613.6 / 614.3 / 615.1 MB after (+0.2%). Wall times (s) before
232 / 179 / 210, after 368 / 216 / 234: other test runs shared the 2 cores, so they compare loosely.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("the film was great good boring awful moving dull charming funny weak superb flat story actor plot scene "
         "music ending long short slow fast bright dark quiet loud").split()

# Runs in the fresh subprocess: argv = config overrides; prints one JSON line.
CHILD = """
import json, resource, sys, time
from pipeline.config import load_config
from stages import evaluate
cfg = load_config(None, sys.argv[1:])
t0 = time.perf_counter()
result = evaluate.run(cfg, progress_factory=None)
wall = time.perf_counter() - t0
row = {r["name"]: r for r in result.rows}["ckpt"]
print("RESULT " + json.dumps({"wall_s": wall, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                              "samples": row["samples"], "reward_mean": row["reward_mean"],
                              "kl_mean": row["kl_mean"], "win_rate": row["win_rate"]}))
"""


def write_prompts(path: Path, count: int) -> None:
    """`count` prompt-only rows of 4-12 words, seeded by the row index (no randomness across runs)."""
    with path.open("w") as f:
        for i in range(count):
            n = 4 + i % 9
            words = [WORDS[(i * 7 + k * 13 + k * k) % len(WORDS)] for k in range(n)]
            f.write(json.dumps({"prompt": f"Review {i}: " + " ".join(words)}) + "\n")


def tiny_model(work: Path) -> Path:
    out = work / "tiny-model"
    if not (out / "config.json").exists():
        subprocess.run([sys.executable, "-m", "pipeline.cli", "tiny-assets", str(out)], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
    return out


def run_size(work: Path, model: Path, size: int, new_tokens: int, code: Path) -> dict:
    case = work / f"n{size}"
    case.mkdir(parents=True, exist_ok=True)
    prompts = case / "prompts.jsonl"
    write_prompts(prompts, size)
    overrides = [
        f"model.path={model}", f"data.train.path={prompts}", f"eval.prompts.path={prompts}",
        f"cache_dir={case / 'cache'}", f"run_dir={case / 'run'}", "ray.num_cpus=2",
        "data.max_length=128", "data.max_prompt_length=64", "scoring.engine=hf", "scoring.batch_size=64",
        f"eval.checkpoints={{ckpt: {model}}}", "eval.preference_accuracy=false", "eval.samples_per_prompt=1",
        f"eval.max_new_tokens={new_tokens}", "eval.batch_prompts=512", "eval.engine_kwargs={enforce_eager: true}",
        "eval.reward.type=rule", "eval.reward.rule=lexicon", "eval.reward.positive=[great, good, superb]",
        "eval.reward.negative=[bad, awful, dull]",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(code), os.environ.get("PYTHONPATH", "")]),
           # A fresh local Ray instance per size: never one of the other Ray instances running on this machine.
           "RAY_ADDRESS": "local", "RAY_AUTH_MODE": "disabled", "VLLM_LOGGING_LEVEL": "ERROR",
           "TOKENIZERS_PARALLELISM": "false"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *overrides], env=env, cwd=case, capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"size {size} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    return {"prompts": size, **json.loads(line.removeprefix("RESULT ")),
            "process_s": time.perf_counter() - t0}


def measure(sizes=(1_000, 5_000, 20_000), new_tokens: int = 8, code: Path = ROOT,
            work: Path | None = None, on_row=None) -> list[dict]:
    """One row per size: prompts, driver peak RSS (MB), wall time of `evaluate.run` (s), and the checkpoint's
    reward / KL / win rate (a check that the work was done). `on_row(row)` is called as each size finishes."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="scale-eval-") as tmp:
        root = Path(work or tmp)
        model = tiny_model(root)
        for size in sizes:
            rows.append(run_size(root, model, size, new_tokens, Path(code)))
            if on_row is not None:
                on_row(rows[-1])
    return rows


def _print_row(r: dict) -> None:
    win = "" if r["win_rate"] is None else f"{r['win_rate']:.3f}"
    print(f"{r['prompts']:>8} {r['peak_rss_mb']:>12.1f} {r['wall_s']:>8.1f} {r['samples']:>8} "
          f"{r['reward_mean']:>8.3f} {r['kl_mean']:>9.5f} {win:>6}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1_000, 5_000, 20_000])
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--code", type=Path, default=ROOT, help="checkout whose stage runs (default: this one)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    print(f"stage code: {args.code}; {args.new_tokens} new tokens, 1 sample per prompt, checkpoint + reference")
    print(f"{'prompts':>8} {'peak RSS MB':>12} {'wall s':>8} {'samples':>8} {'reward':>8} {'KL':>9} {'win':>6}",
          flush=True)
    rows = measure(tuple(args.sizes), args.new_tokens, args.code, on_row=_print_row)
    growth = rows[-1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    print(f"peak RSS growth {rows[0]['prompts']} -> {rows[-1]['prompts']} prompts: {growth:+.1%} (goal: within 15%)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
