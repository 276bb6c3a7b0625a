"""One DPO optimizer step, free of Ray: what a Ray Train worker computes per step, and what the GPU benchmark
times with no Ray at all (benchmarks/bench_gpu_step.py).

A step takes this rank's pairs of a global batch, groups them by length into micro-batches, and for each runs
one forward over chosen + rejected, the configured loss, and a backward of its share of the mean loss; then clips
and steps the optimizer. Nothing here waits for the device until the caller reads the step's sums. FSDP specifics
(when gradients reduce, the DTensor gradient norm) go through pipeline/dpo/parallel.py.
"""

from __future__ import annotations

import math
import resource
from dataclasses import dataclass, field

import pyarrow as pa
import torch
import torch.distributed as dist
from torch import nn

from pipeline.dpo.batching import by_length, collate, collate_packed, pair_tokens
from pipeline.dpo.losses import LossState, PairOutputs, SequenceLogps, preference_loss
from pipeline.dpo.metrics import StepSums
from pipeline.dpo.parallel import full_tensor, set_gradient_sync, sync_every_micro_batch
from pipeline.errors import UserError


@dataclass
class StepCompute:
    """The compute of training steps: the policy (a `PolicyLogps`, FSDP-sharded or not), an optional in-loop
    reference (None: the cached reference log-probs in the rows are used, if any term needs them), the terms of
    `train.loss`, the tokenizer's pad id and the device. `state` holds what stateful losses carry between steps
    (BCO's running reward mean); the caller updates it after each step and checkpoints it."""

    policy: nn.Module
    reference: nn.Module | None
    terms: list  # pipeline.config LossConfig, one per term of train.loss
    pad_id: int
    device: torch.device | str
    attention_mask: bool = False  # True: pass the padding mask anyway (only to measure what leaving it out saves)
    state: LossState = field(default_factory=LossState)
    # `train.packing` (`packing_mode`): padding-free rows (pipeline/dpo/batching.py `collate_packed`); "auto":
    # packed if the model's attention keeps packed sequences apart, else padded (`check_packing`).
    packing: bool | str = False
    _packing_checked: bool = False

    def forward(self, table: pa.Table) -> tuple[PairOutputs, torch.Tensor, torch.Tensor, int]:
        """Per-pair outputs, policy log-prob sums (chosen, rejected) and the real token count of one micro-batch;
        one forward scores chosen and rejected together."""
        if self.packing and not self._packing_checked:
            self.check_packing()
        cpu = collate_packed(table, self.pad_id) if self.packing else collate(table, self.pad_id)
        tokens = cpu.tokens  # counted on the host: no device sync
        batch = cpu.to(self.device)
        wpo = any(t.wpo for t in self.terms)
        ld = any(t.ld_alpha is not None for t in self.terms)
        # Right padding: every pad comes after the tokens it could disturb, so plain causal attention (no mask)
        # gives the scored tokens the same log-probs and lets attention use its fastest kernel.
        # Packed rows: no mask either, and position_ids that restart per sequence keep attention within each.
        mask = batch.attention_mask if self.attention_mask and not self.packing else None
        pos = {"position_ids": batch.position_ids} if self.packing else {}
        out = self.policy(batch.input_ids, mask, batch.score_mask, **({"log_sum_sq": True} if wpo else {}), **pos)
        token_logps, sq = (out[0].float(), out[1]) if wpo else (out.float(), None)
        s = SequenceLogps(batch.sequence_sums(token_logps), None, batch.response_lengths)
        if ld:
            s.policy_tail = batch.tail_sums(token_logps)
        if wpo:
            s.wpo_logps = batch.sequence_sums(token_logps.detach() - sq) / batch.response_lengths
        if self.reference is not None:
            with torch.no_grad():
                ref = self.reference(batch.input_ids, mask, batch.score_mask, **pos).float()
            s.reference = batch.sequence_sums(ref)
            s.reference_tail = batch.tail_sums(ref) if ld else None
        elif any(t.needs_reference for t in self.terms):
            s.reference = torch.cat([batch.ref_chosen, batch.ref_rejected]).float()
            s.reference_tail = batch.ref_tail.float() if ld else None
        b = batch.pairs
        return preference_loss(self.terms, s, self.state), s.policy[:b], s.policy[b:], tokens

    def check_packing(self) -> str | None:
        """Refuse packing for a model whose attention does not keep packed sequences apart: one sequence after two
        different ones, in packed rows, must get the same log-probs (transformers masks by position_ids only where
        the model builds its mask with `create_causal_mask`). One tiny forward, on every rank alike (FSDP). With
        `packing="auto"`, such a model trains padded instead: returns why (None: packing stays as it was)."""
        if not self.packing:
            return None
        first, other, probe = [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16, 17]
        ids = torch.tensor([first + probe, other + probe], device=self.device)
        positions = torch.tensor([list(range(4)) + list(range(5))] * 2, device=self.device)
        score = torch.zeros_like(ids, dtype=torch.bool)
        score[:, 5:] = True  # the probe's tokens after its first (which is predicted from the row's previous one)
        training = self.policy.training
        self.policy.eval()  # dropout (`train.dropout: true`) would move the probe's log-probs too
        with torch.no_grad():
            logps = self.policy(ids, None, score, position_ids=positions).float().view(2, -1)
        self.policy.train(training)
        leak = float((logps[0] - logps[1]).abs().max())
        self._packing_checked = True
        if leak > 1e-3:
            name = type(getattr(self.policy, "lm", self.policy)).__name__
            why = f"{name}'s attention lets packed sequences see each other (log-probs moved by {leak:.3g})"
            if self.packing == "auto":
                self.packing = False
                return why
            raise UserError(f"train.packing: {why}; set train.packing: false for this model")
        return None

    def accumulate(self, pairs: pa.Table, micro_batch_pairs: int, sums: StepSums,
                   micro_batch_tokens: int | None = None) -> None:
        """Forward + backward over `pairs` (this rank's share of a global batch) in length-grouped micro-batches
        (`micro_batches`); gradients accumulate as d(sum of losses / len(pairs)). FSDP averages over ranks: the
        global mean."""
        n = pairs.num_rows
        grouped = by_length(pairs)
        spans = micro_batches(grouped, micro_batch_pairs, micro_batch_tokens)
        every = sync_every_micro_batch()
        for k, (i, size) in enumerate(spans):
            # FSDP2 on several ranks: each micro-batch's gradient is reduce-scattered into the rank's shard (1/W of
            # the model); on one rank, once a step, after the last micro-batch (the others accumulate in place).
            set_gradient_sync(self.policy, every or k == len(spans) - 1)
            out, policy_chosen, policy_rejected, tokens = self.forward(grouped.slice(i, size))
            (out.losses.sum() / n).backward()
            sums.add(out, policy_chosen, policy_rejected, tokens)

    def evaluate(self, table: pa.Table, sums: StepSums) -> None:
        with torch.no_grad():
            out, policy_chosen, policy_rejected, tokens = self.forward(table)
        sums.add(out, policy_chosen, policy_rejected, tokens)


