"""Per-token policy and value losses, and the level at which the policy ratio is taken.

Each loss returns an unreduced (B, T) loss plus a (B, T) float 0/1 "clipped" indicator; reduce with
``aggregation.agg_loss`` under the action mask. Inputs: logp, old_logp, advantages (B, T). The ratio level
(``RATIO_LEVELS``: PPO's per token, GSPO's per sequence) rewrites logp before the loss sees it. The importance
weights against the rollout engine's log-probs are ``rlhf_ray.algos.off_policy``'s.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

LOG_RATIO_CLAMP = 20.0

PolicyLossFn = Callable[[Tensor, Tensor, Tensor, float, float, Optional[float]], tuple[Tensor, Tensor]]
RatioLevelFn = Callable[[Tensor, Tensor, Tensor], Tensor]
"""``(logp, old_logp, mask) -> logp'``, all (B, T): the log-probs whose per-token ratio exp(logp' - old_logp) to
pi_old is the level's ratio, with the gradient the level's objective gives."""


def _ratio(logp: Tensor, old_logp: Tensor) -> Tensor:
    """exp(logp - old_logp), the log-ratio clamped to [-20, 20] so exp cannot overflow."""
    return torch.exp((logp.float() - old_logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))


def ppo_clip(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
             dual_clip: Optional[float]) -> tuple[Tensor, Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017), with optional dual clip (Ye et al. 2020).

        ratio = exp(logp - old_logp)
        l1 = -A * ratio;   l2 = -A * clamp(ratio, 1 - clip_low, 1 + clip_high)
        loss = max(l1, l2);   clipped = [l2 > l1]
        dual clip c > 1, where A < 0:  loss = min(loss, -A * c), clipped also where that cap binds
    All (B, T). Where clipped, d loss / d logp = 0; elsewhere it is -A * ratio.
    """
    adv = advantages.float()
    ratio = _ratio(logp, old_logp)
    l1 = -adv * ratio
    l2 = -adv * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    clipped = l2 > l1
    loss = torch.where(clipped, l2, l1)
    if dual_clip is not None:
        cap = -adv * dual_clip
        capped = (adv < 0) & (loss > cap)
        loss = torch.where(capped, cap, loss)
        clipped = clipped | capped
    return loss, clipped.float()


def vanilla_pg(logp: Tensor, old_logp: Tensor, advantages: Tensor, clip_low: float, clip_high: float,
               dual_clip: Optional[float]) -> tuple[Tensor, Tensor]:
    """Unclipped importance-weighted policy gradient: loss = -A * exp(logp - old_logp); clipped = 0.

    With old_logp = logp.detach() the ratio is 1 with gradient d ratio / d logp = 1, so the gradient
    is plain REINFORCE's -A * grad logp. The clip arguments are ignored. All (B, T).
    """
    loss = -advantages.float() * _ratio(logp, old_logp)
    return loss, torch.zeros_like(loss)


POLICY_LOSSES: dict[str, PolicyLossFn] = {"ppo_clip": ppo_clip, "vanilla_pg": vanilla_pg}


def get_policy_loss(name: str) -> PolicyLossFn:
    """``POLICY_LOSSES[name]``, or a ValueError listing the known names."""
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; known: {', '.join(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]


def token_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """PPO's ratio, one per token: logp' = logp, so ratio_t = exp(logp_t - old_t). (B, T) -> (B, T)."""
    return logp


def sequence_ratio(logp: Tensor, old_logp: Tensor, mask: Tensor) -> Tensor:
    """GSPO's ratio, one per sequence (Zheng et al. 2025), in the paper's token form (GSPO-token):

        log s_b = sum_t mask_t (logp_t - old_t) / max(1, sum_t mask_t)           (B,)   geometric mean ratio
        logp'_{b,t} = old_{b,t} + sg[log s_b] + logp_{b,t} - sg[logp_{b,t}]       (B, T)

    so that exp(logp' - old) = s_b at every token of row b (clipped as a whole: every token of a sequence is
    clipped or none is), and d exp(logp'_{b,t} - old_{b,t}) / d logp_{b,t} = s_b. With the advantage equal on
    every token of a row (the critic-free estimators) and ``loss_agg: seq_mean_token_mean``, the loss is GSPO's
    -1/G sum_b min(s_b A_b, clip(s_b) A_b) and its gradient s_b A_b / |y_b| sum_t grad log pi(y_{b,t}) for each
    unclipped b. mask, logp, old_logp: (B, T); sg = stop-gradient.
    """
    mask = mask.float()
    n = mask.sum(dim=-1).clamp_min(1.0)
    log_s = (((logp.detach().float() - old_logp.float()) * mask).sum(dim=-1) / n)[:, None]
    return old_logp.float() + log_s + logp.float() - logp.detach().float()


RATIO_LEVELS: dict[str, RatioLevelFn] = {"token": token_ratio, "sequence": sequence_ratio}


def get_ratio_level(name: str) -> RatioLevelFn:
    """``RATIO_LEVELS[name]``, or a ValueError listing the known names."""
    if name not in RATIO_LEVELS:
        raise ValueError(f"unknown ratio level {name!r}; known: {', '.join(RATIO_LEVELS)}")
    return RATIO_LEVELS[name]


def value_loss(values: Tensor, old_values: Tensor, returns: Tensor,
               clip: Optional[float]) -> tuple[Tensor, Tensor]:
    """Clipped value loss (PPO): values, old_values, returns (B, T) -> (loss, clipped), (B, T).

        v_clip = old + clamp(V - old, -clip, clip)
        loss = 0.5 * max((V - R)^2, (v_clip - R)^2);   clipped = [(v_clip - R)^2 > (V - R)^2]
    ``clip=None``: loss = 0.5 * (V - R)^2, clipped = 0.
    """
    values, returns = values.float(), returns.float()
    unclipped = (values - returns) ** 2
    if clip is None:
        return 0.5 * unclipped, torch.zeros_like(unclipped)
    old_values = old_values.float()
    v_clip = old_values + (values - old_values).clamp(-clip, clip)
    clipped_sq = (v_clip - returns) ** 2
    clipped = clipped_sq > unclipped
    return 0.5 * torch.where(clipped, clipped_sq, unclipped), clipped.float()

