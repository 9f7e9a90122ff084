"""Advantage estimators, one per config name in ``ADVANTAGES``, all with the same signature.

    fn(token_rewards (B, T), mask (B, T), group_index (B,), values (B, T) | None, params)
        -> (advantages (B, T), returns (B, T)), float32, zero outside the mask

``token_rewards`` holds the sequence reward at each row's last action token and any KL-in-reward
penalty on every action token; ``group_index`` says which prompt a row answers (samples of one prompt
share it). The group-based estimators score a row by r_b = sum_t token_rewards[b, t] * mask[b, t],
broadcast the advantage to that row's action tokens, and return returns = advantages.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from rlhf_ray.algos.aggregation import last_index, masked_whiten
from rlhf_ray.algos.names import GROUP_BASED, NEEDS_CRITIC

AdvantageFn = Callable[..., tuple[Tensor, Tensor]]
"""``(token_rewards, mask, group_index, values, params, scores=None) -> (advantages, returns)``: token_rewards,
mask (B, T); group_index (B,); values (B, T) or None; scores (B,) the sequences' rewards before any per-token
shaping (KL in the reward), or None to take them from token_rewards."""
ADVANTAGES: dict[str, AdvantageFn] = {}
"""Estimators by ``algo.advantage`` name (``rlhf_ray.algos.names.ADVANTAGE_ESTIMATORS``)."""
__all__ = ["ADVANTAGES", "GROUP_BASED", "NEEDS_CRITIC", "AdvantageParams", "get_advantage"]


@dataclass(frozen=True)
class AdvantageParams:
    """Knobs shared by the estimators (each uses the ones it needs)."""

    gamma: float = 1.0
    """Discount per action token (gae, reinforce_pp, reinforce_pp_baseline)."""
    lam: float = 0.95
    """GAE lambda."""
    norm_by_std: bool = True
    """grpo: divide by the group std; False only centers."""
    eps: float = 1e-6
    """grpo: added to the group std."""


def register(name: str) -> Callable[[AdvantageFn], AdvantageFn]:
    def wrap(fn: AdvantageFn) -> AdvantageFn:
        ADVANTAGES[name] = fn
        return fn
    return wrap


def get_advantage(name: str) -> AdvantageFn:
    """``ADVANTAGES[name]``, or a ValueError listing the known names."""
    if name not in ADVANTAGES:
        raise ValueError(f"unknown advantage estimator {name!r}; known: {', '.join(ADVANTAGES)}")
    return ADVANTAGES[name]


# ---------------------------------------------------------------- helpers

def sequence_scores(token_rewards: Tensor, mask: Tensor) -> Tensor:
    """r_b = sum_t token_rewards[b, t] * mask[b, t]. (B, T) -> (B,)."""
    return (token_rewards.float() * mask.float()).sum(dim=-1)


def group_stats(scores: Tensor, group_index: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-row mean, unbiased (n-1) std and size of the row's group. scores, group_index: (B,) -> 3 x (B,).

    The std of a size-1 group is reported as 0.
    """
    groups, inverse = torch.unique(group_index, return_inverse=True)
    count = scores.new_zeros(groups.numel()).index_add(0, inverse, torch.ones_like(scores))
    mean = scores.new_zeros(groups.numel()).index_add(0, inverse, scores) / count
    sq_dev = scores.new_zeros(groups.numel()).index_add(0, inverse, (scores - mean[inverse]) ** 2)
    std = (sq_dev / (count - 1).clamp_min(1)).sqrt()
    return mean[inverse], std[inverse], count[inverse]


def return_to_go(token_rewards: Tensor, mask: Tensor, gamma: float) -> Tensor:
    """G_t = sum_{k >= t, action} gamma^(#action tokens between t and k) r_k over action tokens only.

    token_rewards, mask: (B, T) -> (B, T), zero outside the mask. Positions where mask = 0 are skipped
    (neither rewarded nor discounted), so masks that start after prompt positions work too.
    """
    mask = mask.bool()
    rewards = token_rewards.float()
    running = rewards.new_zeros(rewards.shape[0])
    out = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        running = torch.where(mask[:, t], rewards[:, t] + gamma * running, running)
        out[:, t] = running
    return out * mask


