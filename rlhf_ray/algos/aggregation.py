"""Masked reductions and the loss-aggregation modes (token mean, sequence mean, Dr. GRPO's constant norm).

Conventions: ``mask`` is a float or bool (B, T) tensor, 1 on response (action) tokens. Results are float32.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from rlhf_ray.algos.names import LOSS_AGG_MODES

__all__ = ["LOSS_AGG_MODES", "agg_loss", "last_index", "masked_mean", "masked_sum", "masked_whiten"]


def masked_sum(x: Tensor, mask: Tensor, dim: Optional[int] = None) -> Tensor:
    """sum(x * mask) over ``dim`` (all entries when None). x, mask: (B, T)."""
    prod = x.float() * mask.float()
    return prod.sum() if dim is None else prod.sum(dim=dim)


def masked_mean(x: Tensor, mask: Tensor, dim: Optional[int] = None, eps: float = 1e-8) -> Tensor:
    """sum(x * mask) / max(sum(mask), eps) over ``dim`` (all entries when None); 0 where the mask is empty.

    x, mask: (B, T).
    """
    return masked_sum(x, mask, dim) / masked_sum(torch.ones_like(x, dtype=torch.float32), mask, dim).clamp_min(eps)


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps), mean and (biased, 1/N) variance over the masked entries of x.

    x, mask: (B, T) -> (B, T). With ``shift_mean=False`` the mean is added back (only the scale changes).
    The same affine map is applied to entries outside the mask; callers multiply by the mask if they
    need zeros there.
    """
    x = x.float()
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    return whitened if shift_mean else whitened + mean


def last_index(mask: Tensor) -> Tensor:
    """Index of the last position where ``mask`` is 1 in each row, -1 for rows with none.

    mask: (B, T) -> (B,) long.
    """
    positions = torch.arange(mask.shape[-1], device=mask.device).expand(mask.shape)
    return torch.where(mask.bool(), positions, torch.full_like(positions, -1)).max(dim=-1).values


def agg_loss(loss_mat: Tensor, mask: Tensor, mode: str, num_tokens: int, num_seqs: int, horizon: int) -> Tensor:
    """One micro-batch's additive share of the mini-batch loss; the shares of all micro-batches sum to it.

    loss_mat, mask: (b, T) for the micro-batch. ``num_tokens`` (masked tokens) and ``num_seqs`` (rows)
    count the whole global mini-batch across micro-batches and ranks; ``horizon`` is the max response
    length (a constant). With s_b = sum_t loss[b, t] * mask[b, t] and n_b = sum_t mask[b, t]:

        token_mean               sum_b s_b / num_tokens
        seq_mean_token_mean      sum_b (s_b / max(1, n_b)) / num_seqs
        seq_mean_token_sum       sum_b s_b / num_seqs
        seq_mean_token_sum_norm  sum_b s_b / (num_seqs * horizon)      (Dr. GRPO, Liu et al. 2025)

    Counts below 1 are treated as 1. Returns a float32 scalar.
    """
    row_sums = masked_sum(loss_mat, mask, dim=-1)
    if mode == "token_mean":
        return row_sums.sum() / max(num_tokens, 1)
    if mode == "seq_mean_token_mean":
        row_tokens = mask.float().sum(dim=-1).clamp_min(1.0)
        return (row_sums / row_tokens).sum() / max(num_seqs, 1)
    if mode == "seq_mean_token_sum":
        return row_sums.sum() / max(num_seqs, 1)
    if mode == "seq_mean_token_sum_norm":
        return row_sums.sum() / (max(num_seqs, 1) * max(horizon, 1))
    raise ValueError(f"unknown loss_agg mode {mode!r}; known: {', '.join(LOSS_AGG_MODES)}")
