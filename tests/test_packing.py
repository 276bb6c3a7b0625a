"""Padding-free packing (`train.packing`, pipeline/dpo/batching.py `collate_packed`), unit tier: rows hold several
sequences with position_ids restarting at each; every scored token's log-prob, every sequence's sum, LD-DPO's
tail sums, the loss and the gradient equal the padded path's, for each family whose attention transformers masks
by position_ids; token-budget micro-batches."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config

from pipeline.config import LossConfig
from pipeline.dpo.batching import collate, collate_packed, pack_rows
from pipeline.dpo.logprobs import selective_token_logps
from pipeline.dpo.metrics import StepSums
from pipeline.dpo.parallel import PolicyLogps
from pipeline.dpo.step import StepCompute, micro_batches, packing_mode
from pipeline.errors import UserError
from tests.test_batching import _pairs

FAMILIES = {
    "llama": LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32),
    "qwen2": Qwen2Config(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1),
    "gpt2": GPT2Config(vocab_size=64, n_embd=64, n_layer=2, n_head=2, n_positions=128),
    "pythia": GPTNeoXConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=128),
}


def _model(name: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[name], attn_implementation="sdpa").eval()


def test_rows_are_filled_first_fit_longest_first():
    assert pack_rows([5, 3, 7, 2, 4], 8) == [[2], [0, 1], [4, 3]]
    assert pack_rows([10, 3], 8) == [[0], [1]]  # a longer sequence gets a row of its own


def test_packed_batch_says_whose_each_scored_token_is():
    t = _pairs(6, seed=1)
    padded, packed = collate(t), collate_packed(t)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]
    assert packed.input_ids.shape[1] == padded.input_ids.shape[1]  # rows no longer than the longest sequence
    assert packed.tokens == padded.tokens and int(packed.score_mask.sum()) == int(padded.score_mask.sum())
    torch.testing.assert_close(packed.response_lengths, padded.response_lengths)
    # Each sequence's scored tokens, in order, are its response.
    for i in range(12):
        side, pair = ("chosen", i) if i < 6 else ("rejected", i - 6)
        got = packed.input_ids[packed.score_mask][packed.token_sequence == i].tolist()
        assert got == t.column(f"{side}_input_ids")[pair].as_py()
        assert packed.token_position[packed.token_sequence == i].tolist() == list(range(len(got)))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_log_probs_equal_padded(family):
    model = _model(family)
    t = _pairs(10, seed=2)
    padded, packed = collate(t), collate_packed(t)
    with torch.no_grad():
        want = selective_token_logps(model, padded.input_ids, None, padded.score_mask)
        got = selective_token_logps(model, packed.input_ids, None, packed.score_mask,
                                    position_ids=packed.position_ids)
    torch.testing.assert_close(packed.sequence_sums(got), padded.sequence_sums(want), rtol=0, atol=1e-5)
    torch.testing.assert_close(packed.tail_sums(got), padded.tail_sums(want), rtol=0, atol=1e-5)
    # The packing is real: without position_ids the rows' sequences would see each other.
    with torch.no_grad():
        leaked = selective_token_logps(model, packed.input_ids, None, packed.score_mask)
    assert (packed.sequence_sums(leaked) - padded.sequence_sums(want)).abs().max() > 1e-3


@pytest.mark.parametrize("terms", [[LossConfig(type="sigmoid", beta=0.1)],
                                   [LossConfig(type="sigmoid", beta=0.5, ld_alpha=0.5, wpo=True)]],
                         ids=["sigmoid", "ld-dpo+wpo"])
def test_packed_step_has_the_padded_loss_and_gradient(terms):
    t = _pairs(12, seed=3)
    if terms[0].ld_alpha is not None:  # LD-DPO reads the cached per-token reference log-probs
        from tests.test_step import _lm, _with_cached_tokens  # noqa: PLC0415
        t = _with_cached_tokens(t, _lm())
    results = []
    for packing, tokens in ((False, None), (True, None), (True, 120)):
        model = _model("llama").train()
        sums = StepSums()
        StepCompute(PolicyLogps(model, recompute_head=True), None, terms, pad_id=0, device="cpu",
                    packing=packing).accumulate(t, 5, sums, micro_batch_tokens=tokens)
        results.append((sums.reduce("cpu")["loss"], {k: p.grad for k, p in model.named_parameters()}))
    (want_loss, want), *others = results
    for loss, grads in others:
        assert loss == pytest.approx(want_loss, rel=1e-5)
        for k, g in want.items():
            torch.testing.assert_close(grads[k], g, rtol=1e-4, atol=1e-6, msg=k)


def test_token_budget_micro_batches():
    t = _pairs(9, seed=4)
    rows = t.to_pylist()
    size = [2 * len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) + len(r["rejected_input_ids"]) for r in rows]
    spans = micro_batches(t, 4, micro_batch_tokens=100)
    assert [i for i, _ in spans] == [sum(n for _, n in spans[:k]) for k in range(len(spans))]
    assert sum(n for _, n in spans) == 9
    for i, n in spans:
        assert n == 1 or sum(size[i:i + n]) <= 100
        if i + n < 9:
            assert sum(size[i:i + n + 1]) > 100  # filled: the next pair would not fit
    assert micro_batches(t, 4) == [(0, 4), (4, 4), (8, 1)]


def test_packing_is_refused_for_a_model_whose_attention_ignores_position_ids():
    t = _pairs(4, seed=5)
    sound = StepCompute(PolicyLogps(_model("llama")), None, [LossConfig()], pad_id=0, device="cpu", packing=True)
    sound.forward(t)
    assert sound._packing_checked
    model = _model("llama")
    leaky = StepCompute(PolicyLogps(_FullAttention(model)), None, [LossConfig()], pad_id=0, device="cpu",
                        packing=True)
    with pytest.raises(UserError, match="train.packing: _FullAttention's attention lets packed sequences see"):
        leaky.forward(t)
    # `auto` trains such a model padded instead, and says why; a sound model stays packed.
    auto = StepCompute(PolicyLogps(_FullAttention(model)), None, [LossConfig()], pad_id=0, device="cpu",
                       packing="auto")
    assert "_FullAttention's attention lets packed sequences see each other" in auto.check_packing()
    assert auto.packing is False
    padded = StepCompute(PolicyLogps(model), None, [LossConfig()], pad_id=0, device="cpu")
    assert torch.equal(auto.forward(t)[0].losses, padded.forward(t)[0].losses)
    sound = StepCompute(PolicyLogps(_model("llama")), None, [LossConfig()], pad_id=0, device="cpu", packing="auto")
    assert sound.check_packing() is None and sound.packing == "auto"


def test_packing_auto_packs_on_cpu_and_pads_on_gpu_until_measured_there():
    assert packing_mode("auto", "cpu") == "auto"
    assert packing_mode("auto", torch.device("cuda", 0)) is False
    assert packing_mode(True, "cuda") is True and packing_mode(False, "cpu") is False


class _FullAttention(torch.nn.Module):
    """A causal LM that drops position_ids: its packed sequences see each other."""

    def __init__(self, lm):
        super().__init__()
        self.lm, self.config = lm, lm.config

    def get_decoder(self):
        decoder = self.lm.get_decoder()
        return lambda position_ids=None, **kw: decoder(**kw)

    def get_output_embeddings(self):
        return self.lm.get_output_embeddings()


def test_the_packing_probe_is_not_fooled_by_dropout():
    """GPT-2 keeps dropout on under `train.dropout: true`: the probe runs without it, and leaves training mode on."""
    lm = _model("gpt2").train()  # GPT-2's configs ship with dropout 0.1
    assert any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in lm.modules())
    compute = StepCompute(PolicyLogps(lm), None, [LossConfig()], pad_id=0, device="cpu", packing=True)
    assert compute.check_packing() is None and compute.packing is True
    assert lm.training
