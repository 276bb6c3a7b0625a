"""DPO-family preference losses: one pure function per variant, and a table from names to functions.

Every function takes the policy-minus-reference log-ratio margin of each pair,

    h = (log π(y_w|x) − log π_ref(y_w|x)) − (log π(y_l|x) − log π_ref(y_l|x))        shape [B]

(sums over response tokens), and returns the per-pair loss, shape [B]. `beta` and the variant's own parameter
come from `train.loss`. `sft` (Preferred-FT, the paper's baseline) is not a preference loss: it is the chosen
response's mean token NLL, handled in `preference_loss`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def sigmoid_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β h). With label smoothing ε (conservative DPO, cDPO; Mitchell
    2023): −(1 − ε) log σ(β h) − ε log σ(−β h), i.e. the labels are flipped with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)


def ipo_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2β))², with β as the paper's τ. Here h uses summed log-probs,
    like the paper's definition; `label_smoothing` is unused."""
    return (h - 1 / (2 * beta)) ** 2


def hinge_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """SLiC hinge (Zhao et al. 2023, eq. 1 with δ = 1/β): max(0, 1 − β h). `label_smoothing` is unused."""
    return torch.relu(1 - beta * h)


def robust_loss(h: torch.Tensor, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 5): unbiased under label noise of rate ε < 1/2,
    [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)."""
    return (-(1 - label_smoothing) * F.logsigmoid(beta * h) + label_smoothing * F.logsigmoid(-beta * h)) / (
        1 - 2 * label_smoothing)


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
}


@dataclass
class PairOutputs:
    """Per-pair results of one batch, shape [B] each; rewards are β-scaled log-ratios (DPO's implicit reward)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def preference_loss(kind: str, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
                    ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float,
                    label_smoothing: float = 0.0, sft_weight: float = 0.0,
                    chosen_lengths: torch.Tensor | None = None) -> PairOutputs:
    """The configured loss per pair, plus `sft_weight` × the chosen response's mean token NLL (an SFT term on the
    preferred response, as in RPO, Pang et al. 2024). Inputs are summed response log-probs, shape [B]."""
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    if kind == "sft":
        # Preferred-FT (Rafailov et al. 2023, §6): supervised fine-tuning on the chosen responses only, the
        # mean token NLL of y_w. Rejected responses and the reference do not enter the loss; the implicit rewards
        # below are still reported, to compare with DPO runs.
        losses = -policy_chosen / chosen_lengths
        return PairOutputs(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
    losses = LOSSES[kind](chosen_ratio - rejected_ratio, beta, label_smoothing)
    if sft_weight:
        losses = losses + sft_weight * (-policy_chosen / chosen_lengths)
    return PairOutputs(losses, beta * chosen_ratio.detach(), beta * rejected_ratio.detach())