def _broadcast(per_seq: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(B,) -> advantages = returns = per_seq on every action token, (B, T)."""
    adv = per_seq[:, None] * mask.float()
    return adv, adv.clone()


# ---------------------------------------------------------------- estimators

@register("gae")
def gae(token_rewards: Tensor, mask: Tensor, group_index: Tensor, values: Optional[Tensor],
        params: AdvantageParams, scores: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over action tokens; needs ``values`` (B, T).

    Walking back over action tokens only (mask = 0 positions are skipped; the next value after the
    last action token is 0):
        delta_t = r_t + gamma * V_{t+1} - V_t;   A_t = delta_t + gamma * lam * A_{t+1};   returns = A + V
    No whitening here: the caller may whiten advantages (``masked_whiten``).
    """
    if values is None:
        raise ValueError("advantage 'gae' needs critic values (B, T); got None")
    mask_b = mask.bool()
    rewards, values = token_rewards.float(), values.float()
    next_value = rewards.new_zeros(rewards.shape[0])
    next_adv = rewards.new_zeros(rewards.shape[0])
    adv = torch.zeros_like(rewards)
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + params.gamma * next_value - values[:, t]
        a_t = delta + params.gamma * params.lam * next_adv
        next_adv = torch.where(mask_b[:, t], a_t, next_adv)
        next_value = torch.where(mask_b[:, t], values[:, t], next_value)
        adv[:, t] = next_adv
    mask_f = mask.float()
    return adv * mask_f, (adv + values) * mask_f


@register("grpo")
def grpo(token_rewards: Tensor, mask: Tensor, group_index: Tensor, values: Optional[Tensor],
         params: AdvantageParams, scores: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """GRPO (Shao et al. 2024): A_b = (r_b - mean_g) / (std_g + eps), over the rows of b's group.

    std_g is the unbiased (n-1) std, as torch.std in DeepSeekMath / verl. With ``norm_by_std=False``
    A_b = r_b - mean_g. A group of size 1 gets A = 0.
    """
    scores = sequence_scores(token_rewards, mask)
    mean, std, count = group_stats(scores, group_index)
    centered = scores - mean
    per_seq = centered / (std + params.eps) if params.norm_by_std else centered
    return _broadcast(torch.where(count > 1, per_seq, torch.zeros_like(per_seq)), mask)


@register("dr_grpo")
def dr_grpo(token_rewards: Tensor, mask: Tensor, group_index: Tensor, values: Optional[Tensor],
            params: AdvantageParams, scores: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """Dr. GRPO (Liu et al. 2025): A_b = r_b - mean_g, no std division.

    Its length-bias fix is the loss aggregation (``seq_mean_token_sum_norm``), not part of this estimator.
    """
    scores = sequence_scores(token_rewards, mask)
    mean, _, _ = group_stats(scores, group_index)
    return _broadcast(scores - mean, mask)


@register("rloo")
def rloo(token_rewards: Tensor, mask: Tensor, group_index: Tensor, values: Optional[Tensor],
         params: AdvantageParams, scores: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """RLOO (Ahmadian et al. 2024): A_b = r_b - mean of the other n-1 rows of b's group
    = n / (n - 1) * (r_b - mean_g). A group of size 1 gets A = 0.
    """
    scores = sequence_scores(token_rewards, mask)
    mean, _, count = group_stats(scores, group_index)
    per_seq = count / (count - 1).clamp_min(1) * (scores - mean)
    return _broadcast(torch.where(count > 1, per_seq, torch.zeros_like(per_seq)), mask)


@register("reinforce_pp")
def reinforce_pp(token_rewards: Tensor, mask: Tensor, group_index: Tensor, values: Optional[Tensor],
                 params: AdvantageParams, scores: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ (Hu 2025): G_t = sum_{k >= t} gamma^(k-t) r_k over action tokens (``return_to_go``),
    A = masked_whiten(G) over all action tokens of the batch; returns = G (not whitened).
    """
    returns = return_to_go(token_rewards, mask, params.gamma)
    return masked_whiten(returns, mask) * mask.float(), returns


@register("reinforce_pp_baseline")
def reinforce_pp_baseline(token_rewards: Tensor, mask: Tensor, group_index: Tensor, values: Optional[Tensor],
                          params: AdvantageParams, scores: Optional[Tensor] = None) -> tuple[Tensor, Tensor]:
    """REINFORCE++ with a group baseline: mean_g(r_b) is subtracted at each row's last action token
    (per-token penalties kept), then G = return-to-go and A = masked_whiten(G) over the batch; returns = G.

    The baseline is the group mean of the raw rewards ``scores`` (before KL-in-reward penalties, as in the
    REINFORCE++ paper and OpenRLHF); the penalties stay in the token rewards. Without ``scores`` the baseline
    is taken from the token rewards' sums.
    """
    raw = scores.float() if scores is not None else sequence_scores(token_rewards, mask)
    mean, _, _ = group_stats(raw, group_index)
    last = last_index(mask)
    rows = (last >= 0).nonzero().squeeze(-1)
    shifted = token_rewards.float() * mask.float()
    baseline = torch.zeros_like(shifted)
    baseline[rows, last[rows]] = mean[rows]
    returns = return_to_go(shifted - baseline, mask, params.gamma)
    return masked_whiten(returns, mask) * mask.float(), returns
