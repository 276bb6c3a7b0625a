"""Per-token log-probs of given tokens under a transformers causal LM, without a [batch, seq, vocab] log-softmax.

Only the positions whose next token is scored go through the LM head, in chunks of `chunk_tokens` (by default
about 2^24 logits: 130 tokens at a 128k vocabulary, 512 at 32k), so the forward holds one chunk's fp32
`tokens x vocab` logits at a time. Shared by the `hf` scoring engine and training.

Training (`recompute=True`, `train.parallel.recompute_head`): each chunk's head runs under non-reentrant
activation checkpointing, so autograd keeps only the chunk's hidden states and recomputes its logits in backward;
without it, backward keeps every chunk's fp32 logits (and softmax) alive, `scored tokens x vocab x 4` bytes and
more. The recompute costs one more head matmul per step; checkpointing works on any head (tied weights, LoRA,
`output_logits`' scaling and soft-capping) and under FSDP2, whose root (the head's owner) keeps its parameters
gathered from forward to backward.

Batches are right-padded, so callers pass no attention mask: a pad only ever follows the tokens it could disturb,
plain causal attention gives every scored token the same log-prob (tested), and attention runs its causal kernel
(flash on GPU) instead of a masked one: measured 20-35% less time per fwd+bwd on a 21M model on CPU. Packed rows
(`train.packing`, pipeline/dpo/batching.py) pass `position_ids` that restart per sequence instead, and no mask:
transformers then builds the block-causal mask that keeps each sequence to itself.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

LOGITS_PER_CHUNK = 1 << 24  # fp32: 64 MiB per chunk of logits


def selective_token_logps(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                          score_mask: torch.Tensor, chunk_tokens: int | None = None, log_sum_sq: bool = False,
                          recompute: bool = False, position_ids: torch.Tensor | None = None):
    """log p(input_ids[b, t] | input_ids[b, :t]) for every (b, t) with score_mask[b, t], in row-major order.

    Args:
        input_ids, score_mask: [B, T]; right padding; score_mask[:, 0] must be False.
        attention_mask: [B, T], or None for right-padded rows (the same result, faster).
        chunk_tokens: scored tokens per pass through the head (default: LOGITS_PER_CHUNK / vocab, 64 to 4096).
        log_sum_sq: also return log Σ_v p(v)² at each scored token (WPO's weights), without gradient.
        recompute: with gradients, recompute each chunk's logits in backward instead of keeping them.
        position_ids: [B, T] for packed rows (restarting at each sequence; attention_mask None): transformers then
            masks attention to each sequence (pipeline/dpo/batching.py `collate_packed`).
    Returns:
        [N] float32, N = score_mask.sum(); the log-probs of the masked tokens, row by row, left to right (and
        with `log_sum_sq`, a second [N] tensor).
    """
    # use_cache=False: no KV cache is built for a scoring/training forward (it also forced torch.compile to
    # recompile per layer).
    extra = {"position_ids": position_ids} if position_ids is not None else {}
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                                 **extra).last_hidden_state  # [B, T, H]
    # The token at t is predicted from the hidden state at t - 1.
    pred_mask = score_mask[:, 1:]
    h = hidden[:, :-1][pred_mask]  # [N, H]
    targets = input_ids[:, 1:][pred_mask]  # [N]
    head = model.get_output_embeddings()
    if chunk_tokens is None:
        chunk_tokens = min(4096, max(64, LOGITS_PER_CHUNK // head.weight.shape[0]))
    recompute = recompute and torch.is_grad_enabled() and h.requires_grad
    out, sq = [], []
    for s in range(0, h.shape[0], chunk_tokens):
        args = (head, model.config, h[s:s + chunk_tokens], targets[s:s + chunk_tokens], log_sum_sq)
        logp, chunk_sq = checkpoint(_head_logps, *args, use_reentrant=False) if recompute else _head_logps(*args)
        out.append(logp)
        sq.append(chunk_sq)
    logps = torch.cat(out) if out else h.new_zeros(0, dtype=torch.float32)
    if log_sum_sq:
        return logps, torch.cat(sq) if sq else logps.detach().clone()
    return logps


def _head_logps(head, config, h: torch.Tensor, targets: torch.Tensor, log_sum_sq: bool):
    """One chunk: log p(target) from the head's fp32 logits (and log Σ_v p(v)², without gradient, or None)."""
    logits = output_logits(config, head(h).float())
    norm = logits.logsumexp(-1)
    logp = logits.gather(-1, targets[:, None])[:, 0] - norm
    if not log_sum_sq:
        return logp, None
    with torch.no_grad():
        return logp, (2 * logits).logsumexp(-1) - 2 * norm


def output_logits(config, logits: torch.Tensor) -> torch.Tensor:
    """What the model's own forward does to the LM head's output, by the config fields transformers' causal LMs
    read: Cohere's `logit_scale` (multiply), Granite's `logits_scaling` (divide), Gemma-2/3's
    `final_logit_softcapping` (cap * tanh(logits / cap))."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    scale = getattr(text, "logit_scale", None)
    if isinstance(scale, (int, float)):
        logits = logits * scale
    scaling = getattr(text, "logits_scaling", None)
    if isinstance(scaling, (int, float)):
        logits = logits / scaling
    cap = getattr(text, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits
