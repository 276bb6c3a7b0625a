"""The training memory plan (pipeline/dpo/memory.py): the model's sizes read exactly off its config.json, each term
its formula, and `plan` showing it. Measured against real peaks: benchmarks/memory_plan.py, docs/MEMORY.md."""

from __future__ import annotations

import pytest
from transformers import LlamaConfig

from pipeline.config import load_config
from pipeline.dpo import memory
from pipeline.dpo.memory import model_shape, training_memory

H, MLP, L, V, HEADS, KV_HEADS = 64, 96, 3, 500, 4, 2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=MLP, num_hidden_layers=L, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS, tie_word_embeddings=False).save_pretrained(path)
    return str(path)


def train_cfg(*overrides: str):
    cfg = load_config(None, ["model.path=/m", "data.train.path=/d.jsonl", "data.max_length=100",
                             "data.max_prompt_length=20", "train.global_batch_pairs=4", "train.micro_batch_pairs=2",
                             "train.parallel.num_workers=2", *overrides])
    return cfg.train


def test_the_shape_is_the_models_exact_sizes(model_dir):
    s = model_shape(model_dir)
    kv = KV_HEADS * H // HEADS
    block = H * H * 2 + H * kv * 2 + 3 * H * MLP + 2 * H  # q, o; k, v; gate, up, down; two norms
    root = 2 * V * H + H  # embeddings, head (untied), final norm
    assert (s.block_params, s.root_params, s.params) == (block, root, L * block + root)
    assert (s.trainable, s.layers, s.hidden, s.kv_width, s.intermediate, s.vocab) == (s.params, L, H, kv, MLP, V)


def test_the_skeleton_is_built_once_per_config_and_settings(tmp_path, monkeypatch):
    """`run` asks for the shape three times (cache plan, training plan, training): one skeleton is built, again
    only when config.json or the LoRA settings change."""
    LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=MLP, num_hidden_layers=L, num_attention_heads=HEADS,
                num_key_value_heads=KV_HEADS).save_pretrained(tmp_path)
    built = []
    real = memory.empty_causal_lm
    monkeypatch.setattr(memory, "empty_causal_lm", lambda *a, **k: built.append(a[0]) or real(*a, **k))
    first = model_shape(str(tmp_path))
    assert model_shape(str(tmp_path)) == first and len(built) == 1
    lora = train_cfg("train.lora.rank=4").lora
    assert model_shape(str(tmp_path), lora).trainable < first.trainable and len(built) == 2
    LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=MLP, num_hidden_layers=L + 1,
                num_attention_heads=HEADS, num_key_value_heads=KV_HEADS).save_pretrained(tmp_path)
    assert model_shape(str(tmp_path)).layers == L + 1 and len(built) == 3


