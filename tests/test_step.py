"""The training step without Ray (pipeline/dpo/step.py): FSDP2 (one reduce-scatter per step on one rank, one per
micro-batch on two: that check runs in test_parallel.py's two-rank processes) and torch.compile'd blocks compute the
gradient of the plain formula."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import LossConfig
from pipeline.dpo.batching import collate
from pipeline.dpo.logprobs import selective_token_logps
from pipeline.dpo.metrics import StepSums
from pipeline.dpo.parallel import PolicyLogps, apply_fsdp
from pipeline.dpo.step import StepCompute
from tests.test_batching import _pairs

LOSS = LossConfig(type="sigmoid", beta=0.1)


@pytest.fixture()
def process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _lm():
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, head_dim=32))


def reference_grads(pairs) -> tuple[float, dict[str, torch.Tensor]]:
    """The mean DPO loss over all pairs in one padded batch, with the attention mask, by the formula."""
    lm = _lm()
    b = collate(pairs)
    logits = lm(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.float()
    logps = torch.log_softmax(logits[:, :-1], -1).gather(-1, b.input_ids[:, 1:, None])[..., 0]
    sums = (logps * b.score_mask[:, 1:]).sum(1)
    n = b.pairs
    h = (sums[:n] - b.ref_chosen.float()) - (sums[n:] - b.ref_rejected.float())
    loss = -F.logsigmoid(LOSS.beta * h).mean()
    loss.backward()
    return float(loss.detach()), {k: p.grad for k, p in lm.named_parameters()}


@pytest.mark.parametrize("compile_blocks, recompute_head", [
    pytest.param(False, False, id="eager"),
    pytest.param(True, False, id="compiled", marks=pytest.mark.subprocess),  # inductor compiles in worker processes
    pytest.param(False, True, id="recomputed-head")])
def test_fsdp_step_gradient_equals_the_formula(process_group, compile_blocks, recompute_head):
    pairs = _pairs(12, seed=3)
    want_loss, want = reference_grads(pairs)
    policy = apply_fsdp(PolicyLogps(_lm(), recompute_head), torch.float32, compile_blocks=compile_blocks)
    sums = StepSums()
    StepCompute(policy, None, [LOSS], pad_id=0, device="cpu").accumulate(pairs, 5, sums)  # micro-batches 5, 5, 2
    m = sums.reduce("cpu")
    assert m["pairs"] == 12
    assert m["loss"] == pytest.approx(want_loss, rel=1e-5)
    got = {k.removeprefix("lm."): p.grad.full_tensor() for k, p in policy.named_parameters()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)


def accumulate_on_rank(rank: int, world: int, out: str) -> None:
    """Rank `rank` of `world` (gloo) accumulates its half of 12 pairs in 3 micro-batches; before each micro-batch
    after the first it records where the gradients are: sharded (each parameter's .grad a DTensor holding this
    rank's shard) or not. Run on two ranks by test_parallel.py (with its other two-rank checks)."""
    pairs = _pairs(12, seed=3)
    policy = apply_fsdp(PolicyLogps(_lm()), torch.float32)
    compute = StepCompute(policy, None, [LOSS], pad_id=0, device="cpu")
    seen, forward = [], compute.forward

    def recording_forward(table):
        seen.append({k: (None if p.grad is None else (p.grad.to_local().numel(), p.to_local().numel(),
                                                      p.numel())) for k, p in policy.named_parameters()})
        return forward(table)
    compute.forward = recording_forward
    compute.accumulate(pairs.slice(rank * 6, 6), 2, StepSums())
    grads = {k.removeprefix("lm."): p.grad.full_tensor() for k, p in policy.named_parameters()}
    if rank == 0:
        torch.save({"seen": seen, "grads": grads}, out)


def _with_cached_tokens(pairs, ref_lm):
    """`pairs` with the reference's per-token log-probs and sums, as the cache holds them."""
    b = collate(pairs)
    with torch.no_grad():
        flat = selective_token_logps(ref_lm, b.input_ids, None, b.score_mask)
    per_seq = torch.split(flat, b.score_mask.sum(1).tolist())
    n = b.pairs
    sides = enumerate(("chosen", "rejected"))
    cols = {f"ref_{side}_token_logps": pa.array([t.tolist() for t in per_seq[i * n:(i + 1) * n]],
                                                pa.list_(pa.float32())) for i, side in sides}
    pairs = pairs.drop_columns(["ref_chosen_logps", "ref_rejected_logps"])
    sums = [np.array([t.double().sum().item() for t in per_seq[i * n:(i + 1) * n]]) for i in range(2)]
    pairs = pairs.append_column("ref_chosen_logps", pa.array(sums[0])).append_column("ref_rejected_logps",
                                                                                       pa.array(sums[1]))
    for name, col in cols.items():
        pairs = pairs.append_column(name, col)
    return pairs


def _ld_wpo_formula(pairs, lm, ref_lm, alpha: float, beta: float) -> torch.Tensor:
    """LD-DPO (α) with WPO weights per pair, from full softmaxes, pair by pair (no batching code)."""
    out = []
    for row in pairs.to_pylist():
        p, c, r = row["prompt_input_ids"], row["chosen_input_ids"], row["rejected_input_ids"]
        shared = min(len(c), len(r))
        seq_logps, wpo = [], []
        for resp in (c, r):
            ids = torch.tensor([p + resp])
            logp_pol = torch.log_softmax(lm(ids).logits[0, :-1].double(), -1)
            logp_ref = torch.log_softmax(ref_lm(ids).logits[0, :-1].double(), -1)
            k = torch.arange(len(p) - 1, len(p) + len(resp) - 1)
            tgt = torch.tensor(resp)
            weight = torch.tensor([1.0 if i < shared else alpha for i in range(len(resp))], dtype=torch.float64)
            pol, ref = logp_pol[k, tgt], logp_ref[k, tgt]
            seq_logps.append(((pol * weight).sum(), (ref * weight).sum()))
            sq = torch.log((logp_pol[k].exp() ** 2).sum(-1))  # log Σ_v p(v)²
            wpo.append(torch.exp((pol - sq).mean()).item())
        (pw, rw), (pl, rl) = seq_logps
        out.append(-F.logsigmoid(beta * ((pw - rw) - (pl - rl))) * wpo[0] * wpo[1])
    return torch.stack(out)


def test_ld_dpo_and_wpo_from_the_cache_equal_in_loop_and_the_formula():
    torch.manual_seed(1)
    ref_lm = _lm()
    with torch.no_grad():  # a policy that differs from the reference
        lm = _lm()
        for p in lm.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pairs = _with_cached_tokens(_pairs(6, seed=4), ref_lm)
    terms = [LossConfig(type="sigmoid", ld_alpha=0.5, wpo=True)]
    cached = StepCompute(PolicyLogps(lm), None, terms, pad_id=0, device="cpu").forward(pairs)[0]
    in_loop = StepCompute(PolicyLogps(lm), PolicyLogps(ref_lm), terms, pad_id=0, device="cpu").forward(pairs)[0]
    torch.testing.assert_close(cached.losses, in_loop.losses, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        want = _ld_wpo_formula(pairs, lm, ref_lm, alpha=0.5, beta=0.1)
    torch.testing.assert_close(cached.losses.double(), want, rtol=1e-4, atol=1e-6)
    assert cached.extras["wpo/weight"].shape == (6,)


@pytest.mark.parametrize("tied", [False, True], ids=["own-head", "tied-head"])
def test_recomputed_head_equals_the_kept_one_and_keeps_no_logits(tied):
    """`recompute=True`: the same log-probs (and WPO's log Σ p², without gradient), the same gradients of every
    parameter, and autograd keeps no [tokens, vocab] logits, only the chunks' hidden states (Gemma-2's soft-capping
    goes through the recompute too)."""
    b = collate(_pairs(6, seed=4))
    vocab = 256

    def run(recompute: bool):
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                          tie_word_embeddings=tied))
        lm.config.final_logit_softcapping = 3.0
        saved = []

        def pack(t):
            saved.append(t.numel() * t.element_size() if t.dim() == 2 and t.shape[-1] == vocab else 0)
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logps, sq = selective_token_logps(lm, b.input_ids, None, b.score_mask, chunk_tokens=7, log_sum_sq=True,
                                              recompute=recompute)
        (logps * torch.linspace(-1, 1, len(logps))).sum().backward()
        return logps.detach(), sq, {k: p.grad for k, p in lm.named_parameters()}, sum(saved)

    kept, recomputed = run(False), run(True)
    torch.testing.assert_close(recomputed[0], kept[0], rtol=0, atol=0)
    torch.testing.assert_close(recomputed[1], kept[1], rtol=0, atol=0)
    assert not recomputed[1].requires_grad
    for k, g in kept[2].items():
        torch.testing.assert_close(recomputed[2][k], g, rtol=1e-6, atol=1e-7, msg=k)
    scored = int(b.score_mask.sum())
    assert kept[3] >= scored * vocab * 4  # every chunk's fp32 logits, kept for backward
    assert recomputed[3] == 0  # none: recomputed chunk by chunk in backward
