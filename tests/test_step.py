"""The training step without Ray (pipeline/dpo/step.py), in one process: FSDP2 with one reduce-scatter per step and
torch.compile'd blocks compute the gradient of the plain formula."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from pipeline.config import LossConfig
from pipeline.dpo.batching import collate
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


def _reference_grads(pairs) -> tuple[float, dict[str, torch.Tensor]]:
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


@pytest.mark.parametrize("compile_blocks", [False, True], ids=["eager", "compiled"])
def test_fsdp_step_gradient_equals_the_formula(process_group, compile_blocks):
    pairs = _pairs(12, seed=3)
    want_loss, want = _reference_grads(pairs)
    policy = apply_fsdp(PolicyLogps(_lm()), torch.float32, compile_blocks=compile_blocks)
    sums = StepSums()
    StepCompute(policy, None, [LOSS], pad_id=0, device="cpu").accumulate(pairs, 5, sums)  # micro-batches 5, 5, 2
    m = sums.reduce("cpu")
    assert m["pairs"] == 12
    assert m["loss"] == pytest.approx(want_loss, rel=1e-5)
    got = {k.removeprefix("lm."): p.grad.full_tensor() for k, p in policy.named_parameters()}
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6, msg=k)
