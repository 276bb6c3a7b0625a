"""Stage 3's numbers per target and across targets, apart from the engines that produce their inputs.

    finish_chunk, samples_table          a chunk of one target's per-sample rows (log π, log π_ref, KL, reward),
                                         written where it is computed, and its `ChunkStats`
    target_stats                         a target's statistics from its merged `ChunkStats`
    preference_metrics                   DPO's implicit-reward accuracy on held-out pairs
    write_chosen_rewards                 rewards of the dataset's chosen responses (a win-rate baseline)
    win_rate_jobs, record_win_rate       each target's win rate, computed from the sample files in a Ray task
    summary_rows                         every target evaluated with given settings, with win rates

The functions that read samples run in Ray workers; the driver passes file URIs and gets back aggregates.
    report_settings                      the evaluation settings the report shows
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import EvalConfig
from pipeline.engines.chunks import (
    PromptChunk,
    PromptFile,
    SampledChunk,
    chunk_prompts,
    prompt_sources,
    read_pairs,
    read_table,
    split_uri,
    write_table,
)
from pipeline.evaluation.inputs import Prompts
from pipeline.evaluation.report import SUMMARY_COLUMNS, win_rate
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store

# ---------------------------------------------------------------- one target


def samples_table(sampled: pa.Table, prompt_texts, completions: list[str], ref_logps: list[np.ndarray],
                  rewards: np.ndarray | None) -> pa.Table:
    """The sampled rows with their prompt (`prompt_texts[prompt_index]`) and completion texts, per-token
    reference log-probs, and per sample log π, log π_ref, the KL estimate and the reward (NaN without a reward)."""
    logp = np.array([np.asarray(v, np.float64).sum() for v in sampled.column("token_logps").to_pylist()])
    ref_logp = np.array([v.astype(np.float64).sum() for v in ref_logps])
    kl = logp - ref_logp  # Σ_t log π(y_t|·) − log π_ref(y_t|·) over the sampled tokens: an unbiased KL estimate
    prompt_index = sampled.column("prompt_index").to_pylist()
    table = sampled.append_column("prompt", pa.array([prompt_texts[i] for i in prompt_index], pa.string()))
    table = table.append_column("completion", pa.array(completions, pa.string()))
    table = table.append_column("ref_token_logps", pa.array(ref_logps, pa.list_(pa.float32())))
    for name, values in (("logp", logp), ("ref_logp", ref_logp), ("kl", kl),
                         ("reward", rewards if rewards is not None else np.full(len(sampled), np.nan))):
        table = table.append_column(name, pa.array(values, pa.float64()))
    return table


@dataclass
class Moments:
    """Count, mean and sum of squared deviations of some values; chunks merge exactly (Chan et al.), so a
    target's mean and standard error come from per-chunk figures, never from all its values in one place."""

    n: int = 0
    mean: float = 0.0
    m2: float = 0.0

    @classmethod
    def of(cls, values: np.ndarray) -> Moments:
        x = np.asarray(values, np.float64)
        return cls(len(x), float(x.mean()), float(((x - x.mean()) ** 2).sum())) if len(x) else cls()

    def merge(self, other: Moments) -> Moments:
        n = self.n + other.n
        if not n:
            return Moments()
        delta = other.mean - self.mean
        return Moments(n, self.mean + delta * other.n / n, self.m2 + other.m2 + delta ** 2 * self.n * other.n / n)

    @property
    def standard_error(self) -> float | None:
        """As `report.standard_error`: sample std (ddof=1) / sqrt(n); None for fewer than 2 values."""
        return math.sqrt(self.m2 / (self.n - 1)) / math.sqrt(self.n) if self.n >= 2 else None


@dataclass
class ChunkStats:
    """What a target's statistics need from a chunk of its samples (all that comes back to the driver)."""

    samples: int = 0
    completion_tokens: int = 0
    truncated: int = 0
    kl: Moments = field(default_factory=Moments)
    reward: Moments | None = None

    def merge(self, other: ChunkStats) -> ChunkStats:
        reward = other.reward if self.reward is None else self.reward if other.reward is None \
            else self.reward.merge(other.reward)
        return ChunkStats(self.samples + other.samples, self.completion_tokens + other.completion_tokens,
                          self.truncated + other.truncated, self.kl.merge(other.kl), reward)


