"""Every causal-LM family through cache -> train -> checkpoint, as tiny random models of the real architectures.

Per family, one run covers: the cache (hf engine) equals an independent transformers forward; vLLM scores the
same rows to the same values (the engine a user caches with); 2 workers train 2 steps with step-1 loss ln 2; the
exported checkpoint loads in transformers with every weight, and in vLLM (swapped into the running engine, as
evaluation does) with log-probs equal to transformers. Llama itself is covered by test_train.py.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import ray
import torch
from transformers import AutoModelForCausalLM

from pipeline.engines.actors import CheckpointEngine
from pipeline.errors import UserError
from stages import cache, train
from tests.conftest import make_config, read_cache
from tests.families import FAMILIES, build_family

pytestmark = [pytest.mark.ray, pytest.mark.vllm]

STEPS = ("scoring.engine=hf", "train.global_batch_pairs=4", "train.micro_batch_pairs=2", "train.optim.lr=1e-3",
         "train.max_steps=2", "train.log_every=1", "train.checkpoint.every=2")
TWO_WORKERS = ("train.parallel.num_workers=2", "train.parallel.num_cpus_per_worker=0.5")


def hf_pair_logps(model_dir: Path, table) -> tuple[np.ndarray, np.ndarray]:
    """Summed response log-probs from a plain transformers forward (full log-softmax), pair by pair."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = {"chosen": [], "rejected": []}
    for row in table.to_pylist():
        prompt = row["prompt_input_ids"]
        for side in out:
            ids = torch.tensor([prompt + row[f"{side}_input_ids"]])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            token = logp.gather(-1, ids[0, 1:, None])[:, 0]
            out[side].append(float(token[len(prompt) - 1:].sum()))
    return np.array(out["chosen"]), np.array(out["rejected"])


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory, ray_local):
    """One family's model, cache and 2-worker training run: (name, model dir, cfg factory, cache rows, result)."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model_dir = build_family(root / "model", name)

    def config(run: str, *overrides: str):
        return make_config(model_dir, root, *STEPS, f"run_dir={root / run}", *overrides)
    rows = read_cache(cache.run(config("w2"))[0])
    return name, model_dir, config, rows, train.run(config("w2", *TWO_WORKERS))


def test_family_caches_trains_and_exports(family):
    name, model_dir, config, rows, result = family
    # The cache equals an independent transformers computation, per sequence.
    chosen, rejected = hf_pair_logps(model_dir, rows)
    np.testing.assert_allclose(rows.column("ref_chosen_logps").to_numpy(), chosen, atol=1e-4, rtol=0)
    np.testing.assert_allclose(rows.column("ref_rejected_logps").to_numpy(), rejected, atol=1e-4, rtol=0)
    # 2 workers trained 2 steps; step 1 is computed before any update: policy == reference.
    steps = metrics(result.run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    assert abs(steps[0]["loss"] - math.log(2)) < 1e-4, name
    assert math.isfinite(steps[1]["loss"]) and steps[1]["grad_norm"] > 0
    # The checkpoint loads in transformers with every weight (tied heads stay tied), and it was trained.
    ckpt = Path(result.checkpoints[-1])
    trained, info = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    start = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tied = start.get_output_embeddings().weight is start.get_input_embeddings().weight
    assert (trained.get_output_embeddings().weight is trained.get_input_embeddings().weight) == tied
    moved = max((p - q).abs().max().item() for p, q in zip(trained.parameters(), start.parameters()))
    assert moved > 1e-5


def test_family_scores_and_serves_checkpoints_in_vllm(family):
    name, model_dir, _, rows, result = family
    ckpt = result.checkpoints[-1]
    # One engine (a Ray actor, as the stages run it): the base model, then the checkpoint swapped in place.
    engine = ray.remote(CheckpointEngine).remote({"model_dir": str(model_dir), "dtype": "float32", "max_length": 128})
    pairs = rows.select(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
    try:
        base = ray.get(engine.score_pairs.remote(pairs))
        served = ray.get(engine.score_pairs.remote(pairs, ckpt))
    finally:
        ray.kill(engine)
    # Gemma-2's attention softcapping: vLLM's CPU attention kernel caps with its own tanh, measured up to 1e-2 per
    # sequence off on this random model (whose attention logits are far larger than a trained model's).
    atol = 2e-2 if name == "gemma2" else 1e-4
    np.testing.assert_allclose(base[0], rows.column("ref_chosen_logps").to_numpy(), atol=atol, rtol=0)
    np.testing.assert_allclose(base[1], rows.column("ref_rejected_logps").to_numpy(), atol=atol, rtol=0)
    want = hf_pair_logps(Path(ckpt), pairs)
    np.testing.assert_allclose(served[0], want[0], atol=atol, rtol=0)
    np.testing.assert_allclose(served[1], want[1], atol=atol, rtol=0)
    assert np.abs(served[0] - base[0]).max() > 1e-4  # the engine serves the trained weights, not the base's


def test_two_workers_equal_one_worker(family):
    """For the DPO paper's own families (GPT-2, Pythia): a 1-worker run gives the 2-worker run's weights."""
    name, _, config, _, two = family
    if name not in ("gpt2", "gpt_neox"):
        pytest.skip("checked on two non-Llama families")
    one = train.run(config("w1", "train.parallel.num_cpus_per_worker=1"))
    a = AutoModelForCausalLM.from_pretrained(one.checkpoints[-1], dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(two.checkpoints[-1], dtype=torch.float32)
    worst = max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))
    assert worst < 1e-5, f"{name}: max parameter difference {worst}"
    for x, y in zip(metrics(one.run_dir), metrics(two.run_dir)):
        assert abs(x["loss"] - y["loss"]) < 1e-5


def test_encoder_decoder_is_refused_before_anything_starts(tmp_path):
    model_dir = tmp_path / "t5"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(
        {"model_type": "t5", "architectures": ["T5ForConditionalGeneration"], "is_encoder_decoder": True}))
    with pytest.raises(UserError, match="encoder-decoder"):
        cache.run(make_config(model_dir, tmp_path))
