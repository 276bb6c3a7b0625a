"""Benchmark of stage 3: sampling throughput, vLLM (the stage's `CheckpointEngine`) vs transformers `generate`.

Same checkpoint, token-id prompts, samples per prompt and completion length for both engines, run one after the
other in one process. Every completion has exactly L = --new-tokens tokens (EOS is ignored by vLLM and suppressed
by `min_new_tokens` in transformers), so both do the same work: tokens/s = prompts x n x L / seconds.

    python benchmarks/bench_sample.py [--prompts 64] [--samples-per-prompt 2] [--new-tokens 128]

"start" is the engine start (vLLM: `CheckpointEngine(...)`, i.e. the engine process, weights, KV cache;
transformers: `from_pretrained`). "sampling" is the timed sampling of all prompts after one small warm-up call:
for vLLM the `seconds` `CheckpointEngine.sample` reports (one `generate` call over all prompts); for transformers
the sum over left-padded batches of --hf-batch prompts (top_k disabled, as in vLLM). Only generated tokens count;
efficiency = tokens/s x 2 x params / matmul FLOP/s ignores prefill and attention FLOPs. Writes docs/bench_sample.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
import torch
import transformers
from bench_cache import ROOT, build_data, build_model, matmul_flops
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline.config import EvalConfig
from pipeline.engines.actors import CheckpointEngine, sample_seed
from pipeline.engines.scorers import scorer_kwargs

ENGINES = ("vllm", "hf")


def build_prompts(work: Path, model_dir: Path, count: int, prompt_len: int) -> list[list[int]]:
    """Prompts of bench_cache's data (8-96 random words, seeded), tokenized with BOS and cut to prompt_len tokens."""
    build_data(work / "data.jsonl", count)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rows = [json.loads(line) for line in (work / "data.jsonl").read_text().splitlines()]
    return [tok(r["prompt"])["input_ids"][:prompt_len] for r in rows]


def run_vllm(model_dir: Path, prompts: list[list[int]], args) -> dict:
    settings = EvalConfig(engine_kwargs=args.engine_kwargs)
    kwargs = scorer_kwargs("vllm", settings, str(model_dir), "float32", args.prompt_len + args.new_tokens)
    L, n = args.new_tokens, args.samples_per_prompt
    params = dict(n=n, temperature=1.0, top_p=1.0, max_tokens=L, min_tokens=L, ignore_eos=True, stop_token_ids=None)
    seeds = [sample_seed(0, i) for i in range(len(prompts))]
    t0 = time.perf_counter()
    engine = CheckpointEngine(kwargs)
    start_s = time.perf_counter() - t0
    try:
        engine.sample(prompts[:2], seeds[:2], params, 0)  # warm-up: vLLM's first generate is slow
        out = engine.sample(prompts, seeds, params, 0)
    finally:
        engine.engine.llm.llm_engine.engine_core.shutdown()
    lengths = [len(c) for c in out["table"].column("completion_ids").to_pylist()]
    if lengths != [L] * (len(prompts) * n):
        raise RuntimeError(f"vLLM completions of {sorted(set(lengths))} tokens, expected {len(prompts) * n} of {L}")
    del engine
    gc.collect()
    return {"start_s": start_s, "sampling_s": out["seconds"], "tokens": sum(lengths)}


