"""Where LoRA's memory goes: the growth of a process's peak RSS over one forward + backward of the policy's
response log-probs (`selective_token_logps`) on the suite's mid model (8 x 512 Llama), full vs LoRA (rank 16, every
linear layer), without and with activation checkpointing. Each case runs in a fresh process (peak RSS only grows).

    python benchmarks/bench_lora_memory.py [--rows 8] [--tokens 400]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.dpo.logprobs import selective_token_logps


def case(lora: bool, checkpointing: bool, rows: int, tokens: int) -> dict:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1536,
                                         num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8))
    if lora:
        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids = torch.randint(3, 500, (rows, tokens))
    score = torch.ones_like(ids, dtype=torch.bool)
    score[:, : tokens // 4] = False
    rss = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # noqa: E731
    start = rss()
    out = selective_token_logps(model, ids, None, score)
    forward = rss()
    out.sum().backward()
    return {"lora": lora, "checkpointing": checkpointing, "forward_mb": forward - start, "step_mb": rss() - start}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--tokens", type=int, default=400)
    p.add_argument("--case", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.case:
        lora, ckpt = (c == "1" for c in args.case)
        print(json.dumps(case(lora, ckpt, args.rows, args.tokens)))
        return
    print(f"{args.rows} rows x {args.tokens} tokens; peak RSS growth, MB")
    print("| training | activation checkpointing | forward | forward + backward |\n|---|---|---:|---:|")
    for ckpt in ("0", "1"):
        for lora in ("0", "1"):
            out = subprocess.run([sys.executable, __file__, "--case", lora + ckpt, "--rows", str(args.rows),
                                  "--tokens", str(args.tokens)], capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {'LoRA r16' if r['lora'] else 'full'} | {'on' if r['checkpointing'] else 'off'} | "
                  f"{r['forward_mb']:,.0f} | {r['step_mb']:,.0f} |")


if __name__ == "__main__":
    main()
