"""The LM head's memory in training: the growth of a process's peak RSS, and the time, of one forward + backward of
the policy's response log-probs (`selective_token_logps`) with the head's fp32 logits kept for backward (before)
or recomputed chunk by chunk in backward (`train.parallel.recompute_head`, after), at a 128k vocabulary (Llama 3's
128,256). Each case runs in a fresh process (peak RSS only grows); the model is small apart from its head, so the
head's logits dominate.

    python benchmarks/bench_head.py [--rows 8] [--tokens 320] [--vocab 128256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.dpo.logprobs import selective_token_logps


def case(recompute: bool, rows: int, tokens: int, vocab: int, repeats: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(2)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=256, intermediate_size=768,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4))
    model.train()
    ids = torch.randint(3, vocab, (rows, tokens))
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, : tokens // 4] = False
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    # Memory: the first pass (it also allocates the gradients, the same in both cases); time: the best of the
    # passes after it.
    start = rss()
    out = selective_token_logps(model, ids, None, score, recompute=recompute)
    forward = rss()
    out.sum().backward()
    step, times = rss(), []
    for _ in range(repeats):
        t0 = time.perf_counter()
        selective_token_logps(model, ids, None, score, recompute=recompute).sum().backward()
        times.append(time.perf_counter() - t0)
    return {"recompute": recompute, "scored_tokens": int(score[:, 1:].sum()), "vocab": vocab,
            "forward_mb": forward - start, "step_mb": step - start, "seconds": min(times),
            "logits_mb": int(score[:, 1:].sum()) * vocab * 4 / 2**20,
            "grads_mb": sum(p.numel() for p in model.parameters()) * 4 / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=320)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        print(json.dumps(case(args.case == "1", args.rows, args.tokens, args.vocab, args.repeats)))
        return
    rows = []
    for recompute in ("0", "1"):
        out = subprocess.run([sys.executable, __file__, "--case", recompute, "--rows", str(args.rows), "--tokens",
                              str(args.tokens), "--vocab", str(args.vocab), "--repeats", str(args.repeats)],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    r = rows[0]
    print(f"{args.rows} rows x {args.tokens} tokens, {r['scored_tokens']} scored, vocab {r['vocab']}: their fp32 "
          f"logits {r['logits_mb']:.0f} MB; growth of peak RSS in the first pass (it includes the gradients, "
          f"{r['grads_mb']:.0f} MB), MB; seconds: best of {args.repeats} passes after it")
    print("| LM head | forward | forward + backward | seconds |\n|---|---:|---:|---:|")
    for r in rows:
        name = "recomputed in backward" if r["recompute"] else "logits kept for backward"
        print(f"| {name} | {r['forward_mb']:.0f} | {r['step_mb']:.0f} | {r['seconds']:.2f} |")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