def packing_mode(setting: bool | str, device: torch.device | str) -> bool | str:
    """What `train.packing` means on `device`: `auto` packs on a CPU (measured faster there: padding-free rows
    beside length-grouped padded ones, docs/OPTIMIZATIONS.md) and pads on a GPU until measured there."""
    if setting != "auto":
        return bool(setting)
    return "auto" if torch.device(device).type == "cpu" else False


def micro_batches(pairs: pa.Table, micro_batch_pairs: int, micro_batch_tokens: int | None = None) \
        -> list[tuple[int, int]]:
    """(start, size) of each micro-batch over consecutive pairs: `micro_batch_pairs` pairs each, or, given
    `micro_batch_tokens`, as many pairs as fit in that many tokens (prompt twice + chosen + rejected; at least one
    pair each)."""
    n = pairs.num_rows
    if micro_batch_tokens is None:
        return [(i, min(micro_batch_pairs, n - i)) for i in range(0, n, micro_batch_pairs)]
    spans, start, used = [], 0, 0
    for i, t in enumerate(pair_tokens(pairs)):
        if i > start and used + t > micro_batch_tokens:
            spans.append((start, i - start))
            start, used = i, 0
        used += int(t)
    if n:
        spans.append((start, n - start))
    return spans


def make_optimizer(params, lr: float, weight_decay: float = 0.0, fused: bool = True) -> torch.optim.Optimizer:
    """AdamW, fused (one kernel over all parameters; on DTensor shards the default foreach path dispatches op by
    op: measured on an H200 with a 0.5B model, 2.02 -> 1.42 s per step)."""
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state this rank holds (its shards of each tensor)."""
    total = 0
    for state in opt.state.values():
        for v in state.values():
            if isinstance(v, torch.Tensor):
                local = v.to_local() if hasattr(v, "to_local") else v
                total += local.numel() * local.element_size()
    return total


def worker_maxima(read_bytes: int, opt: torch.optim.Optimizer, device) -> dict[str, float]:
    """The largest of any worker (a collective): peak resident memory so far, cache bytes read, optimizer state
    held (its shards: Adam's two moments of the trained parameters)."""
    t = torch.tensor([resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, read_bytes / 2**20,
                      optimizer_state_bytes(opt) / 2**20], dtype=torch.float64)
    if dist.is_initialized():
        t = t.to(device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return {"peak_rss_mb": float(t[0]), "data/read_mb": float(t[1]), "optim_state_mb": float(t[2])}


def optimizer_step(policy: nn.Module, opt: torch.optim.Optimizer, max_grad_norm: float | None) -> torch.Tensor:
    """Clip (None or 0: only measure) and step; returns the pre-clip gradient norm (a device tensor)."""
    norm = torch.nn.utils.clip_grad_norm_(policy.parameters(), max_grad_norm or float("inf"))
    norm = full_tensor(norm)  # sharded gradients give a DTensor norm
    opt.step()
    opt.zero_grad(set_to_none=True)
    return norm


def lr_schedule(warmup: int, total: int, schedule: str):
    """LambdaLR's factor at each step: linear warm-up, then constant, linear decay to 0, or cosine to 0."""
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 1 - progress) if schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f
