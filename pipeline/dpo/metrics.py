"""Training metrics: summed per step over all ranks, written by rank 0 to stdout, JSONL and TensorBoard.

Stable names (README "Training metrics"): loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, grad_norm, lr, tokens_per_s, pairs_per_s, peak_rss_mb; eval/loss,
eval/rewards/accuracies, eval/rewards/margins.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from tensorboardX import SummaryWriter

from pipeline.dpo.losses import PairOutputs
from pipeline.store.storage import Store

# Order of the per-step sums all-reduced across ranks.
_SUMS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen", "logps/rejected",
         "pairs", "tokens")


class StepSums:
    """Accumulates per-pair values of the micro-batches of one step on one rank, on the batch's device: adding
    never waits for the device; `reduce` does, once per step."""

    def __init__(self):
        self.values: torch.Tensor | None = None  # the first six sums, on the device
        self.counts = [0, 0]  # pairs, tokens (host integers)

    def add(self, out: PairOutputs, policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, tokens: int):
        v = torch.stack([out.losses.detach().sum(), out.chosen_rewards.sum(), out.rejected_rewards.sum(),
                         (out.chosen_rewards > out.rejected_rewards).float().sum(), policy_chosen.detach().sum(),
                         policy_rejected.detach().sum()]).double()
        self.values = v if self.values is None else self.values + v
        self.counts[0] += out.losses.shape[0]
        self.counts[1] += tokens

    def reduce(self, device) -> dict[str, float]:
        """All-reduce (sum) across ranks, then means per pair. A collective: every rank must call it."""
        values = self.values if self.values is not None else torch.zeros(6, dtype=torch.float64)
        total = torch.cat([values.to(device), torch.tensor(self.counts, dtype=torch.float64, device=device)])
        if dist.is_initialized():
            dist.all_reduce(total)
        s = dict(zip(_SUMS, total.cpu().tolist()))
        n = max(s["pairs"], 1)
        out = {k: s[k] / n for k in _SUMS[:6]}
        out["rewards/margins"] = out["rewards/chosen"] - out["rewards/rejected"]
        out["pairs"], out["tokens"] = s["pairs"], s["tokens"]
        return out


class MetricsLogger:
    """Rank 0 only: one stdout line per logged step, `metrics.jsonl`, and TensorBoard event files.

    With a URI run_dir the files are written in a local staging directory and uploaded: metrics.jsonl at every
    logged step, the TensorBoard files at every checkpoint (`sync`) and at the end."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return

        self.store = Store(run_dir)
        if self.store.local:
            local = Path(self.store.root)
            local.mkdir(parents=True, exist_ok=True)
        else:
            local = Path(tempfile.mkdtemp(prefix="dpo-metrics-"))
            if self.store.exists("metrics.jsonl"):  # resuming: keep appending to the run's metrics
                (local / "metrics.jsonl").write_bytes(self.store.read_bytes("metrics.jsonl"))
        self.local = local
        self.jsonl = open(local / "metrics.jsonl", "a")

        self.tb = SummaryWriter(str(local / "tensorboard"))

    def resume_at(self, step: int) -> None:
        """Keep only the rows of steps up to `step` (and none a crash cut short): a run restarted from the checkpoint
        of `step` logs the later steps again, and metrics.jsonl holds each step once."""
        if not self.enabled:
            return
        self.jsonl.close()
        path = self.local / "metrics.jsonl"
        kept = []
        for line in path.read_text().splitlines(keepends=True):
            try:
                if json.loads(line)["step"] <= step and line.endswith("\n"):
                    kept.append(line)
            except (ValueError, KeyError, TypeError):
                pass
        path.write_text("".join(kept))
        self.jsonl = open(path, "a")

    def log(self, step: int, metrics: dict[str, float], echo=print) -> None:
        if not self.enabled:
            return
        self.jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
        self.jsonl.flush()
        if not self.store.local:
            self.store.write_bytes("metrics.jsonl", (self.local / "metrics.jsonl").read_bytes())
        for k, v in metrics.items():
            self.tb.add_scalar(k, v, step)
        shown = " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if k not in ("pairs", "tokens"))
        echo(f"step {step}: {shown}")

    def sync(self) -> None:
        """Upload the TensorBoard files (URI run_dir; nothing to do on a local disk)."""
        if self.enabled and not self.store.local:
            self.tb.flush()
            self._upload_tensorboard()

    def _upload_tensorboard(self) -> None:
        for f in sorted((self.local / "tensorboard").rglob("*")):
            if f.is_file():
                self.store.write_bytes(f.relative_to(self.local).as_posix(), f.read_bytes())

    def close(self) -> None:
        if self.enabled:
            self.jsonl.close()
            self.tb.close()
            if not self.store.local:
                self._upload_tensorboard()