def run_hf(model_dir: Path, prompts: list[list[int]], args) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    tok.padding_side = "left"  # decoder-only generation appends after the last column: pad on the left
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    start_s = time.perf_counter() - t0
    L, n = args.new_tokens, args.samples_per_prompt

    def generate(batch: list[list[int]], new: int) -> int:
        enc = tok.pad({"input_ids": batch}, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(**enc, do_sample=True, temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=new,
                                 min_new_tokens=new, num_return_sequences=n, use_cache=True,
                                 pad_token_id=tok.pad_token_id)
        gen = out[:, enc["input_ids"].shape[1]:]
        # No EOS can be sampled before min_new_tokens, so no row finished early: all `new` tokens are real.
        if gen.shape != (len(batch) * n, new) or (gen == tok.eos_token_id).any():
            raise RuntimeError(f"generate returned {tuple(gen.shape)} new tokens, expected {(len(batch) * n, new)}")
        return gen.numel()

    generate(prompts[:2], min(L, 8))  # warm-up
    # Length-sorted batches waste less on padding (as the hf scorer does); vLLM needs no such help.
    ordered = sorted(prompts, key=len)
    t0 = time.perf_counter()
    tokens = sum(generate(ordered[i:i + args.hf_batch], L) for i in range(0, len(ordered), args.hf_batch))
    return {"start_s": start_s, "sampling_s": time.perf_counter() - t0, "tokens": tokens}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--samples-per-prompt", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64, help="prompts are cut to this many tokens")
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--threads", type=int, default=2, help="torch threads of the transformers run")
    p.add_argument("--hf-batch", type=int, default=16, help="prompts per transformers generate call")
    p.add_argument("--engine-kwargs", default="{}", help="JSON for eval.engine_kwargs (extra vllm.LLM arguments)")
    p.add_argument("--engines", default="vllm,hf", help="comma-separated subset of vllm,hf")
    p.add_argument("--out", default=str(ROOT / "docs" / "bench_sample.json"))
    args = p.parse_args()
    try:
        args.engine_kwargs = json.loads(args.engine_kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--engine-kwargs is not JSON ({e}); e.g. '{{\"enforce_eager\": true}}'")
    if not isinstance(args.engine_kwargs, dict):
        p.error("--engine-kwargs must be a JSON object, e.g. '{\"enforce_eager\": true}'")
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    if not args.engines or any(e not in ENGINES for e in args.engines):
        p.error(f"--engines must be a comma-separated subset of {','.join(ENGINES)}, not {','.join(args.engines)!r}")
    for name in ("prompts", "samples_per_prompt", "new_tokens", "prompt_len", "threads", "hf_batch"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def main() -> None:
    args = parse_args()
    transformers.utils.logging.disable_progress_bar()
    flops = matmul_flops()
    runners = {"vllm": run_vllm, "hf": run_hf}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        params = build_model(work / "model", args.hidden, args.layers)
        prompts = build_prompts(work, work / "model", args.prompts, args.prompt_len)
        rows = [{"engine": e, **runners[e](work / "model", prompts, args)} for e in args.engines]
    for r in rows:
        r["tokens_per_s"] = r["tokens"] / r["sampling_s"]
        r["efficiency"] = r["tokens_per_s"] * 2 * params / flops
    prompt_tokens = sum(map(len, prompts))
    print(f"\nmachine: fp32 matmul {flops / 1e9:.0f} GFLOP/s ({os.cpu_count()} cores); model: {params / 1e6:.1f}M "
          f"params; {len(prompts)} prompts (mean {prompt_tokens / len(prompts):.0f} tokens) x "
          f"{args.samples_per_prompt} samples x {args.new_tokens} new tokens")
    print(f"{'engine':<6} {'start s':>8} {'sampling s':>11} {'tokens':>8} {'tok/s':>8} {'eff.':>6}")
    for r in rows:
        print(f"{r['engine']:<6} {r['start_s']:>8.1f} {r['sampling_s']:>11.2f} {r['tokens']:>8} "
              f"{r['tokens_per_s']:>8.0f} {r['efficiency']:>6.1%}")
    by = {r["engine"]: r for r in rows}
    ratio = by["vllm"]["tokens_per_s"] / by["hf"]["tokens_per_s"] if len(by) == 2 else None
    if ratio is not None:
        print(f"vllm/hf sampling tokens/s: {ratio:.2f}x")
    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
               "vllm": sys.modules["vllm"].__version__ if "vllm" in sys.modules else None, "matmul_gflops": flops / 1e9}
    Path(args.out).write_text(json.dumps({"machine": machine, "params": params, "prompt_tokens": prompt_tokens,
                                          "args": vars(args), "results": rows, "vllm_over_hf": ratio},
                                         indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()
