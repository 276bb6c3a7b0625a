"""Benchmark: our stage 2 (cached reference) beside TRL's `DPOTrainer`, with and without its precomputed reference,
on the same model, data, batch sizes and threads, in one process. TRL is a benchmark-only dependency
(`pip install trl==1.16.0`; `make bench` installs it). Writes docs/bench_trl.json.

Per-step figures are medians over the steps after the first two: ours from `metrics.jsonl` (the optimizer step:
collation, forward/backward of every micro-batch, clipping, AdamW), TRL's from a callback timing
`on_step_begin` -> `on_step_end` (the same work). TRL's precompute pass (`precompute_ref_log_probs=True`, run
when the trainer is built) is the difference of the two trainers' set-up times; its tokens are every (prompt +
response) sequence it scores.

    python benchmarks/bench_trl.py [--pairs 256] [--steps 8]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_cache import ROOT, build_data, build_model
from bench_train import measure, parser, save
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

os.environ.setdefault("RAY_AUTH_MODE", "disabled")


def trl_run(work: Path, args, precompute: bool) -> dict:
    from trl import DPOConfig, DPOTrainer  # noqa: PLC0415 (lazy: TRL is installed by `make bench` only)

    torch.set_num_threads(int(args.worker_cpus))
    stamps: dict[str, list[float]] = {"begin": [], "end": []}

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            stamps["begin"].append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps["end"].append(time.perf_counter())

    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    tok = AutoTokenizer.from_pretrained(work / "model")
    config = DPOConfig(
        output_dir=str(work / f"trl-{precompute}"), per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.global_batch // args.micro_batch, max_steps=args.steps, learning_rate=1e-5,
        beta=0.1, precompute_ref_log_probs=precompute, max_length=512, use_cpu=True, report_to="none",
        logging_steps=1, save_strategy="no", dataloader_num_workers=0, seed=0, max_grad_norm=1.0,
        # TRL's configs default to bf16 autocast; both sides compute in fp32 here (the pipeline's default).
        bf16=False)
    model = AutoModelForCausalLM.from_pretrained(work / "model", dtype=torch.float32)
    t0 = time.perf_counter()  # TRL tokenizes and, with precompute_ref_log_probs, scores the dataset here
    trainer = DPOTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[Clock()])
    setup_s = time.perf_counter() - t0
    trainer.train()
    steps = [e - b for b, e in zip(stamps["begin"], stamps["end"])][2:]
    return {"mode": f"trl_{'precomputed' if precompute else 'in_loop'}", "steps_measured": len(steps),
            "pairs_per_s": args.global_batch / statistics.median(steps), "setup_s": setup_s}



def scored_tokens(work: Path) -> int:
    """Tokens of every (prompt + response) sequence a reference pass scores: both responses of every pair."""
    tok = AutoTokenizer.from_pretrained(work / "model")
    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    return sum(len(tok(r["prompt"])["input_ids"]) + len(tok(r[s], add_special_tokens=False)["input_ids"]) + 1
               for r in rows for s in ("chosen", "rejected"))


def main() -> None:
    p = parser()
    p.set_defaults(out=str(ROOT / "docs" / "bench_trl.json"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.hidden, args.layers)
        build_data(work / "data.jsonl", args.pairs)
        tokens = scored_tokens(work)
        rows = [trl_run(work, args, True), trl_run(work, args, False)] + measure(work, args, ("cached",))
    by = {r["mode"]: r for r in rows}
    # The precompute pass: the setup with it minus the setup without it (both tokenize the same dataset).
    pre = by["trl_precomputed"]
    pre["precompute_s"] = pre["setup_s"] - by["trl_in_loop"]["setup_s"]
    pre["precompute_tokens"] = tokens
    pre["precompute_tokens_per_s"] = tokens / pre["precompute_s"]
    print(f"\nmodel: {params / 1e6:.1f}M params, fp32; global batch {args.global_batch} pairs, micro "
          f"{args.micro_batch}; {args.worker_cpus:g} torch threads")
    print(f"{'mode':<16} {'pairs/s':>8}")
    for r in rows:
        print(f"{r['mode']:<16} {r['pairs_per_s']:>8.2f}")
    ours = by["cached"]["pairs_per_s"]
    print(f"cached / TRL precomputed: {ours / by['trl_precomputed']['pairs_per_s']:.2f}x; cached / TRL in-loop: "
          f"{ours / by['trl_in_loop']['pairs_per_s']:.2f}x")
    print(f"TRL precompute pass: {pre['precompute_tokens']} tokens in {pre['precompute_s']:.1f} s = "
          f"{pre['precompute_tokens_per_s']:.0f} tokens/s")
    save(args, params, rows)


if __name__ == "__main__":
    main()
