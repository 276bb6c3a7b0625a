"""The preference-loss catalogue: one pure function per loss type, a table from names to functions, and the weighted
sum of a list of them (`train.loss`; parameters and defaults in pipeline/config/schema.py `LossConfig`).

Every loss function takes a `Logps` (per-pair log-probs, each shape [B]) and returns the per-pair loss, shape [B].
Notation: u_w = π(y_w|x)/π_ref(y_w|x) and u_l likewise, so log u_w = `x.chosen_ratio`, log u_l = `x.rejected_ratio`,
and h = log u_w − log u_l = `x.margin`. How token log-probs become a sequence's log-prob (sum; mean, i.e.
length-normalized; LD-DPO's down-weighted tail) is the term's choice, applied by `term_logps` before the function.
A reference-free loss (`simpo`, `orpo`, `sft`) reads no reference: `x.ref_*` are zeros when there is none.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from pipeline.config.schema import LOSS_PARAMS, LossConfig


@dataclass
class Logps:
    """Per-pair inputs of a loss, shape [B] each: the policy's and the reference's log-probs of the chosen (y_w) and
    rejected (y_l) responses, and the responses' token counts."""

    policy_chosen: torch.Tensor
    policy_rejected: torch.Tensor
    ref_chosen: torch.Tensor
    ref_rejected: torch.Tensor
    chosen_lengths: torch.Tensor
    rejected_lengths: torch.Tensor

    @property
    def chosen_ratio(self) -> torch.Tensor:
        return self.policy_chosen - self.ref_chosen

    @property
    def rejected_ratio(self) -> torch.Tensor:
        return self.policy_rejected - self.ref_rejected

    @property
    def margin(self) -> torch.Tensor:
        return self.chosen_ratio - self.rejected_ratio


