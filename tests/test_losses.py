"""Each loss equals its formula on hand-worked numbers (worked out below with `math`, not by the code under test);
combinations, reductions (length-normalized, LD-DPO), WPO weights and BCO's state. TRL's own losses on the same
inputs: tests/test_losses_trl.py."""

import math

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.config.schema import LOSS_PARAMS
from pipeline.dpo.batching import PairBatch, collate
from pipeline.dpo.losses import LOSSES, LossState, SequenceLogps, preference_loss

# One pair: policy chosen/rejected −10/−12, reference −11/−11, response lengths 5/4 tokens.
# log u_w = 1, log u_l = −1, h = 2; β = 0.1 -> βh = 0.2.
PC, PR, RC, RR, LC, LR = -10.0, -12.0, -11.0, -11.0, 5.0, 4.0


def softplus(z):
    return math.log1p(math.exp(z))  # −log σ(−z)


def sig(z):
    return 1 / (1 + math.exp(-z))


NLS = softplus(-0.2)  # −log σ(0.2) = 0.5981388693
NLS_NEG = softplus(0.2)  # −log σ(−0.2) = 0.7981388693


def seq(pc=PC, pr=PR, rc=RC, rr=RR, lc=LC, lr=LR, reference=True, **extra):
    t = lambda *v: torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return SequenceLogps(t(pc, pr), t(rc, rr) if reference else None, t(lc, lr),
                         **{k: t(*v) for k, v in extra.items()})


def loss(s=None, state=None, **term):
    return preference_loss([LossConfig(**term)], s or seq(), state)


@pytest.mark.parametrize("term, expected", [
    ({"type": "sigmoid"}, NLS),
    ({"type": "sigmoid", "label_smoothing": 0.1}, 0.9 * NLS + 0.1 * NLS_NEG),  # cDPO: 0.6181388693
    ({"type": "ipo", "length_normalize": False}, (2 - 1 / 0.2) ** 2),  # (h − 1/(2τ))² = (2 − 5)² = 9
    # means: log u_w = 1/5, log u_l = −1/4, h = 0.45
    ({"type": "ipo"}, (0.45 - 5) ** 2),  # 20.7025
    ({"type": "hinge"}, 0.8),  # max(0, 1 − βh)
    ({"type": "robust", "label_smoothing": 0.1}, (0.9 * NLS - 0.1 * NLS_NEG) / 0.8),  # 0.5731388693
    ({"type": "exo_pair"}, sig(0.2) * (-NLS - math.log(0.999)) + sig(-0.2) * (-NLS_NEG - math.log(1e-3))),
    ({"type": "nca_pair"}, softplus(-0.1) + 0.5 * softplus(0.1) + 0.5 * softplus(-0.1)),  # r_w = .1, r_l = −.1
    ({"type": "bco_pair"}, softplus(-0.1) + softplus(-0.1)),  # δ = 0: −log σ(0.1) − log σ(0.1)
    ({"type": "sppo_hard"}, (1 - 5) ** 2 + (-1 + 5) ** 2),  # 32
    ({"type": "apo_zero"}, 1 - sig(0.1) + sig(-0.1)),  # 0.9500416
    ({"type": "apo_down"}, sig(0.1) + 1 - sig(0.2)),
    ({"type": "discopop"}, NLS * (1 - sig(0.2 / 0.05)) + math.exp(-0.2) * sig(0.2 / 0.05)),
    ({"type": "f_divergence"}, NLS),  # reverse KL is DPO
    # forward KL: f'(u) = −1/u, so β(f'(u_w) − f'(u_l)) = 0.1(e − 1/e)
    ({"type": "f_divergence", "divergence": "forward_kl"}, softplus(-0.1 * (math.e - 1 / math.e))),
    # Jensen–Shannon: f'(u) = log 2u/(1+u) = log 2 + log σ(log u); log σ(1) − log σ(−1) = 1
    ({"type": "f_divergence", "divergence": "js_divergence"}, softplus(-0.1)),
    # α = 0.5: f'(u) = (1 − u^−α)/α -> 2(1 − e^−0.5) − 2(1 − e^0.5) = 2(e^0.5 − e^−0.5)
    ({"type": "f_divergence", "divergence": "alpha_divergence"},
     softplus(-0.1 * 2 * (math.exp(0.5) - math.exp(-0.5)))),
    ({"type": "sft"}, 2.0),  # −log π(y_w)/|y_w| = 10/5
    # SimPO on means −2, −3: β = 2, γ = 0.5 -> −log σ(2·1 − 0.5)
    ({"type": "simpo", "beta": 2.0}, softplus(-1.5)),
    # ORPO on means −2, −3: NLL 2 − λ log σ(log odds), log odds = 1 − (log(1 − e^−2) − log(1 − e^−3))
    ({"type": "orpo"}, 2 + 0.1 * softplus(-(1 - (math.log(1 - math.exp(-2)) - math.log(1 - math.exp(-3)))))),
    ({"type": "sigmoid", "sft_weight": 0.5}, NLS + 0.5 * 2),  # RPO: + 0.5 × mean token NLL of y_w
])
def test_loss_equals_hand_worked_value(term, expected):
    assert loss(**term).losses.item() == pytest.approx(expected, abs=1e-9)


def test_every_type_is_in_the_table_and_the_schema():
    assert set(LOSSES) == set(LOSS_PARAMS) and len(LOSSES) == 17


