"""LoRA training (train.lora) on Ray Train + FSDP2 from the cache: adapters on a frozen sharded base, exported in
PEFT format (and merged when asked); the in-loop reference is the policy with its adapters off."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from pipeline.store.checkpoints import recorded_hash
from pipeline.store.fingerprint import model_files_hash
from stages import cache, train
from tests.conftest import DATA, copy_cache, make_config

pytestmark = pytest.mark.ray

# A global batch of 12 over the cache's 3 files: 3 lanes on 2 workers (one cut between them), 3 micro-batches each.
STEPS = ("scoring.engine=hf", "train.global_batch_pairs=12", "train.micro_batch_pairs=2", "train.optim.lr=5e-3",
         "train.max_steps=2", "train.log_every=1", "train.checkpoint.every=2", "train.lora.rank=8",
         "train.lora.alpha=16", "train.parallel.num_workers=2", "train.parallel.num_cpus_per_worker=0.5")


def metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in Path(run_dir, "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory, standard_cache):
    """The same 2 LoRA steps on 2 workers with the cached reference (merged exports on) and in the loop."""
    root = tmp_path_factory.mktemp("lora")
    copy_cache(standard_cache, root)

    def config(name: str, *overrides: str):
        return make_config(tiny_model, root, *STEPS, f"run_dir={root / name}", *overrides,
                           data=DATA / "standard.jsonl")
    cache.run(config("cached"))
    cached = config("cached", "train.lora.merge=true")
    in_loop = config("in_loop", "train.ref_logps=in_loop")
    return {"cached": (cached, train.run(cached)), "in_loop": (in_loop, train.run(in_loop))}


def test_lora_starts_at_the_reference_and_in_loop_equals_cached(runs):
    cached, in_loop = metrics(runs["cached"][0].run_dir), metrics(runs["in_loop"][0].run_dir)
    assert [r["step"] for r in cached] == [1, 2]
    assert abs(cached[0]["loss"] - math.log(2)) < 1e-4  # B = 0 at the start: policy == reference
    assert cached[1]["loss"] != pytest.approx(math.log(2), abs=1e-4)  # the adapters moved
    # The reference as "the policy with its adapters disabled" gives the cached reference's numbers.
    for a, b in zip(in_loop, cached):
        assert abs(a["loss"] - b["loss"]) < 1e-4
        assert abs(a["rewards/margins"] - b["rewards/margins"]) < 1e-4


def test_checkpoint_is_a_peft_adapter_with_its_merged_model(runs, tiny_model):
    ckpt = Path(runs["cached"][1].checkpoints[-1])
    assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
    assert not (ckpt / "config.json").exists()  # an adapter, not a full model
    saved = load_file(ckpt / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    assert any(".lora_B." in k and v.abs().max() > 0 for k, v in saved.items())  # trained (B starts at 0)
    assert recorded_hash(ckpt) == model_files_hash(ckpt, top_level=True)
    assert json.loads((ckpt / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model)
    # PeftModel loads it with every adapter weight, under the names peft itself saves.
    base = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(ckpt)).eval()
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45, 46, 2]])
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(ids).logits
    assert (adapted - plain).abs().max() > 1e-4
    # The merged model is base + adapters: the same logits as peft applying them.
    merged = AutoModelForCausalLM.from_pretrained(ckpt / "merged", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapted, atol=1e-4, rtol=0)
    # Only the adapters trained: the merged weights differ from the base only in adapted layers.
    untouched = {k for k, v in AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
                 .state_dict().items() if torch.equal(v, merged.state_dict()[k])}
    assert "model.embed_tokens.weight" in untouched and "model.norm.weight" in untouched
    assert "model.layers.0.self_attn.q_proj.weight" not in untouched
