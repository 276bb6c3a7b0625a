"""Each of our preference losses (pipeline/dpo/losses.py) equals TRL's own loss on the same inputs, for every variant
TRL 1.16 also implements (hand-worked values: tests/test_losses.py).

TRL's DPO loss is not a function: it is inline in `DPOTrainer._compute_loss`. We call that real method, unbound, with
a stand-in trainer (the attributes `DPOTrainer.__init__` sets, from a real `DPOConfig`) and a stand-in model that
returns what TRL's fused LM head returns: per-token log-probs of the next token, 0 where the label is −100. The
reference sums come from TRL's own `compute_ref_log_probs` (as when it precomputes them; with `ld_alpha` it reduces
them there), given to `_compute_loss` as `ref_chosen_logps`/`ref_rejected_logps` (`precompute_ref_log_probs=True`).
Ours gets the same per-token log-probs, summed per response here (a loop over rows, not TRL's masks). TRL returns the
batch mean; we compare it for a batch of 4 pairs (variable prompt and response lengths) and for each pair alone.

SimPO and ORPO are in `trl.experimental` (`CPOTrainer.cpo_loss`, `ORPOTrainer.odds_ratio_loss`): pure per-pair
functions of mean token log-probs, compared per pair.

Equal to float64 rounding (1e-10), but where TRL rounds to float32 (exo_pair's ε, alpha_divergence, ORPO's odds).
Not compared, TRL 1.16 has no equivalent: `sigmoid` with label smoothing (cDPO: TRL's sigmoid ignores
`label_smoothing`), BCO's running mean δ (TRL's `bco_pair` has none: ours with a fresh `LossState`, δ = 0), and
`ipo` on sums (TRL's is always length-normalized). TRL's f-divergences under other losses than the logistic one have
no counterpart in ours (`f_divergence` is the logistic loss).
"""

import contextlib
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch

from pipeline.config import LossConfig
from pipeline.dpo.losses import LossState, SequenceLogps, preference_loss

dpo_trainer = pytest.importorskip("trl.trainer.dpo_trainer")
DPOConfig = dpo_trainer.DPOConfig
DPOTrainer = dpo_trainer.DPOTrainer
CPOTrainer = pytest.importorskip("trl.experimental.cpo").CPOTrainer
ORPOTrainer = pytest.importorskip("trl.experimental.orpo").ORPOTrainer

PROMPT_LENGTHS = (3, 2, 4, 2)  # per pair (the chosen and the rejected row share the prompt)
CHOSEN_LENGTHS = (5, 3, 7, 4)
REJECTED_LENGTHS = (4, 6, 2, 4)  # pair 4: equal lengths (no LD-DPO tail)
EQUAL_CHOSEN = (5, 5, 5, 5)  # TRL's sft is the token mean over the batch, ours the mean per pair: equal here
T = 12  # padded sequence length