def test_aot_sorts_over_the_micro_batch():
    # Pair 2: policy −5/−3, reference −4/−6: log u = −1, 3. AOT (paired): sort(π_w − π_l) = sort(2, −2) = (−2, 2),
    # sort(ref) = sort(0, 2) = (0, 2): deltas (−2, 0). Unpaired: sort(1, −1) − sort(−1, 3) = (−1, 1) − (−1, 3).
    s = SequenceLogps(torch.tensor([PC, -5.0, PR, -3.0], dtype=torch.float64),
                      torch.tensor([RC, -4.0, RR, -6.0], dtype=torch.float64), torch.ones(4, dtype=torch.float64))
    assert preference_loss([LossConfig(type="aot")], s).losses.tolist() == pytest.approx([NLS_NEG, math.log(2)])
    assert preference_loss([LossConfig(type="aot_pair")], s).losses.tolist() == pytest.approx([math.log(2), NLS_NEG])


def test_sigmoid_at_policy_equal_reference_is_ln2():
    s = seq(PC, PR, PC, PR)
    assert loss(s, type="sigmoid", beta=0.5).losses.item() == pytest.approx(math.log(2), abs=1e-12)


def test_a_combination_is_the_weighted_sum_of_its_parts():
    terms = [LossConfig(type="sigmoid", weight=0.8), LossConfig(type="bco_pair", weight=0.2),
             LossConfig(type="sft", weight=1.0)]
    out = preference_loss(terms, seq())
    parts = [preference_loss([LossConfig(type=t.type)], seq()).losses.item() for t in terms]
    assert out.losses.item() == pytest.approx(0.8 * parts[0] + 0.2 * parts[1] + parts[2], abs=1e-12)
    assert out.losses.item() == pytest.approx(0.8 * NLS + 0.2 * 2 * softplus(-0.1) + 2.0, abs=1e-9)  # MPO's mix
    assert out.extras["loss/bco_pair"].item() == pytest.approx(parts[1]) and "loss/sft" in out.extras


def test_ld_dpo_weighs_the_tail_and_alpha_one_is_dpo():
    # The chosen response (5 tokens) has 1 token past the shorter (4): its policy log-prob −3, reference −2.5.
    tails = {"policy_tail": (-3.0, 0.0), "reference_tail": (-2.5, 0.0)}
    # α = 0.5: log π_w = −10 − 0.5·(−3) = −8.5, log π_ref,w = −11 − 0.5·(−2.5) = −9.75 -> h = 1.25 + 1 = 2.25
    assert loss(seq(**tails), ld_alpha=0.5).losses.item() == pytest.approx(softplus(-0.225), abs=1e-9)
    assert loss(seq(**tails), ld_alpha=1.0).losses.item() == pytest.approx(loss().losses.item(), abs=1e-12)


def test_length_normalized_dpo_uses_mean_token_logps():
    # means: h = 1/5 + 1/4 = 0.45
    assert loss(length_normalize=True).losses.item() == pytest.approx(softplus(-0.045), abs=1e-9)


def test_wpo_weighs_pairs_by_the_policy_probability_without_gradient():
    s = seq(wpo_logps=(-0.5, -1.0))
    s.policy.requires_grad_(True)
    out = loss(s, wpo=True)
    assert out.losses.item() == pytest.approx(math.exp(-1.5) * NLS, abs=1e-9)
    assert out.extras["wpo/weight"].item() == pytest.approx(math.exp(-1.5))
    out.losses.sum().backward()
    # d/dπ_w of w·(−log σ(βh)) with w constant: −w β σ(−βh)
    assert s.policy.grad[0].item() == pytest.approx(-math.exp(-1.5) * 0.1 * sig(-0.2), abs=1e-9)


def test_reference_free_losses_read_no_reference():
    for t in ("simpo", "orpo", "sft"):
        with_ref = loss(type=t).losses.item()
        assert loss(seq(reference=False), type=t).losses.item() == pytest.approx(with_ref, abs=1e-12)


def test_bco_uses_the_running_mean_of_earlier_steps_and_is_restored():
    state = LossState()
    assert state.update({"bco/batch_reward": 0.2}) == {"bco/reward_mean": pytest.approx(0.2)}
    assert state.update({"bco/batch_reward": 0.4}) == {"bco/reward_mean": pytest.approx(0.3)}
    restored = LossState(**vars(state))
    # δ = 0.3: −log σ(0.1 − 0.3) − log σ(−(−0.1 − 0.3))
    out = loss(state=restored, type="bco_pair")
    assert out.losses.item() == pytest.approx(softplus(0.2) + softplus(-0.4), abs=1e-9)
    # This step's reward mean, for the next update: β(log u_w + log u_l)/2 = 0
    assert out.extras["bco/batch_reward"].item() == pytest.approx(0.0)
    assert state.update({"loss": 1.0}) == {} and state.bco_steps == 2


def test_rewards_are_the_first_terms_beta_scaled_log_ratios():
    out = preference_loss([LossConfig(beta=0.5), LossConfig(type="sft")], seq())
    assert out.chosen_rewards.item() == pytest.approx(0.5 * (PC - RC))
    assert out.rejected_rewards.item() == pytest.approx(0.5 * (PR - RR))


def test_tails_past_the_shorter_response():
    import pyarrow as pa
    # Chosen response 3 tokens, rejected 1: the shared length is 1; tails are chosen tokens 2..3.
    table = pa.table({"prompt_input_ids": [[1, 2]], "chosen_input_ids": [[3, 4, 5]], "rejected_input_ids": [[6]],
                      "ref_chosen_token_logps": [[-1.0, -2.0, -4.0]], "ref_rejected_token_logps": [[-0.5]]})
    b: PairBatch = collate(table)
    assert b.ref_tail.tolist() == [-6.0, 0.0]
    token_logps = torch.tensor([-1.0, -2.0, -4.0, -0.5])  # row-major: chosen's 3, then rejected's 1
    assert b.tail_sums(token_logps).tolist() == [-6.0, 0.0]
