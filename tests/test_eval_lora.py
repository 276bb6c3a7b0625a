"""Stage 3 on LoRA adapter checkpoints: the reference and two adapters of it (ranks 4 and 12, different layers,
random non-zero A and B) evaluated on one vLLM engine of the reference model with LoRA on, each adapter a
`LoRARequest`. Log-probs (sampled and held-out) are checked against transformers + peft.

One engine start for the module (`eval.num_actors=1`); the reference log-probs use the transformers scorer.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from pipeline.engines.lora import allowed_rank
from stages import cache, evaluate
from tests.adapter_fixtures import make_adapter
from tests.conftest import DATA, copy_cache, make_config, read_cache, sequence_logps
from tests.test_eval_stage import _prompts, _samples

pytestmark = [pytest.mark.ray, pytest.mark.vllm]
pytest.importorskip("vllm")


def _seq_logps(base: Path, adapter: Path | None, sequences: list[list[int]], starts: list[int]) -> np.ndarray:
    """Independent computation: the base model with the adapter applied by peft, one unpadded forward per
    sequence, a full log-softmax, summed response tokens."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(adapter))
    return sequence_logps(model, sequences, starts)


@pytest.fixture(scope="module")
def scenario(tiny_model, tmp_path_factory, standard_cache):
    root = tmp_path_factory.mktemp("eval-lora")
    copy_cache(standard_cache, root)
    cfg = make_config(
        tiny_model, root, "scoring.engine=hf", f"data.eval.path={DATA / 'conversational.jsonl'}",
        "eval.num_prompts=6", "eval.samples_per_prompt=2", "eval.max_new_tokens=8", "eval.num_actors=1",
        "eval.batch_prompts=4", "eval.engine_kwargs={enforce_eager: true}")
    cache.run(cfg)
    ckpts = Path(cfg.run_dir) / "checkpoints"
    make_adapter(tiny_model, ckpts / "step_000001", rank=4, seed=1)
    make_adapter(tiny_model, ckpts / "step_000002", rank=8, seed=2, targets=("q_proj", "v_proj", "down_proj"),
                 rank_pattern={"down_proj": 12})
    return dict(cfg=cfg, result=evaluate.run(cfg))


def test_reference_and_adapters_share_one_engine(scenario):
    result = scenario["result"]
    assert result.failures == []
    assert sorted(result.evaluated) == ["reference", "step_000001", "step_000002"]
    assert result.engine_starts == 1
    assert allowed_rank(12) == 16 and allowed_rank(4) == 8 and allowed_rank(1) == 1  # the engine's max_lora_rank


@pytest.mark.parametrize("name", ["reference", "step_000001", "step_000002"])
def test_sampled_logps_equal_peft(scenario, tiny_model, name):
    cfg, result = scenario["cfg"], scenario["result"]
    t = _samples(result, name)
    ids = _prompts(result).column("prompt_input_ids").to_pylist()
    prompt_index = t.column("prompt_index").to_pylist()
    seqs = [ids[p] + c for p, c in zip(prompt_index, t.column("completion_ids").to_pylist())]
    starts = [len(ids[p]) for p in prompt_index]
    adapter = None if name == "reference" else Path(cfg.run_dir) / "checkpoints" / name
    policy = _seq_logps(tiny_model, adapter, seqs, starts)
    ref = _seq_logps(tiny_model, None, seqs, starts)
    np.testing.assert_allclose(t.column("logp").to_numpy(), policy, atol=1e-3)
    np.testing.assert_allclose(t.column("kl").to_numpy(), policy - ref, atol=2e-3)
    if adapter is not None:  # the adapter changes the log-probs: a test that ignored it would fail
        assert np.abs(policy - ref).max() > 0.1


def test_adapters_give_their_own_samples(scenario):
    result = scenario["result"]
    completions = {n: _samples(result, n).column("completion_ids").to_pylist()
                   for n in ("reference", "step_000001", "step_000002")}
    assert completions["step_000001"] != completions["step_000002"]
    assert completions["reference"] not in (completions["step_000001"], completions["step_000002"])


@pytest.mark.parametrize("name", ["step_000001", "step_000002"])
def test_held_out_logps_equal_peft(scenario, tiny_model, name):
    """Held-out pairs are scored by prompt log-probs under the adapter's `LoRARequest`."""
    cfg = scenario["cfg"]
    pairs = read_cache(cache.run(cfg)[1])
    held_out = pq.read_table(Path(scenario["result"].eval_dir) / name / "held_out.parquet")
    prompts = pairs.column("prompt_input_ids").to_pylist()
    adapter = Path(cfg.run_dir) / "checkpoints" / name
    for side in ("chosen", "rejected"):
        seqs = [p + r for p, r in zip(prompts, pairs.column(f"{side}_input_ids").to_pylist())]
        expected = _seq_logps(tiny_model, adapter, seqs, [len(p) for p in prompts])
        got = held_out.column(f"policy_{side}_logps").to_numpy()
        np.testing.assert_allclose(got, expected, atol=1e-3)
        assert np.abs(got - pairs.column(f"ref_{side}_logps").to_numpy()).max() > 0.1