@dataclass
class Batch:
    """A padded batch as TRL's collator makes it, [2B, T]: the B chosen rows, then the B rejected ones; and the
    per-token values the models return, [2B, T − 1] (column j: the token at position j + 1), nonzero everywhere
    (the stand-in model zeroes those whose label is −100, as TRL's fused LM head does)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    completion_mask: torch.Tensor
    policy: torch.Tensor
    reference: torch.Tensor
    log_sum_sq_probs: torch.Tensor

    def pair(self, i: int) -> "Batch":
        b = self.input_ids.shape[0] // 2
        return Batch(*(t[[i, b + i]] for t in vars(self).values()))


def make_batch(chosen_lengths=CHOSEN_LENGTHS, dtype=torch.float64, seed=0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = [*chosen_lengths, *REJECTED_LENGTHS]
    rows = len(lengths)
    attention_mask = torch.zeros(rows, T, dtype=torch.long)
    completion_mask = torch.zeros(rows, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        p = PROMPT_LENGTHS[i % len(PROMPT_LENGTHS)]
        attention_mask[i, :p + n] = 1
        completion_mask[i, p:p + n] = 1
    policy = -(0.05 + 2.5 * torch.rand(rows, T - 1, generator=g, dtype=torch.float64))
    reference = policy * torch.exp(0.6 * torch.randn(rows, T - 1, generator=g, dtype=torch.float64))
    log_sum_sq_probs = -(0.2 + 1.3 * torch.rand(rows, T - 1, generator=g, dtype=torch.float64))
    input_ids = torch.randint(3, 100, (rows, T), generator=g) * attention_mask
    return Batch(input_ids, attention_mask, completion_mask, policy.to(dtype), reference.to(dtype),
                 log_sum_sq_probs.to(dtype))


class FusedLMHead:
    """Stands in for a model patched by TRL's `add_fused_lm_head`, called with `fused_lm_head=True`: per-token
    values of the next token, 0 where its label is −100."""

    training = True
    is_gradient_checkpointing = False

    def __init__(self, log_probs: torch.Tensor, log_sum_sq_probs: torch.Tensor):
        self.log_probs, self.log_sum_sq_probs = log_probs, log_sum_sq_probs

    def __call__(self, *, input_ids, attention_mask, use_cache, labels, fused_lm_head):
        assert fused_lm_head and not use_cache and input_ids.shape == attention_mask.shape == labels.shape
        mask = labels[:, 1:] != -100
        zeroed = lambda t: t.masked_fill(~mask, 0)  # noqa: E731
        return SimpleNamespace(log_probs=zeroed(self.log_probs), log_sum_sq_probs=zeroed(self.log_sum_sq_probs),
                               entropy=zeroed(torch.ones_like(self.log_probs)),
                               mean_logits=zeroed(torch.full_like(self.log_probs, 0.5)), is_top1=mask)


def trl_dpo_loss(batch: Batch, **config) -> float:
    """TRL's DPO loss (the batch mean) from its own `compute_ref_log_probs` and `_compute_loss`."""
    args = DPOConfig(output_dir="unused", report_to=[], use_cpu=True, precompute_ref_log_probs=True, **config)
    policy = FusedLMHead(batch.policy, batch.log_sum_sq_probs)
    ref = FusedLMHead(batch.reference, batch.log_sum_sq_probs)
    accelerator = SimpleNamespace(device=torch.device("cpu"), gather=lambda t: t, gather_for_metrics=lambda t: t,
                                  autocast=contextlib.nullcontext)
    trainer = SimpleNamespace(  # as DPOTrainer.__init__ sets them from its args (dpo_trainer.py, "Training arguments")
        model=policy, ref_model=ref, accelerator=accelerator, args=args,
        beta=args.beta, precompute_ref_logps=args.precompute_ref_log_probs, loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type), ld_alpha=args.ld_alpha,
        f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
        label_smoothing=args.label_smoothing, use_weighting=args.use_weighting,
        aux_loss_enabled=False, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
              "completion_mask": batch.completion_mask}
    ref_chosen, ref_rejected = DPOTrainer.compute_ref_log_probs(trainer, ref, inputs)
    inputs |= {"ref_chosen_logps": ref_chosen, "ref_rejected_logps": ref_rejected}
    loss = DPOTrainer._compute_loss(trainer, policy, inputs, return_outputs=False)
    assert trainer._metrics["train"]["rewards/chosen"], "TRL's method ran to its end (its metrics)"
    return loss.item()


def sequence_logps(batch: Batch) -> SequenceLogps:
    """Ours: each row's response tokens (completion mask shifted by one), summed; LD-DPO tails past the pair's
    shorter response; WPO's mean of log π − log Σ π². In float64."""
    b = batch.input_ids.shape[0] // 2
    tokens = batch.completion_mask[:, 1:].bool()
    policy, reference, lss = (t.double() for t in (batch.policy, batch.reference, batch.log_sum_sq_probs))
    resp = [policy[i][tokens[i]] for i in range(2 * b)]
    ref = [reference[i][tokens[i]] for i in range(2 * b)]
    lengths = [len(r) for r in resp]
    shared = [min(lengths[i % b], lengths[b + i % b]) for i in range(2 * b)]
    f64 = lambda v: torch.stack(v) if isinstance(v[0], torch.Tensor) else torch.tensor(v, dtype=torch.float64)  # noqa: E731
    return SequenceLogps(
        policy=f64([r.sum() for r in resp]), reference=f64([r.sum() for r in ref]), lengths=f64(lengths),
        policy_tail=f64([r[n:].sum() for r, n in zip(resp, shared)]),
        reference_tail=f64([r[n:].sum() for r, n in zip(ref, shared)]),
        wpo_logps=f64([(policy[i] - lss[i])[tokens[i]].mean() for i in range(2 * b)]))


