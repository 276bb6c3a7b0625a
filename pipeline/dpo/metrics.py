"""Training metrics: per-pair values summed per step over all ranks (what pipeline.training.metrics_log writes).

Stable names (README "Training metrics"): loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, grad_norm, lr, tokens_per_s, pairs_per_s, peak_rss_mb; eval/loss,
eval/rewards/accuracies, eval/rewards/margins.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from pipeline.dpo.losses import PairOutputs

# Order of the per-step sums all-reduced across ranks.
_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
         "pairs", "tokens")


class StepSums:
    """Accumulates per-pair values of the micro-batches of one step on one rank, on the batch's device: adding
    never waits for the device; `reduce` does, once per step."""

    def __init__(self):
        self.values: torch.Tensor | None = None  # the first six sums, on the device
        self.counts = [0, 0]  # pairs, tokens (host integers)
        self.extras: dict[str, torch.Tensor] = {}  # sums of the losses' named per-pair values (PairOutputs.extras)

    def add(self, out: PairOutputs, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, tokens: int):
        v = torch.stack([out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                         (out.chosen_rewards > out.rejected_rewards).float().sum(), policy_chosen.detach().sum(),
                         policy_rejected.detach().sum()]).double()
        self.values = v if self.values is None else self.values + v
        for name, per_pair in out.extras.items():
            total = per_pair.detach().sum().double()
            self.extras[name] = self.extras[name] + total if name in self.extras else total
        self.counts[0] += out.losses.shape[0]
        self.counts[1] += tokens

    def reduce(self, device) -> dict[str, float]:
        """All-reduce (sum) across ranks, then means per pair. A collective: every rank must call it."""
        values = self.values if self.values is not None else torch.zeros(6, dtype=torch.float64)
        names = sorted(self.extras)  # the same on every rank: the terms' metrics
        extras = [self.extras[n].to(device).reshape(1) for n in names]
        total = torch.cat([values.to(device), torch.tensor(self.counts, dtype=torch.float64, device=device), *extras])
        if dist.is_initialized():
            dist.all_reduce(total)
        values = total.cpu().tolist()
        s = dict(zip(_SUMS, values))
        n = max(s["pairs"], 1)
        out = {k: s[k] / n for k in _SUMS[:6]}
        out.update({name: v / n for name, v in zip(names, values[len(_SUMS):])})
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["pairs"], out["tokens"] = s["pairs"], s["tokens"]
        return out
