"""Stage 3's numbers per target and across targets, apart from the engines that produce their inputs.

    samples_table, target_stats          one target's per-sample rows (log π, log π_ref, KL, reward) and statistics
    preference_metrics                   DPO's implicit-reward accuracy on held-out pairs
    chosen_rewards                       rewards of the dataset's chosen responses (a win-rate baseline)
    summary_rows                         every target evaluated with given settings, with win rates
    report_settings                      the evaluation settings the report shows
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.config import Config
from pipeline.evaluation.inputs import Prompts
from pipeline.evaluation.report import SUMMARY_COLUMNS, standard_error, win_rate
from pipeline.store.fingerprint import sha256_json
from pipeline.store.storage import Store

# ---------------------------------------------------------------- one target


def samples_table(sampled: pa.Table, prompt_texts: list[str], completions: list[str], ref_logps: list[np.ndarray],
                  rewards: np.ndarray | None) -> pa.Table:
    """The sampled rows with their prompt and completion texts, per-token reference log-probs, and per sample
    log π, log π_ref, the KL estimate and the reward (NaN without a reward)."""
    logp = np.array([np.asarray(v, np.float64).sum() for v in sampled.column("token_logps").to_pylist()])
    ref_logp = np.array([v.astype(np.float64).sum() for v in ref_logps])
    kl = logp - ref_logp  # Σ_t log π(y_t|·) − log π_ref(y_t|·) over the sampled tokens: an unbiased KL estimate
    prompt_index = sampled.column("prompt_index").to_numpy()
    table = sampled.append_column("prompt", pa.array([prompt_texts[i] for i in prompt_index], pa.string()))
    table = table.append_column("completion", pa.array(completions, pa.string()))
    table = table.append_column("ref_token_logps", pa.array(ref_logps, pa.list_(pa.float32())))
    for name, values in (("logp", logp), ("ref_logp", ref_logp), ("kl", kl),
                         ("reward", rewards if rewards is not None else np.full(len(sampled), np.nan))):
        table = table.append_column(name, pa.array(values, pa.float64()))
    return table


def target_stats(samples: pa.Table, num_prompts: int, rewards: np.ndarray | None, sampling: dict[str, Any],
                 preference: dict[str, Any] | None) -> dict[str, Any]:
    """A target's summary statistics from its `samples_table`, its rewards, its sampling record (`sampling_s`,
    `tokens`) and its `preference_metrics` (None without held-out pairs)."""
    kl = samples.column("kl").to_numpy()
    completion_tokens = pc.list_value_length(samples.column("completion_ids")).to_numpy()
    stats: dict[str, Any] = {
        "samples": len(samples), "prompts": num_prompts, "completion_tokens_mean": float(completion_tokens.mean()),
        "truncated_frac": float(np.mean([r == "length" for r in samples.column("finish_reason").to_pylist()])),
        "reward_mean": float(rewards.mean()) if rewards is not None else None,
        "reward_se": standard_error(rewards) if rewards is not None else None,
        "kl_mean": float(kl.mean()), "kl_se": standard_error(kl),
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


# ---------------------------------------------------------------- across targets


def chosen_rewards(store: Store, prompts: Prompts, tok, reward: Callable, reward_id: dict[str, Any]) -> np.ndarray:
    """Rewards of the dataset's chosen responses (NaN where a prompt has none); recorded in
    `<store>/chosen_rewards.json` under their key and reused while it matches."""
    key = sha256_json({"prompts": prompts.sha256, "reward": reward_id})
    if store.exists("chosen_rewards.json") and store.read_json("chosen_rewards.json")["key"] == key:
        return np.asarray(store.read_json("chosen_rewards.json")["rewards"], np.float64)
    have = [i for i, c in enumerate(prompts.chosen) if c is not None]
    out = np.full(len(prompts.ids), np.nan)
    if have:
        texts = tok.batch_decode([prompts.chosen[i] for i in have], skip_special_tokens=True)
        out[have] = np.asarray(reward([prompts.texts[i] for i in have], texts), np.float64)
    store.write_json("chosen_rewards.json", {"key": key, "rewards": [None if np.isnan(v) else v for v in out]})
    return out


def summary_rows(eval_store: Store, settings_key: str, baseline: str,
                 chosen: np.ndarray | None) -> list[dict[str, Any]]:
    """Summary rows (SUMMARY_COLUMNS) of every target under `eval_store` evaluated with these settings, with win
    rates against the baseline: the reference's samples (`baseline="reference_model"`, paired by prompt and sample) or
    the chosen responses' rewards (`chosen`)."""
    results = _results(eval_store, settings_key)
    base = None
    if baseline == "reference_model":
        reference = next((store for result, store in results if result["is_reference"]), None)
        if reference is not None:
            base = _rewards(reference)
    rows = []
    for result, store in results:
        row = {"name": result["name"], "path": result["path"], "step": result["step"], **result["stats"],
               "win_rate": None, "win_rate_se": None}
        if result["stats"]["reward_mean"] is not None:
            pair = _paired_rewards(_rewards(store), base, chosen)
            if pair is not None and len(pair[0]):
                row["win_rate"], row["win_rate_se"] = win_rate(*pair)
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


def _rewards(target: Store) -> pa.Table:
    return target.read_parquet("samples.parquet").select(["prompt_index", "sample_index", "reward"])


def _paired_rewards(rewards: pa.Table, base: pa.Table | None,
                    chosen: np.ndarray | None) -> tuple[np.ndarray, np.ndarray] | None:
    """(target rewards, baseline rewards) paired for a win rate, or None without a baseline."""
    if base is not None:
        joined = rewards.join(base, ["prompt_index", "sample_index"], right_suffix="_base")
        return joined.column("reward").to_numpy(), joined.column("reward_base").to_numpy()
    if chosen is not None:
        baseline = chosen[rewards.column("prompt_index").to_numpy()]
        keep = ~np.isnan(baseline)
        return rewards.column("reward").to_numpy()[keep], baseline[keep]
    return None


def report_settings(cfg: Config, num_prompts: int) -> dict[str, Any]:
    """The evaluation settings the report shows (and summary.json stores)."""
    e, r = cfg.eval, cfg.eval.reward
    described = "none" if r is None else (r.rule if r.type == "rule" else r.function if r.type == "callable"
                                          else r.model)
    return {"prompts": num_prompts, "samples_per_prompt": e.samples_per_prompt,
            "max_new_tokens": e.max_new_tokens, "temperature": e.temperature, "top_p": e.top_p, "seed": e.seed,
            "reward": f"{r.type}: {described}" if r else "none", "baseline": e.win_rate_baseline,
            "reference_engine": cfg.scoring.engine}