def our_loss(batch: Batch, terms: list[LossConfig]) -> float:
    return preference_loss(terms, sequence_logps(batch), LossState()).losses.mean().item()


L = LossConfig
# (id, our terms, TRL's DPOConfig, [the chosen lengths, the dtype of the per-token log-probs, tolerance]: DEFAULTS)
DEFAULTS = (CHOSEN_LENGTHS, torch.float64, 1e-10)
CASES = [
    ("sigmoid", [L()], {"loss_type": "sigmoid"}),
    ("ipo", [L(type="ipo")], {"loss_type": "ipo"}),  # both length-normalized
    ("hinge", [L(type="hinge")], {"loss_type": "hinge"}),
    ("robust", [L(type="robust", label_smoothing=0.1)], {"loss_type": "robust", "label_smoothing": 0.1}),
    # TRL makes ε a float32 tensor: log ε is rounded to float32
    ("exo_pair", [L(type="exo_pair")], {"loss_type": "exo_pair", "label_smoothing": 1e-3}, CHOSEN_LENGTHS,
     torch.float64, 1e-6),
    ("nca_pair", [L(type="nca_pair")], {"loss_type": "nca_pair"}),
    ("bco_pair", [L(type="bco_pair")], {"loss_type": "bco_pair"}),  # δ = 0: a fresh LossState, TRL has no mean
    ("sppo_hard", [L(type="sppo_hard")], {"loss_type": "sppo_hard"}),
    ("aot", [L(type="aot")], {"loss_type": "aot"}),
    ("aot-smoothed", [L(type="aot", label_smoothing=0.1)], {"loss_type": "aot", "label_smoothing": 0.1}),
    ("aot_pair", [L(type="aot_pair")], {"loss_type": "aot_unpaired"}),
    ("aot_pair-smoothed", [L(type="aot_pair", label_smoothing=0.1)],
     {"loss_type": "aot_unpaired", "label_smoothing": 0.1}),
    ("apo_zero", [L(type="apo_zero")], {"loss_type": "apo_zero"}),
    ("apo_down", [L(type="apo_down")], {"loss_type": "apo_down"}),
    ("discopop", [L(type="discopop")], {"loss_type": "discopop"}),
    ("discopop-tau", [L(type="discopop", discopop_tau=0.3)], {"loss_type": "discopop", "discopop_tau": 0.3}),
    ("f-reverse_kl", [L(type="f_divergence")], {"loss_type": "sigmoid", "f_divergence_type": "reverse_kl"}),
    ("f-forward_kl", [L(type="f_divergence", divergence="forward_kl")],
     {"loss_type": "sigmoid", "f_divergence_type": "forward_kl"}),
    ("f-js", [L(type="f_divergence", divergence="js_divergence")],
     {"loss_type": "sigmoid", "f_divergence_type": "js_divergence"}),
    # α: ours f'(u) = (1 − u^−α)/α (the f-DPO paper), TRL's f'(t) = (t^(α'−1) − 1)/(α'−1): α' = 1 − α. TRL's
    # alpha_divergence takes float16/bfloat16/float32 only (its exp clamp is a dict of those: float64 is a KeyError),
    # and computes exp in float32: float32 log-probs, for both (ours upcast to float64).
    *((f"f-alpha-{a}", [L(type="f_divergence", divergence="alpha_divergence", f_alpha=a)],
       {"loss_type": "sigmoid", "f_divergence_type": "alpha_divergence", "f_alpha_divergence_coef": 1 - a},
       CHOSEN_LENGTHS, torch.float32, 1e-5) for a in (0.5, 0.3, 1.0)),
    ("sft", [L(type="sft")], {"loss_type": "sft"}, EQUAL_CHOSEN),
    *((f"ld-{a}", [L(ld_alpha=a)], {"loss_type": "sigmoid", "ld_alpha": a}) for a in (0.5, 1.0, 0.0)),
    ("ld-ipo", [L(type="ipo", ld_alpha=0.5)], {"loss_type": "ipo", "ld_alpha": 0.5}),
    ("wpo", [L(wpo=True)], {"loss_type": "sigmoid", "use_weighting": True}),
    ("wpo-apo_zero", [L(type="apo_zero", wpo=True)], {"loss_type": "apo_zero", "use_weighting": True}),
    ("sigmoid_norm", [L(length_normalize=True)], {"loss_type": "sigmoid_norm"}),
    ("mix", [L(weight=0.8), L(type="bco_pair", weight=0.2), L(type="sft")],
     {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, EQUAL_CHOSEN),
    ("rpo", [L(sft_weight=0.5)], {"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5]}, EQUAL_CHOSEN),
]


@pytest.mark.parametrize("beta", [0.1, 1.0])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_dpo_family_equals_trl(case, beta):
    _, terms, config, *rest = case
    chosen_lengths, dtype, tol = (*rest, *DEFAULTS[len(rest):])
    terms = [t.model_copy(update={"beta": beta}) for t in terms]
    batch = make_batch(chosen_lengths, dtype)
    for part in (batch, *(batch.pair(i) for i in range(len(chosen_lengths)))):  # the batch mean, then per pair
        ours, theirs = our_loss(part, terms), trl_dpo_loss(part, beta=beta, **config)
        assert ours == pytest.approx(theirs, rel=tol, abs=tol)


def test_the_inputs_exercise_what_is_compared():
    # AOT's sorts pair other responses than the given pairs; the hinge is both active and 0 at β = 1; LD-DPO has
    # tails (and pairs of equal length, none); WPO's weights are not 1.
    s = sequence_logps(make_batch())
    margins = (s.policy - s.reference)[:4] - (s.policy - s.reference)[4:]
    policy, ref = s.policy[:4] - s.policy[4:], s.reference[:4] - s.reference[4:]
    assert not torch.equal(policy.argsort(), ref.argsort())
    ratios = s.policy - s.reference
    assert not torch.equal(ratios[:4].argsort(), ratios[4:].argsort())
    assert (margins > 1).any() and (margins < 1).any()
    assert (s.policy_tail < 0).any() and (s.policy_tail[[3, 7]] == 0).all()
    assert ((torch.exp(s.wpo_logps) - 1).abs() > 0.05).all()


def mean_logps(seed: int = 0) -> tuple[SequenceLogps, torch.Tensor, torch.Tensor]:
    """Ours (sums and lengths) and the mean token log-probs that TRL's CPO and ORPO trainers compute."""
    s = sequence_logps(make_batch(seed=seed))
    means = s.policy / s.lengths
    b = means.shape[0] // 2
    return SequenceLogps(s.policy, None, s.lengths), means[:b], means[b:]


@pytest.mark.parametrize("beta, gamma, smoothing", [(2.0, 0.5, 0.0), (2.5, 1.0, 0.1), (0.1, 0.0, 0.0)])
def test_simpo_equals_trl(beta, gamma, smoothing):
    s, chosen, rejected = mean_logps()
    cpo = SimpleNamespace(beta=beta, simpo_gamma=gamma, label_smoothing=smoothing, alpha=0.0, loss_type="simpo",
                          accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, _, _ = CPOTrainer.cpo_loss(cpo, chosen, rejected)
    ours = preference_loss([L(type="simpo", beta=beta, gamma=gamma, label_smoothing=smoothing)], s).losses
    assert theirs.dtype == torch.float64 and ours.tolist() == pytest.approx(theirs.tolist(), rel=1e-10, abs=1e-10)


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_orpo_equals_trl(beta):
    # TRL's ORPO loss is NLL − mean(β log σ(log odds)), its NLL the token mean over the batch's chosen responses;
    # ours per pair: the chosen response's mean token NLL − β log σ(log odds). TRL computes the odds in float32.
    s, chosen, rejected = mean_logps()
    orpo = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    theirs, _, _, _, _ = ORPOTrainer.odds_ratio_loss(orpo, chosen, rejected)
    ours = preference_loss([L(type="orpo", beta=beta)], s).losses
    assert ours.tolist() == pytest.approx((-chosen - theirs.double()).tolist(), rel=1e-6, abs=1e-6)
