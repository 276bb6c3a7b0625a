"""Pairs from the cache -> one padded batch holding chosen and rejected sequences, and per-sequence sums."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch


@dataclass
class PairBatch:
    """B pairs as 2B sequences, numbered chosen 0..B-1 then rejected B..2B-1. Padded (`collate`): one right-padded
    row per sequence, in that order. Packed (`collate_packed`): several sequences per row, `position_ids`
    restarting at each, and `token_sequence` / `token_position` saying whose each scored token is."""

    input_ids: torch.Tensor  # [rows, T] int64
    attention_mask: torch.Tensor  # [rows, T]: 1 on real tokens
    score_mask: torch.Tensor  # [rows, T] bool: response tokens
    response_lengths: torch.Tensor  # [2B] float32
    ref_chosen: torch.Tensor  # [B] float64 sums from the cache (zeros if absent)
    ref_rejected: torch.Tensor  # [B]
    ref_tail: torch.Tensor | None = None  # [2B] cached sums past the pair's shorter response (LD-DPO), if read
    position_ids: torch.Tensor | None = None  # [rows, T], packed only
    token_sequence: torch.Tensor | None = None  # [N] int64: the sequence of each scored token (packed only)
    token_position: torch.Tensor | None = None  # [N] int64: its index within its response (packed only)

    @property
    def pairs(self) -> int:
        return self.ref_chosen.shape[0]

    @property
    def tokens(self) -> int:
        return int(self.attention_mask.sum())

    def _sequence_of_tokens(self) -> torch.Tensor:
        if self.token_sequence is not None:
            return self.token_sequence
        return self.score_mask.nonzero()[:, 0]  # padded: row = sequence

    def sequence_sums(self, token_logps: torch.Tensor) -> torch.Tensor:
        """[N] scored-token log-probs (row-major, as `selective_token_logps` returns) -> [2B] per-sequence sums."""
        return torch.zeros(2 * self.pairs, dtype=token_logps.dtype,
                           device=token_logps.device).index_add_(0, self._sequence_of_tokens(), token_logps)

    def tail_sums(self, token_logps: torch.Tensor) -> torch.Tensor:
        """[N] scored-token log-probs -> [2B] sums over each response's tokens past the shorter response of its
        pair (LD-DPO's "verbose" part; Liu et al. 2024)."""
        position = self.token_position if self.token_position is not None else \
            (self.score_mask.cumsum(1) - 1)[self.score_mask]  # [N] index within its response
        b = self.pairs
        shared = torch.minimum(self.response_lengths[:b], self.response_lengths[b:]).repeat(2)
        return self.sequence_sums(token_logps * (position >= shared[self._sequence_of_tokens()]))

    def to(self, device) -> PairBatch:
        return PairBatch(*(t.to(device) if t is not None else None for t in (
            self.input_ids, self.attention_mask, self.score_mask, self.response_lengths, self.ref_chosen,
            self.ref_rejected, self.ref_tail, self.position_ids, self.token_sequence, self.token_position)))


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


def pair_tokens(table: pa.Table) -> np.ndarray:
    """Tokens each pair's forward holds: its prompt twice (once per side), chosen and rejected."""
    length = {c: pc.list_value_length(table.column(f"{c}_input_ids")).to_numpy()
              for c in ("prompt", "chosen", "rejected")}
    return 2 * length["prompt"] + length["chosen"] + length["rejected"]


def by_length(table: pa.Table) -> pa.Table:
    """Pair rows ordered by their longer sequence (prompt + the longer response), so that consecutive micro-batches
    hold similar lengths and each pads less. The step's gradient is a sum over the same pairs: unchanged."""
    prompt = pc.list_value_length(table.column("prompt_input_ids")).to_numpy()
    longer = np.maximum(pc.list_value_length(table.column("chosen_input_ids")).to_numpy(),
                        pc.list_value_length(table.column("rejected_input_ids")).to_numpy())
    return table.take(np.argsort(prompt + longer, kind="stable"))


def _sequences(table: pa.Table) -> tuple[list[np.ndarray], list[int]]:
    """The 2B sequences (prompt + chosen for every pair, then prompt + rejected) and where each response starts."""
    prompts = list_column(table.column("prompt_input_ids"))
    seqs, starts = [], []
    for side in ("chosen", "rejected"):
        for p, r in zip(prompts, list_column(table.column(f"{side}_input_ids"))):
            seqs.append(np.concatenate([p, r]))
            starts.append(len(p))
    return seqs, starts


def _refs(table: pa.Table) -> tuple[torch.Tensor, torch.Tensor]:
    def ref(name: str) -> torch.Tensor:
        if name in table.column_names:
            return torch.from_numpy(table.column(name).to_numpy().astype(np.float64))
        return torch.zeros(table.num_rows, dtype=torch.float64)

    return ref("ref_chosen_logps"), ref("ref_rejected_logps")


def collate(table: pa.Table, pad_id: int = 0) -> PairBatch:
    """Cache rows (pyarrow) -> PairBatch. One forward then scores chosen and rejected together."""
    seqs, starts = _sequences(table)
    ids, attn, score = pad_sequences(seqs, starts, pad_id)
    lengths = score.sum(1).float()
    return PairBatch(ids, attn, score, lengths, *_refs(table), _cached_tails(table, lengths))


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """Sequence indices per row: first fit, longest first, into rows of `capacity` tokens (a longer sequence
    gets a row of its own)."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda k: -lengths[k]):
        row = next((r for r, f in enumerate(free) if f >= lengths[i]), None)
        if row is None:
            rows.append([])
            free.append(max(capacity, lengths[i]))
            row = len(rows) - 1
        rows[row].append(i)
        free[row] -= lengths[i]
    return rows


def collate_packed(table: pa.Table, pad_id: int = 0, capacity: int | None = None) -> PairBatch:
    """Cache rows -> a padding-free PairBatch: the 2B sequences packed into rows of `capacity` tokens (default: the
    longest sequence, so no row is longer than padding would make it), `position_ids` restarting at 0 for each
    sequence. transformers' attention masks (`create_causal_mask`, given position_ids and no attention mask) then
    keep each token's attention within its own sequence; a row's tail of padding follows every real token."""
    seqs, starts = _sequences(table)
    if min(starts) < 1:  # its first scored token would be predicted from the row's previous sequence
        raise ValueError("a sequence with an empty prompt cannot be packed")
    rows = pack_rows([len(s) for s in seqs], capacity or max(len(s) for s in seqs))
    width = max(sum(len(seqs[i]) for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), width, dtype=torch.long)
    score = torch.zeros(len(rows), width, dtype=torch.bool)
    positions = torch.zeros(len(rows), width, dtype=torch.long)
    owner = torch.full((len(rows), width), -1, dtype=torch.long)  # the sequence of each position
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            n = len(seqs[i])
            ids[r, at:at + n] = torch.from_numpy(seqs[i].astype(np.int64))
            positions[r, at:at + n] = torch.arange(n)
            attn[r, at:at + n] = 1
            score[r, at + starts[i]:at + n] = True
            owner[r, at:at + n] = i
            at += n
        positions[r, at:] = torch.arange(width - at)  # the padding: one more "sequence", never scored
    lengths = torch.tensor([len(s) - st for s, st in zip(seqs, starts)], dtype=torch.float32)
    scored_positions = positions[score] - torch.tensor(starts)[owner[score]]
    return PairBatch(ids, attn, score, lengths, *_refs(table), _cached_tails(table, lengths), positions,
                     owner[score], scored_positions)


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