def _smoothed(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """−(1 − ε) log σ(z) − ε log σ(−z): the logistic loss with labels flipped with probability ε."""
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


# ---------------------------------------------------------------- DPO family (need the reference)


def sigmoid_loss(x: Logps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """DPO (Rafailov et al. 2023, eq. 7): −log σ(β h). With label smoothing ε, conservative DPO (cDPO; Mitchell
    2023): −(1 − ε) log σ(β h) − ε log σ(−β h)."""
    return _smoothed(beta * x.margin, label_smoothing)


def ipo_loss(x: Logps, beta: float) -> torch.Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h − 1/(2τ))², τ = β. Length-normalized by default (`length_normalize`: the
    authors' form, as in TRL)."""
    return (x.margin - 1 / (2 * beta)) ** 2


def hinge_loss(x: Logps, beta: float) -> torch.Tensor:
    """SLiC-HF's calibration loss (Zhao et al. 2023) with δ = 1/β, on the margin against the reference (as TRL):
    max(0, 1 − β h)."""
    return torch.relu(1 - beta * x.margin)


def robust_loss(x: Logps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Robust DPO (rDPO; Chowdhury et al. 2024, "Provably Robust DPO"), unbiased under label noise of rate ε < 1/2:
    [−(1 − ε) log σ(β h) + ε log σ(−β h)] / (1 − 2ε)."""
    z = beta * x.margin
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (1 - 2 * label_smoothing)


def exo_pair_loss(x: Logps, beta: float, label_smoothing: float = 1e-3) -> torch.Tensor:
    """EXO-pref (Ji et al. 2024, eq. 16, K = 2): KL(p_θ ‖ p_ε), p_θ = softmax over {y_w, y_l} of β log u and
    p_ε = (1 − ε, ε): σ(βh)(log σ(βh) − log(1 − ε)) + σ(−βh)(log σ(−βh) − log ε). ε > 0."""
    z = beta * x.margin
    return (torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
            + torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing)))


def nca_pair_loss(x: Logps, beta: float) -> torch.Tensor:
    """NCA (Chen et al. 2024, "Noise Contrastive Alignment", K = 2 responses), with r = β log u:
    −log σ(r_w) − ½ log σ(−r_w) − ½ log σ(−r_l)."""
    rw, rl = beta * x.chosen_ratio, beta * x.rejected_ratio
    return -F.logsigmoid(rw) - 0.5 * F.logsigmoid(-rw) - 0.5 * F.logsigmoid(-rl)


def bco_pair_loss(x: Logps, beta: float, delta: float = 0.0) -> torch.Tensor:
    """BCO (Jung et al. 2024, "Binary Classifier Optimization") on pairs:
    −log σ(β log u_w − δ) − log σ(−(β log u_l − δ)), δ the running mean of the rewards β log u of the earlier
    steps (`LossState.bco_mean`, checkpointed)."""
    return -F.logsigmoid(beta * x.chosen_ratio - delta) - F.logsigmoid(-(beta * x.rejected_ratio - delta))


def sppo_hard_loss(x: Logps, beta: float) -> torch.Tensor:
    """SPPO (Wu et al. 2024, eq. 4.7) with hard win probabilities (1 for y_w, 0 for y_l), η = β⁻¹:
    (log u_w − 1/(2β))² + (log u_l + 1/(2β))²."""
    return (x.chosen_ratio - 0.5 / beta) ** 2 + (x.rejected_ratio + 0.5 / beta) ** 2


def aot_loss(x: Logps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport"), paired: the
    logistic loss on sort(log π_w − log π_l) − sort(log π_ref,w − log π_ref,l), both sorted over the micro-batch
    (so it depends on micro_batch_pairs)."""
    policy = torch.sort(x.policy_chosen - x.policy_rejected, dim=0).values
    ref = torch.sort(x.ref_chosen - x.ref_rejected, dim=0).values
    return _smoothed(beta * (policy - ref), label_smoothing)


def aot_pair_loss(x: Logps, beta: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """AOT (Melnyk et al. 2024), unpaired: the logistic loss on sort(log u_w) − sort(log u_l), each sorted over the
    micro-batch (TRL's `aot_unpaired`)."""
    delta = torch.sort(x.chosen_ratio, dim=0).values - torch.sort(x.rejected_ratio, dim=0).values
    return _smoothed(beta * delta, label_smoothing)


def apo_zero_loss(x: Logps, beta: float) -> torch.Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, eq. 7): 1 − σ(β log u_w) + σ(β log u_l): raise y_w, lower y_l (when
    y_w is better than the model's own outputs)."""
    return 1 - torch.sigmoid(beta * x.chosen_ratio) + torch.sigmoid(beta * x.rejected_ratio)


def apo_down_loss(x: Logps, beta: float) -> torch.Tensor:
    """APO-down (D'Oosterlinck et al. 2024, eq. 8): σ(β log u_w) + 1 − σ(β h): lower both, y_l more (when y_w is
    worse than the model's own outputs)."""
    return torch.sigmoid(beta * x.chosen_ratio) + 1 - torch.sigmoid(beta * x.margin)


def discopop_loss(x: Logps, beta: float, tau: float = 0.05) -> torch.Tensor:
    """DiscoPOP, log-ratio modulated (Chris Lu et al. 2024, eq. 5), z = β h: (1 − σ(z/τ))·(−log σ(z)) +
    σ(z/τ)·e^(−z)."""
    z = beta * x.margin
    mix = torch.sigmoid(z / tau)
    return -F.logsigmoid(z) * (1 - mix) + torch.exp(-z) * mix


# exp() of a log-ratio times a coefficient: capped so that float32 stays finite (e^80 ≈ 5.5e34).
_EXP_CAP = 80.0


def f_scores(log_u: torch.Tensor, divergence: str, alpha: float = 0.5) -> torch.Tensor:
    """f'(u) of the f-divergence (Wang et al. 2024, "Beyond Reverse KL", Table 1), from log u; constants that
    cancel in f'(u_w) − f'(u_l) are left out. reverse KL: log u; forward KL: −1/u; Jensen–Shannon: log(2u/(1+u));
    α-divergence: (1 − u^−α)/α."""
    if divergence == "reverse_kl":
        return log_u
    if divergence == "forward_kl":
        return -torch.exp(torch.clamp(-log_u, max=_EXP_CAP))
    if divergence == "js_divergence":
        return math.log(2) + F.logsigmoid(log_u)
    if divergence == "alpha_divergence":
        return (1 - torch.exp(torch.clamp(-alpha * log_u, max=_EXP_CAP))) / alpha
    raise ValueError(f"unknown divergence {divergence!r}")


def f_divergence_loss(x: Logps, beta: float, divergence: str = "reverse_kl", alpha: float = 0.5) -> torch.Tensor:
    """f-DPO (Wang et al. 2024): −log σ(β f'(u_w) − β f'(u_l)); reverse KL is DPO."""
    return -F.logsigmoid(beta * (f_scores(x.chosen_ratio, divergence, alpha)
                                 - f_scores(x.rejected_ratio, divergence, alpha)))


# ---------------------------------------------------------------- reference-free


def sft_loss(x: Logps, beta: float) -> torch.Tensor:
    """Preferred-FT (Rafailov et al. 2023, §6): supervised fine-tuning on the chosen responses only, their mean
    token NLL −log π(y_w|x)/|y_w| (on summed log-probs). β only scales the reported rewards."""
    return -x.policy_chosen / x.chosen_lengths


def simpo_loss(x: Logps, beta: float, gamma: float = 0.5, label_smoothing: float = 0.0) -> torch.Tensor:
    """SimPO (Meng et al. 2024, eq. 6), on mean token log-probs (length-normalized):
    −log σ(β log π(y_w)/|y_w| − β log π(y_l)/|y_l| − γ); label smoothing as in cDPO."""
    return _smoothed(beta * (x.policy_chosen - x.policy_rejected) - gamma, label_smoothing)


def log1mexp(a: torch.Tensor) -> torch.Tensor:
    """log(1 − e^a) for a < 0, without cancellation (Mächler 2012)."""
    return torch.where(a < -math.log(2), torch.log1p(-torch.exp(a)), torch.log(-torch.expm1(a)))


def orpo_log_odds(x: Logps) -> torch.Tensor:
    """log(odds(y_w)/odds(y_l)), odds(y) = P(y)/(1 − P(y)), P the mean token probability exp(mean log π)."""
    return (x.policy_chosen - x.policy_rejected) - (log1mexp(x.policy_chosen) - log1mexp(x.policy_rejected))


def orpo_loss(x: Logps, beta: float) -> torch.Tensor:
    """ORPO (Hong et al. 2024, eq. 6-7), on mean token log-probs: the chosen response's mean token NLL
    − λ log σ(log odds ratio), λ = β."""
    return -x.policy_chosen - beta * F.logsigmoid(orpo_log_odds(x))


LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "sigmoid": sigmoid_loss, "ipo": ipo_loss, "hinge": hinge_loss, "robust": robust_loss,
    "exo_pair": exo_pair_loss, "nca_pair": nca_pair_loss, "bco_pair": bco_pair_loss, "sppo_hard": sppo_hard_loss,
    "aot": aot_loss, "aot_pair": aot_pair_loss, "apo_zero": apo_zero_loss, "apo_down": apo_down_loss,
    "discopop": discopop_loss, "f_divergence": f_divergence_loss,
    "sft": sft_loss, "simpo": simpo_loss, "orpo": orpo_loss,
}
assert set(LOSSES) == set(LOSS_PARAMS), "the schema's loss types and this table must agree"


# ---------------------------------------------------------------- state, reductions, the weighted sum


@dataclass
class LossState:
    """The explicit state of stateful losses, saved with the training state and restored with it: BCO's running
    mean δ of the rewards β log u (over chosen and rejected) of every finished step, a mean of the steps' means."""

    bco_mean: float = 0.0
    bco_steps: int = 0

    def update(self, metrics: dict[str, float]) -> dict[str, float]:
        """After a step, from its all-reduced metrics (the same on every rank, for any worker count); returns the
        state's own metrics (`bco/reward_mean`, the δ of the next step)."""
        if "bco/batch_reward" not in metrics:
            return {}
        self.bco_mean += (metrics["bco/batch_reward"] - self.bco_mean) / (self.bco_steps + 1)
        self.bco_steps += 1
        return {"bco/reward_mean": self.bco_mean}


def term_kwargs(term: LossConfig, state: LossState) -> dict:
    """The loss function's own arguments, from the term's settings (and the state)."""
    kwargs: dict = {"beta": term.beta}
    if "label_smoothing" in LOSS_PARAMS[term.type]:
        kwargs["label_smoothing"] = term.smoothing
    if term.type == "discopop":
        kwargs["tau"] = term.discopop_tau
    elif term.type == "f_divergence":
        kwargs.update(divergence=term.divergence, alpha=term.f_alpha)
    elif term.type == "simpo":
        kwargs["gamma"] = term.gamma
    elif term.type == "bco_pair":
        kwargs["delta"] = state.bco_mean
    return kwargs


@dataclass
class SequenceLogps:
    """One micro-batch's sequence log-probs, from which each term takes its own reduction. Shape [2B] each: the B
    chosen sequences, then the B rejected ones.

    `*_tail`: the sum over the tokens past the shorter response of the pair (LD-DPO), when a term needs it;
    `wpo_logps`: the policy's mean over tokens of log π(y_t) − log Σ_v π(v)² (WPO's eq. 3), without gradient."""

    policy: torch.Tensor
    reference: torch.Tensor | None
    lengths: torch.Tensor
    policy_tail: torch.Tensor | None = None
    reference_tail: torch.Tensor | None = None
    wpo_logps: torch.Tensor | None = None


def term_logps(s: SequenceLogps, term: LossConfig) -> Logps:
    """The term's `Logps`: sums; LD-DPO's shared + α·tail = sum − (1 − α)·tail (Liu et al. 2024, LD-DPO); or means
    (length-normalized)."""
    policy = s.policy
    ref = s.reference if s.reference is not None else torch.zeros_like(policy)
    if term.ld_alpha is not None and term.needs_reference:
        policy = policy - (1 - term.ld_alpha) * s.policy_tail
        ref = ref - (1 - term.ld_alpha) * s.reference_tail
    if term.normalized:
        policy, ref = policy / s.lengths, ref / s.lengths
    b = policy.shape[0] // 2
    return Logps(policy[:b], policy[b:], ref[:b], ref[b:], s.lengths[:b], s.lengths[b:])


def wpo_weights(s: SequenceLogps) -> torch.Tensor:
    """WPO (Zhou et al. 2024, eq. 2-3): w(x, y_w)·w(x, y_l), w = exp(wpo_logps); shape [B], no gradient."""
    w = torch.exp(s.wpo_logps.detach())
    b = w.shape[0] // 2
    return w[:b] * w[b:]


@dataclass
class PairOutputs:
    """Per-pair results of one micro-batch, shape [B] each: the loss (the weighted sum of the terms), the implicit
    rewards (the first term's β·(log π − log π_ref) on its reduction; β·log π with no reference), and per-pair
    values of named metrics, averaged over the step's pairs (`loss/<type>` per term of a list, `wpo/weight`,
    `orpo/log_odds`, `bco/batch_reward`)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def preference_loss(terms: list[LossConfig], s: SequenceLogps, state: LossState | None = None) -> PairOutputs:
    """Σ_k weight_k · loss_k per pair; each term on its own reduction of the log-probs, plus its `sft_weight` ×
    the chosen response's mean token NLL (RPO, Pang et al. 2024) and times its WPO weights if `wpo`."""
    state = state or LossState()
    total, extras, rewards = 0, {}, None
    for term in terms:
        x = term_logps(s, term)
        losses = LOSSES[term.type](x, **term_kwargs(term, state))
        if term.sft_weight:
            losses = losses + term.sft_weight * (-s.policy[:x.policy_chosen.shape[0]] / x.chosen_lengths)
        if term.wpo:
            weights = wpo_weights(s)
            losses = losses * weights
            extras["wpo/weight"] = weights
        if term.type == "orpo":
            extras["orpo/log_odds"] = orpo_log_odds(x).detach()
        if term.type == "bco_pair":
            extras["bco/batch_reward"] = term.beta * (x.chosen_ratio + x.rejected_ratio).detach() / 2
        if len(terms) > 1:
            extras[f"loss/{term.type}"] = losses.detach()
        total = total + term.weight * losses
        if rewards is None:
            rewards = (term.beta * x.chosen_ratio.detach(), term.beta * x.rejected_ratio.detach())
    return PairOutputs(total, *rewards, extras)
