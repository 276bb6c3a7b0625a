"""Pairs from the cache -> one padded batch holding chosen and rejected sequences, and per-sequence sums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


@dataclass
class PairBatch:
    """B pairs as 2B right-padded sequences: rows [0, B) are prompt+chosen, rows [B, 2B) prompt+rejected."""

    input_ids: torch.Tensor  # [2B, T] int64
    attention_mask: torch.Tensor  # [2B, T]
    score_mask: torch.Tensor  # [2B, T] bool: response tokens
    response_lengths: torch.Tensor  # [2B] float32
    ref_chosen: torch.Tensor  # [B] float64 sums from the cache (zeros if absent)
    ref_rejected: torch.Tensor  # [B]
    ref_tail: torch.Tensor | None = None  # [2B] cached sums past the pair's shorter response (LD-DPO), if read

    @property
    def pairs(self) -> int:
        return self.ref_chosen.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def sequence_sums(self, token_logps: torch.Tensor) -> torch.Tensor:
        """[N] scored-token log-probs (row-major, as `selective_token_logps` returns) -> [2B] per-sequence sums."""
        rows = self.score_mask.nonzero()[:, 0]
        return torch.zeros(self.score_mask.shape[0], dtype=token_logps.dtype,
                           device=token_logps.device).index_add_(0, rows, token_logps)

    def tail_sums(self, token_logps: torch.Tensor) -> torch.Tensor:
        """[N] scored-token log-probs -> [2B] sums over each response's tokens past the shorter response of its
        pair (LD-DPO's "verbose" part; Liu et al. 2024)."""
        position = (self.score_mask.cumsum(1) - 1)[self.score_mask]  # [N] index within its response
        rows = self.score_mask.nonzero()[:, 0]
        b = self.pairs
        shared = torch.minimum(self.response_lengths[:b], self.response_lengths[b:]).repeat(2)
        return self.sequence_sums(token_logps * (position >= shared[rows]))

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) if t is not None else None for t in (
            self.input_ids, self.attention_mask, self.score_mask, self.response_lengths, self.ref_chosen,
            self.ref_rejected, self.ref_tail)))


def list_column(col) -> list[np.ndarray]:
    """list<int> Arrow column -> one numpy array per row, via offsets (no per-element Python objects)."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    flat = arr.flatten().to_numpy(zero_copy_only=False)
    offsets = arr.offsets.to_numpy() - arr.offsets[0].as_py()
    return [flat[offsets[i]:offsets[i + 1]] for i in range(len(arr))]


def pad_sequences(seqs: list[np.ndarray], starts: list[int], pad_id: int = 0):
    """Right-pad token sequences to one width: (input_ids [N, T] int64, attention_mask [N, T], score_mask [N, T]
    bool, True from each sequence's `start` to its end)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(seqs), width, dtype=torch.long)
    score = torch.zeros(len(seqs), width, dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, starts)):
        ids[i, :len(s)] = torch.from_numpy(s.astype(np.int64))
        attn[i, :len(s)] = 1
        score[i, start:len(s)] = True
    return ids, attn, score


def by_length(table: pa.Table) -> pa.Table:
    """Pair rows ordered by their longer sequence (prompt + the longer response), so that consecutive micro-batches
    hold similar lengths and each pads less. The step's gradient is a sum over the same pairs: unchanged."""
    prompt = pc.list_value_length(table.column("prompt_input_ids")).to_numpy()
    longer = np.maximum(pc.list_value_length(table.column("chosen_input_ids")).to_numpy(),
                        pc.list_value_length(table.column("rejected_input_ids")).to_numpy())
    return table.take(np.argsort(prompt + longer, kind="stable"))


def collate(table: pa.Table, pad_id: int = 0) -> PairBatch:
    """Cache rows (pyarrow) -> PairBatch. One forward then scores chosen and rejected together."""
    prompts = list_column(table.column("prompt_input_ids"))
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for p, r in zip(prompts, list_column(table.column(f"{side}_input_ids"))):
            seqs.append(np.concatenate([p, r]))
            starts.append(len(p))
    ids, attn, score = pad_sequences(seqs, starts, pad_id)
    lengths = score.sum(1).float()

    def ref(name: str) -> torch.Tensor:
        if name in table.column_names:
            return torch.from_numpy(table.column(name).to_numpy().astype(np.float64))
        return torch.zeros(table.num_rows, dtype=torch.float64)

    return PairBatch(ids, attn, score, lengths, ref("ref_chosen_logps"), ref("ref_rejected_logps"),
                     _cached_tails(table, lengths))


def _cached_tails(table: pa.Table, lengths: torch.Tensor) -> torch.Tensor | None:
    """[2B] sums of the cached per-token reference log-probs past each pair's shorter response, if the table has
    them (read only for LD-DPO)."""
    if "ref_chosen_token_logps" not in table.column_names:
        return None
    b = table.num_rows
    shared = torch.minimum(lengths[:b], lengths[b:]).to(torch.int64).tolist()
    tails = [float(np.asarray(tokens[k:], np.float64).sum())
             for side in ("chosen", "rejected")
             for tokens, k in zip(list_column(table.column(f"ref_{side}_token_logps")), shared)]
    return torch.tensor(tails, dtype=torch.float64)
