"""Length-grouped micro-batches (unit tier): a permutation of the rank's pairs, less padding, the same gradient."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import LossConfig
from pipeline.dpo.batching import by_length, collate
from pipeline.dpo.logprobs import selective_token_logps
from pipeline.dpo.losses import SequenceLogps, preference_loss


def _pairs(n: int, seed: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    ids = lambda lo, hi: [rng.integers(3, 60, rng.integers(lo, hi)).tolist() for _ in range(n)]  # noqa: E731
    return pa.table({"prompt_input_ids": pa.array(ids(2, 20), pa.list_(pa.int32())),
                     "chosen_input_ids": pa.array(ids(1, 30), pa.list_(pa.int32())),
                     "rejected_input_ids": pa.array(ids(1, 30), pa.list_(pa.int32())),
                     "ref_chosen_logps": rng.normal(-40, 5, n), "ref_rejected_logps": rng.normal(-40, 5, n)})


def _length(t: pa.Table) -> np.ndarray:
    rows = t.to_pylist()
    return np.array([len(r["prompt_input_ids"]) + max(len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))
                     for r in rows])


def test_by_length_is_a_sorted_permutation_that_pads_less():
    t = _pairs(32)
    s = by_length(t)
    assert sorted(map(str, s.to_pylist())) == sorted(map(str, t.to_pylist()))
    assert (np.diff(_length(s)) >= 0).all()
    padded = lambda tb: sum(collate(tb.slice(i, 4)).input_ids.numel() for i in range(0, 32, 4))  # noqa: E731
    assert padded(s) < padded(t)


def test_step_gradient_is_unchanged_by_the_grouping():
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)).double()
    t = _pairs(12, seed=1)

    def grad(table: pa.Table) -> torch.Tensor:
        lm.zero_grad()
        for i in range(0, 12, 4):  # micro-batches of 4 pairs, loss summed over the 12 pairs
            b = collate(table.slice(i, 4))
            sums = b.sequence_sums(selective_token_logps(lm, b.input_ids, b.attention_mask, b.score_mask).double())
            s = SequenceLogps(sums, torch.cat([b.ref_chosen, b.ref_rejected]), b.response_lengths.double())
            preference_loss([LossConfig()], s).losses.sum().backward()
        return torch.cat([p.grad.flatten() for p in lm.parameters()])

    g = grad(t)
    assert g.abs().sum() > 0
    assert torch.allclose(g, grad(by_length(t)), rtol=1e-9, atol=1e-12)
    assert (_length(t) != _length(by_length(t))).any()  # the grouping did reorder the pairs


def test_right_padded_rows_need_no_attention_mask():
    """Causal attention alone gives right-padded rows the same scored log-probs as the padding mask (what lets
    training and the hf scorer pass no mask and use the causal kernel)."""
    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1)).double()
    b = collate(_pairs(6, seed=2))
    assert (b.attention_mask == 0).any()  # some rows are padded
    masked = selective_token_logps(lm, b.input_ids, b.attention_mask, b.score_mask)
    causal = selective_token_logps(lm, b.input_ids, None, b.score_mask)
    assert masked.shape == causal.shape == (int(b.score_mask.sum()),)
    assert torch.allclose(masked, causal, rtol=0, atol=1e-10)
    # A left-padded row would differ: the check above is not vacuous.
    ids = torch.cat([torch.zeros(1, 3, dtype=torch.long), b.input_ids[:1, :-3]], 1)
    score = torch.cat([torch.zeros(1, 3, dtype=torch.bool), b.score_mask[:1, :-3]], 1)
    attn = torch.cat([torch.zeros(1, 3, dtype=torch.long), b.attention_mask[:1, :-3]], 1)
    assert not torch.allclose(selective_token_logps(lm, ids, attn, score), selective_token_logps(lm, ids, None, score))