def finish_chunk(reward, chunk: SampledChunk, prompt_files: list[PromptFile], ref_uri: str, tok,
                 out_uri: str) -> ChunkStats:
    """In a Ray worker (see `engines.actors.RewardRunner`): one chunk of a target's sampled rows with their
    texts, reference log-probs (`ref_uri`, the cache entry) and rewards, as `samples_table` rows at `out_uri`.
    Returns the chunk's `ChunkStats`."""
    sampled = chunk.read()
    prompts = chunk_prompts(sampled, prompt_files, ["prompt", "prompt_source"])
    texts = {i: row["prompt"] for i, row in prompts.items()}
    completions = tok.batch_decode(sampled.column("completion_ids").to_pylist(), skip_special_tokens=True)
    rewards = None
    if reward is not None:
        index = sampled.column("prompt_index").to_pylist()
        sources = prompt_sources([prompts[i]["prompt_source"] for i in index])
        rewards = np.asarray(reward([texts[i] for i in index], completions, sources=sources), np.float64)
    ref_logps = [np.asarray(v, np.float32) for v in read_table(ref_uri).column("ref_token_logps").to_pylist()]
    samples = samples_table(sampled, texts, completions, ref_logps, rewards)
    write_table(out_uri, samples)
    finish = samples.column("finish_reason").to_pylist()
    return ChunkStats(len(samples), int(pc.sum(pc.list_value_length(samples.column("completion_ids"))).as_py() or 0),
                      sum(r == "length" for r in finish), Moments.of(samples.column("kl").to_numpy()),
                      Moments.of(rewards) if rewards is not None else None)


def target_stats(chunks: ChunkStats, num_prompts: int, sampling: dict[str, Any],
                 preference: dict[str, Any] | None) -> dict[str, Any]:
    """A target's summary statistics from its samples' merged `ChunkStats`, its sampling record (`sampling_s`,
    `tokens`) and its `preference_metrics` (None without held-out pairs)."""
    n, reward = chunks.samples, chunks.reward
    stats: dict[str, Any] = {
        "samples": n, "prompts": num_prompts, "completion_tokens_mean": chunks.completion_tokens / n if n else None,
        "truncated_frac": chunks.truncated / n if n else None,
        "reward_mean": reward.mean if reward is not None else None,
        "reward_se": reward.standard_error if reward is not None else None,
        "kl_mean": chunks.kl.mean, "kl_se": chunks.kl.standard_error,
        "pref_accuracy": None, "pref_margin_mean": None, "pref_pairs": None,
        "sampling_s": sampling["sampling_s"],
        "sampling_tokens_per_s": sampling["tokens"] / sampling["sampling_s"] if sampling["sampling_s"] else None}
    if preference is not None:
        stats.update(preference)
    return stats


def preference_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta: float) -> dict[str, Any]:
    """DPO's implicit reward r = β (log π − log π_ref) on held-out pairs: accuracy = P(r_chosen > r_rejected)."""
    margins = beta * ((np.asarray(policy_chosen) - ref_chosen) - (np.asarray(policy_rejected) - ref_rejected))
    return {"pref_accuracy": float((margins > 0).mean()) if len(margins) else None,
            "pref_margin_mean": float(margins.mean()) if len(margins) else None, "pref_pairs": int(len(margins))}


def held_out_preference(policy_uri: str, cache_files: list[str], beta: float) -> dict[str, Any]:
    """Ray task: `preference_metrics` from a target's held-out log-probs (written by its engine) and the cache's
    reference log-probs."""
    policy = read_table(policy_uri)
    ref = read_pairs(cache_files, ["ref_chosen_logps", "ref_rejected_logps"])
    return preference_metrics(policy.column("policy_chosen_logps").to_numpy(),
                              policy.column("policy_rejected_logps").to_numpy(),
                              ref.column("ref_chosen_logps").to_numpy(), ref.column("ref_rejected_logps").to_numpy(),
                              beta)


# ---------------------------------------------------------------- across targets


def chosen_rewards_key(prompts: Prompts, reward_id: dict[str, Any]) -> str:
    return sha256_json({"prompts": prompts.sha256, "reward": reward_id})


def chosen_rewards_current(store: Store, key: str) -> bool:
    return store.exists("chosen_rewards.json") and store.read_json("chosen_rewards.json")["key"] == key


def write_chosen_rewards(reward, prompt_files: list[PromptFile], tok, out_uri: str, key: str) -> None:
    """In a Ray worker: rewards of the dataset's chosen responses (null where a prompt has none) into
    `chosen_rewards.json` under their key (reused while it matches, see `chosen_rewards_current`)."""
    rows = pa.concat_tables([PromptChunk(f.uri, 0, f.rows, f.first).read(["prompt", "prompt_source",
                                                                           "chosen_input_ids"])
                             for f in prompt_files])
    chosen = rows.column("chosen_input_ids").to_pylist()
    have = [i for i, c in enumerate(chosen) if c is not None]
    out = np.full(len(chosen), np.nan)
    if have:
        texts = tok.batch_decode([chosen[i] for i in have], skip_special_tokens=True)
        prompts, sources = rows.column("prompt").to_pylist(), rows.column("prompt_source").to_pylist()
        out[have] = np.asarray(reward([prompts[i] for i in have], texts,
                                      sources=prompt_sources([sources[i] for i in have])), np.float64)
    store, name = split_uri(out_uri)
    store.write_json(name, {"key": key, "rewards": [None if np.isnan(v) else v for v in out]})


