"""Preference pairs from sampled completions: the rules that pick (chosen, rejected) among one prompt's scored
samples, and the Ray-side work that turns a chunk of samples into rows of a preference dataset.

A pair's rows are in the prompts' own format (`standard`: text prompt and responses; `conversational`: the prompt
messages, each response one assistant message), with provenance columns:

    id                              <prompt id>-<chosen sample>-<rejected sample>
    prompt_id                       the source row's id
    chosen_reward, rejected_reward  the reward of each side (chosen > rejected + pairs.margin)
    chosen_sample, rejected_sample  sample indices among the prompt's K completions
    model_sha256                    the content hash of the weights that sampled them
    sampling                        JSON: K, temperature, top_p, max_new_tokens, seed (a prompt's seed derives from it)
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.data.rows import text_problem
from pipeline.engines.chunks import PromptFile, SampledChunk, chunk_prompts, read_table, split_uri, write_table


def best_worst(rewards: list[float], margin: float) -> list[tuple[int, int]]:
    """The highest-reward sample against the lowest (first in sampling order among equals), when the gap exceeds
    `margin`: [(chosen, rejected)] positions, or []."""
    if len(rewards) < 2:
        return []
    hi = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    lo = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    return [(hi, lo)] if rewards[hi] - rewards[lo] > margin else []


def all_pairs(rewards: list[float], margin: float) -> list[tuple[int, int]]:
    """Every two samples whose rewards differ by more than `margin`, the higher one chosen."""
    return [(i, j) if rewards[i] > rewards[j] else (j, i)
            for i in range(len(rewards)) for j in range(i + 1, len(rewards)) if abs(rewards[i] - rewards[j]) > margin]


PAIR_RULES = {"best_worst": best_worst, "all_pairs": all_pairs}


@dataclass(frozen=True)
class PairSettings:
    """How a chunk's samples become pairs, and the provenance every row carries."""

    rule: str
    margin: float
    keep_truncated: bool
    model_sha256: str
    sampling: str  # JSON


@dataclass
class PairCounts:
    """What a chunk (or all of them, merged) gave: prompts, samples, samples dropped as cut at max_new_tokens or as
    text a preference row cannot hold (`unusable`: control characters, invalid UTF-8, which the cache would reject),
    samples scored, pairs, prompts that gave no pair, and sums of the rewards (for means)."""

    prompts: int = 0
    samples: int = 0
    truncated: int = 0
    unusable: int = 0
    scored: int = 0
    pairs: int = 0
    no_pair: int = 0
    reward_sum: float = 0.0
    chosen_reward_sum: float = 0.0
    rejected_reward_sum: float = 0.0

    def merge(self, other: PairCounts) -> PairCounts:
        return PairCounts(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def summary(self) -> dict[str, Any]:
        def mean(total: float, n: int) -> float | None:
            return total / n if n else None

        return {"prompts": self.prompts, "samples": self.samples, "truncated": self.truncated,
                "unusable": self.unusable, "scored": self.scored, "pairs": self.pairs,
                "prompts_without_pair": self.no_pair,
                "reward_mean": mean(self.reward_sum, self.scored),
                "chosen_reward_mean": mean(self.chosen_reward_sum, self.pairs),
                "rejected_reward_mean": mean(self.rejected_reward_sum, self.pairs)}


def _response(source: Any, text: str) -> Any:
    """A response in the format of its prompt: text, or one assistant message after prompt messages."""
    return [{"role": "assistant", "content": text}] if isinstance(source, list) else text


def pair_chunk(reward, chunk: SampledChunk, prompt_files: list[PromptFile], tok, out_uri: str,
               settings: PairSettings) -> PairCounts:
    """In a Ray worker (`engines.actors.RewardRunner`): one chunk of samples -> their rewards -> the pairs
    `settings.rule` keeps, written as rows at `out_uri` (none: no file). Returns the chunk's counts."""
    sampled = chunk.read(["prompt_index", "sample_index", "completion_ids", "finish_reason"])
    prompts = chunk_prompts(sampled, prompt_files, ["id", "prompt", "prompt_source"])
    index = sampled.column("prompt_index").to_pylist()
    finished = [settings.keep_truncated or reason == "stop" for reason in sampled.column("finish_reason").to_pylist()]
    texts = tok.batch_decode([sampled.column("completion_ids")[i].as_py() for i, ok in enumerate(finished) if ok],
                             skip_special_tokens=True)
    usable = [(i, text) for i, text in zip([i for i, ok in enumerate(finished) if ok], texts)
              if text_problem(text) is None]
    kept, completions = [i for i, _ in usable], [text for _, text in usable]
    sources = [json.loads(prompts[index[i]]["prompt_source"]) for i in kept]  # (a chat reward model renders them)
    rewards = np.asarray(reward([prompts[index[i]]["prompt"] for i in kept], completions, sources=sources),
                         np.float64) if kept else np.zeros(0)
    by_prompt: dict[int, list[tuple[int, str, float]]] = {}
    samples = sampled.column("sample_index").to_pylist()
    for i, text, r in zip(kept, completions, rewards.tolist()):
        by_prompt.setdefault(index[i], []).append((samples[i], text, r))
    rows: list[dict[str, Any]] = []
    counts = PairCounts(prompts=len(set(index)), samples=len(sampled), truncated=len(sampled) - len(texts),
                        unusable=len(texts) - len(kept), scored=len(kept), reward_sum=float(rewards.sum()))
    for p in sorted(set(index)):
        scored = by_prompt.get(p, [])
        picked = PAIR_RULES[settings.rule]([r for _, _, r in scored], settings.margin)
        counts.no_pair += not picked
        source = json.loads(prompts[p]["prompt_source"])
        for c, r in picked:
            (cs, ct, cr), (rs, rt, rr) = scored[c], scored[r]
            rows.append({"id": f"{prompts[p]['id']}-{cs}-{rs}", "prompt": source, "chosen": _response(source, ct),
                         "rejected": _response(source, rt), "prompt_id": prompts[p]["id"], "chosen_reward": cr,
                         "rejected_reward": rr, "chosen_sample": cs, "rejected_sample": rs,
                         "model_sha256": settings.model_sha256, "sampling": settings.sampling})
            counts.chosen_reward_sum += cr
            counts.rejected_reward_sum += rr
    counts.pairs = len(rows)
    if rows:
        write_table(out_uri, pa.Table.from_pylist(rows))
    return counts


def write_jsonl(uris: list[str], out_uri: str) -> int:
    """Ray task: Parquet files of pairs into one JSON Lines file, one file in memory at a time. Returns the rows."""
    store, name = split_uri(out_uri)
    store.makedirs()
    rows = 0
    with store.fs.open_output_stream(store.path(name)) as f:
        for uri in uris:
            for row in read_table(uri).to_pylist():
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode())
                rows += 1
    return rows