def test_each_term_is_its_formula(model_dir):
    s = model_shape(model_dir)
    tokens = 2 * 2 * 100  # micro-batch pairs x 2 sequences x max_length
    per_token_layer = 6 * H + 2 * s.kv_width + 4 * MLP
    plan = training_memory(s, train_cfg(), 100)  # CPU workers: fp32 compute (4 bytes)
    terms = {t.name: t.bytes for t in plan.terms}
    assert terms["parameters"] == 4 * s.params / 2 and terms["gradients"] == 4 * s.params / 2
    assert terms["optimizer"] == 8 * s.params / 2
    assert terms["gathered blocks"] == 4 * (s.root_params + 3 * s.block_params)
    assert terms["activations"] == L * per_token_layer * tokens * 4
    assert terms["LM head"] == 3 * 4 * V * min(4096, (1 << 24) // V, tokens)
    during = 4 * s.root_params + 12 * s.block_params  # the root's gradients; a block's, cast, and the next one's
    at_end = 12 * s.root_params - terms["activations"] - terms["LM head"]  # root cast to fp32, gloo's whole copy
    assert terms["gradients in flight"] == max(during, at_end)
    assert plan.total == sum(terms.values()) and plan.device == "CPU" and not plan.host
    checkpointed = {t.name: t.bytes for t in training_memory(
        s, train_cfg("train.parallel.activation_checkpointing=true"), 100).terms}
    assert checkpointed["activations"] == (L * H + per_token_layer) * tokens * 4
    gpu = training_memory(s, train_cfg("train.parallel.use_gpu=true"), 100)  # bf16 compute by default
    assert {t.name: t.bytes for t in gpu.terms}["gathered blocks"] == 2 * (s.root_params + 3 * s.block_params)
    assert gpu.line().startswith(f"{gpu.total / 1e9:.3g} GB per GPU worker (parameters {2 * s.params / 1e9:.3g}, ")


def test_lora_offload_and_in_loop_reference(model_dir):
    full = model_shape(model_dir)
    lora = model_shape(model_dir, train_cfg("train.lora.rank=8").lora)
    assert lora.trainable == lora.params - full.params > 0  # only the adapters train (the base is frozen)
    terms = {t.name: t.bytes for t in training_memory(lora, train_cfg("train.lora.rank=8"), 100).terms}
    assert terms["optimizer"] == 8 * lora.trainable / 2
    offloaded = training_memory(full, train_cfg("train.parallel.use_gpu=true", "train.parallel.cpu_offload=true"), 100)
    assert {t.name for t in offloaded.host} == {"parameters", "gradients", "optimizer"}
    assert not {t.name for t in offloaded.terms} & {"parameters", "gradients", "optimizer"}
    in_loop = training_memory(full, train_cfg("train.ref_logps=in_loop"), 100)
    assert {t.name: t.bytes for t in in_loop.terms}["in-loop reference"] == \
        4 * (full.params / 2 + full.root_params + 3 * full.block_params)
    assert in_loop.largest().name in {t.name for t in in_loop.terms}


def test_the_plan_shows_each_workers_memory(tiny_model, tmp_path):
    from pipeline.orchestrate import plan
    from tests.conftest import make_config

    (train_step,) = [s for s in plan(make_config(tiny_model, tmp_path), evaluate=False) if s.stage == "train"]
    assert "; memory " in train_step.why and " GB per CPU worker (parameters " in train_step.why, train_step.why


def test_a_gpu_scorers_weights_and_prompt_logprob_transient(model_dir, tiny_model, tmp_path):
    from pipeline.dpo.memory import scorer_memory
    from pipeline.orchestrate import plan
    from tests.conftest import make_config

    s = model_shape(model_dir)
    line = scorer_memory(s, "bfloat16", 2, 1000)
    assert line == (f"weights {2 * s.params / 2 / 1e9:.1f} GB per GPU inside gpu_memory_utilization, prompt "
                    f"log-probs up to {10 * 1000 * V / 1e9:.1f} GB beyond it")
    steps = plan(make_config(tiny_model, tmp_path, "scoring.engine=vllm", "scoring.use_gpu=true"), evaluate=False)
    assert "; each engine: weights " in steps[0].why, steps[0].why  # cache/train, to be scored on GPUs
    steps = plan(make_config(tiny_model, tmp_path, "scoring.engine=vllm"), evaluate=False)
    assert "each engine" not in steps[0].why  # CPU engines: vLLM's CPU KV cache is scoring.cpu_kv_cache_gb


def test_a_plan_that_cannot_fit_the_gpu_stops_naming_its_largest_part(model_dir, tiny_model, tmp_path):
    from pipeline.dpo.memory import check_fits
    from pipeline.errors import UserError
    from pipeline.orchestrate import plan
    from tests.conftest import make_config

    gpu = training_memory(model_shape(model_dir), train_cfg("train.parallel.use_gpu=true"), 100)
    check_fits(gpu, gpu.total / 1e9 * 1.01)  # fits
    check_fits(training_memory(model_shape(model_dir), train_cfg(), 100), 1e-6)  # CPU workers: not a GPU plan
    big = gpu.largest()
    assert big.name == "LM head" and big.shrink.startswith("a smaller micro-batch")  # recompute_head is on already
    with pytest.raises(UserError, match=r"^training needs about .* GB per GPU, more than its 1e-06 GB; the largest "
                                        r"part is LM head \(.* GB\): shrink it with a smaller micro-batch"):
        check_fits(gpu, 1e-6)
    unchecked = {t.name: t.shrink for t in training_memory(model_shape(model_dir), train_cfg(), 100).terms}
    assert unchecked["activations"].startswith("train.parallel.activation_checkpointing: true, or a smaller")
    assert unchecked["gathered blocks"] == "train.parallel.param_dtype: bfloat16"  # fp32 compute
    with pytest.raises(UserError, match="more than its 0.001 GB"):  # `plan` and `run` stop before anything starts
        plan(make_config(tiny_model, tmp_path, "train.parallel.use_gpu=true", "train.parallel.gpu_memory_gb=0.001"),
             evaluate=False)