@dataclass(frozen=True)
class WinRateJob:
    """A target's win rate to compute: its samples, the baseline (the reference's samples or the chosen
    responses' rewards) and the key its `win_rate.json` is recorded under."""

    target: str  # the target's results directory
    samples: str
    base_samples: str | None
    chosen: str | None
    key: str


def _baseline(results: list[tuple[dict[str, Any], Store]], baseline: str,
              chosen_key: str | None) -> tuple[str, str | None] | None:
    """(the baseline's key, the reference's results directory or None for the chosen responses), or None when
    there is no baseline (no reference result, no chosen rewards)."""
    if baseline == "reference_model":
        return next(((r["key"], s.uri) for r, s in results if r["is_reference"]), None)
    return (chosen_key, None) if chosen_key is not None else None


def _win_rate_key(result: dict[str, Any], baseline: str, base: tuple[str, str | None]) -> str:
    return sha256_json({"target": result["key"], "baseline": baseline, "base": base[0]})


def win_rate_jobs(eval_store: Store, settings_key: str, baseline: str, chosen_key: str | None) -> list[WinRateJob]:
    """The win rates of `summary_rows` not yet recorded for the current baseline."""
    results = _results(eval_store, settings_key)
    base = _baseline(results, baseline, chosen_key)
    jobs = []
    for result, store in results:
        if result["stats"]["reward_mean"] is None or base is None:
            continue
        key = _win_rate_key(result, baseline, base)
        if store.exists("win_rate.json") and store.read_json("win_rate.json")["key"] == key:
            continue
        jobs.append(WinRateJob(store.uri, f"{store.uri}/samples.parquet",
                               f"{base[1]}/samples.parquet" if base[1] else None,
                               None if base[1] else f"{eval_store.uri}/chosen_rewards.json", key))
    return jobs


def record_win_rate(job: WinRateJob) -> None:
    """Ray task: the target's paired win rate against its baseline into `<target>/win_rate.json`."""
    rewards = read_table(job.samples, ["prompt_index", "sample_index", "reward"])
    if job.base_samples is not None:
        joined = rewards.join(read_table(job.base_samples, ["prompt_index", "sample_index", "reward"]),
                              ["prompt_index", "sample_index"], right_suffix="_base")
        mine, base = joined.column("reward").to_numpy(), joined.column("reward_base").to_numpy()
    else:
        store, name = split_uri(job.chosen)
        chosen = np.asarray([np.nan if v is None else v for v in store.read_json(name)["rewards"]], np.float64)
        baseline = chosen[rewards.column("prompt_index").to_numpy()]
        keep = ~np.isnan(baseline)
        mine, base = rewards.column("reward").to_numpy()[keep], baseline[keep]
    value, se = win_rate(mine, base) if len(mine) else (None, None)
    Store(job.target).write_json("win_rate.json", {"key": job.key, "win_rate": value, "win_rate_se": se})


def summary_rows(eval_store: Store, settings_key: str, baseline: str, chosen_key: str | None) -> list[dict[str, Any]]:
    """Summary rows (SUMMARY_COLUMNS) of every target under `eval_store` evaluated with these settings, with
    their win rates against the current baseline as recorded by `record_win_rate` (none without a baseline)."""
    results = _results(eval_store, settings_key)
    base = _baseline(results, baseline, chosen_key)
    rows = []
    for result, store in results:
        row = {"name": result["name"], "path": result["path"], "step": result["step"], **result["stats"],
               "win_rate": None, "win_rate_se": None}
        if result["stats"]["reward_mean"] is not None and base is not None and store.exists("win_rate.json"):
            recorded = store.read_json("win_rate.json")
            if recorded["key"] == _win_rate_key(result, baseline, base):
                row["win_rate"], row["win_rate_se"] = recorded["win_rate"], recorded["win_rate_se"]
        rows.append({k: row.get(k) for k in SUMMARY_COLUMNS})
    return rows


def _results(eval_store: Store, settings_key: str) -> list[tuple[dict[str, Any], Store]]:
    """(result.json, its directory) of every target evaluated with these settings, by name."""
    results = []
    for name in sorted(eval_store.listdir()):
        store = eval_store.child(name)
        result = store.read_json("result.json") if store.exists("result.json") else None
        if result is not None and result["settings_key"] == settings_key:
            results.append((result, store))
    return results


def report_settings(e: EvalConfig, reference_engine: str, num_prompts: int) -> dict[str, Any]:
    """The evaluation settings the report shows (and summary.json stores)."""
    r = e.reward
    described = "none" if r is None else (r.rule if r.type == "rule" else r.function if r.type == "callable"
                                          else r.model)
    return {"prompts": num_prompts, "samples_per_prompt": e.samples_per_prompt,
            "max_new_tokens": e.max_new_tokens, "temperature": e.temperature, "top_p": e.top_p, "seed": e.seed,
            "reward": f"{r.type}: {described}" if r else "none", "baseline": e.win_rate_baseline,
            "reference_engine": reference_engine}
