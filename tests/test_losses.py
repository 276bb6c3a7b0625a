"""Each loss equals its formula on hand-worked numbers (computed by hand below, not by the code under test)."""

import math

import pytest
import torch

from pipeline.dpo.losses import LOSSES, preference_loss

# policy chosen/rejected -10/-12, reference -11/-11: h = (−10 + 11) − (−12 + 11) = 2; β = 0.1 -> βh = 0.2.
# −log σ(0.2) = log(1 + e^−0.2) = 0.5981388693; −log σ(−0.2) = log(1 + e^0.2) = 0.7981388693.
PC, PR, RC, RR = -10.0, -12.0, -11.0, -11.0
NLS, NLS_NEG = 0.5981388693, 0.7981388693


def run(kind, eps=0.0, sft=0.0):
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    return preference_loss(kind, t(PC), t(PR), t(RC), t(RR), beta=0.1, label_smoothing=eps, sft_weight=sft,
                           chosen_lengths=t(5.0))


@pytest.mark.parametrize("kind, eps, expected", [
    ("sigmoid", 0.0, NLS),
    ("sigmoid", 0.1, 0.9 * NLS + 0.1 * NLS_NEG),  # conservative DPO: 0.6181388693
    ("ipo", 0.0, (2 - 1 / (2 * 0.1)) ** 2),  # (2 − 5)² = 9
    ("hinge", 0.0, 1 - 0.2),  # max(0, 1 − βh) = 0.8
    ("robust", 0.1, (0.9 * NLS - 0.1 * NLS_NEG) / (1 - 0.2)),  # 0.5731388693
])
def test_loss_equals_formula(kind, eps, expected):
    assert run(kind, eps).losses.item() == pytest.approx(expected, abs=1e-9)


def test_hand_worked_constants():
    assert NLS == pytest.approx(math.log1p(math.exp(-0.2)), abs=1e-10)
    assert NLS_NEG == pytest.approx(math.log1p(math.exp(0.2)), abs=1e-10)


def test_rewards_are_beta_scaled_log_ratios():
    out = run("sigmoid")
    assert out.chosen_rewards.item() == pytest.approx(0.1 * (PC - RC))
    assert out.rejected_rewards.item() == pytest.approx(0.1 * (PR - RR))


def test_sft_term_adds_weighted_mean_token_nll_of_chosen():
    # 0.5 × (10 / 5 tokens) = 1.0 on top of the DPO loss
    assert run("sigmoid", sft=0.5).losses.item() == pytest.approx(NLS + 1.0, abs=1e-9)


def test_policy_equal_reference_gives_ln2_for_dpo():
    x = torch.tensor([-3.0, -50.0])
    assert torch.allclose(preference_loss("sigmoid", x, x - 1, x, x - 1, beta=0.5).losses,
                          torch.full((2,), math.log(2), dtype=x.dtype))


def test_hinge_is_zero_beyond_margin_and_table_is_complete():
    assert LOSSES["hinge"](torch.tensor([20.0]), 0.1).item() == 0.0
    assert set(LOSSES) == {"sigmoid", "ipo", "hinge", "robust"}


def test_preferred_ft_is_the_chosen_mean_token_nll():
    # Preferred-FT: −log π(y_w|x) / |y_w| = 10 / 5 = 2, whatever the rejected response and the reference.
    out = run("sft")
    assert out.losses.item() == pytest.approx(2.0, abs=1e-12)
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    other = preference_loss("sft", t(PC), t(-1.0), t(-3.0), t(-50.0), beta=0.5, chosen_lengths=t(5.0))
    assert other.losses.item() == pytest.approx(2.0, abs=1e-12)
    # The implicit rewards are still reported, to compare with DPO runs: β(log π − log π_ref) = 0.1·1, 0.1·(−1).
    assert out.chosen_rewards.item() == pytest.approx(0.1) and out.rejected_rewards.item() == pytest.approx(-0.1)
