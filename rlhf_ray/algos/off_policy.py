"""Off-policy corrections: importance weights between the learner's pi_old and the distribution that sampled.

The rollout engine (vLLM) samples from mu: its own numerics, and in asynchronous runs an older policy. The PPO
ratio is taken against pi_old, the learner's numbers. Each correction turns the ratio rho = pi_old / mu into a
detached weight per token that multiplies the per-token policy loss (``algo.off_policy_correction``):

    fn(old_logp (B, T), rollout_logp (B, T), mask (B, T), params) -> ImportanceWeights

    name        level     rho                                       weight
    none        token     rho_t = exp(old_t - rollout_t)            1 (rho reported only)
    token_tis   token     rho_t                                     min(rho_t, cap)                  (TIS)
    seq_tis     sequence  rho_b = exp(sum_t mask (old - rollout))   min(rho_b, cap) on b's tokens
    seq_mask    sequence  rho_b                                     rho_b if low <= rho_b <= high, else 0
    icepop      token     rho_t                                     rho_t if low <= rho_t <= high, else 0

TIS: Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL training". Masked IS at
the sequence level: Liu, Li et al. 2025, "When speed kills stability". IcePop: Ling Team 2025 (Ring-1T),
M(k) = k inside [alpha, beta], 0 outside. The masking variants keep the importance weight inside the band
(masked importance sampling), so the four non-trivial ones form a grid: truncate or mask x token or sequence.
A masked token (or sequence) still counts in the loss's denominator (``algo.loss_agg``), as in IcePop's
objective: masking shrinks the step in proportion to what it drops. Log-ratios (a token's, or a sequence's sum)
are clamped to [-20, 20] before exp.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from rlhf_ray.algos.names import OFF_POLICY_CORRECTIONS
from rlhf_ray.algos.policy_loss import LOG_RATIO_CLAMP

__all__ = ["OFF_POLICY_CORRECTIONS", "CORRECTIONS", "ImportanceWeights", "OffPolicyParams", "get_off_policy_correction",
           "importance_ratio"]


@dataclass(frozen=True)
class OffPolicyParams:
    """The thresholds of the corrections (each uses the ones it needs)."""

    cap: float = 2.0
    """token_tis, seq_tis: the weight is min(rho, cap) (``algo.importance_cap``)."""
    low: float = 0.5
    """seq_mask, icepop: rho below this is masked (``algo.importance_mask_low``)."""
    high: float = 2.0
    """seq_mask, icepop: rho above this is masked (``algo.importance_mask_high``)."""


@dataclass(frozen=True)
class ImportanceWeights:
    """What a correction applies and what it saw, all detached.

    ``weights`` (B, T) multiplies the per-token policy loss. ``ratio``, ``capped``, ``masked`` and ``units`` are
    per unit of the correction's level: (B, T) per token, or (B,) per sequence. ``units`` is 1 where a unit
    counts (an action token; a sequence with at least one action token); ``capped`` / ``masked`` are 0/1.
    """

    weights: Tensor
    ratio: Tensor
    capped: Tensor
    masked: Tensor
    units: Tensor

    @property
    def level(self) -> str:
        """``token`` or ``sequence``."""
        return "token" if self.ratio.dim() == 2 else "sequence"


CorrectionFn = Callable[[Tensor, Tensor, Tensor, OffPolicyParams], ImportanceWeights]
CORRECTIONS: dict[str, CorrectionFn] = {}
"""Corrections by ``algo.off_policy_correction`` name (``rlhf_ray.algos.names.OFF_POLICY_CORRECTIONS``)."""


def register(name: str) -> Callable[[CorrectionFn], CorrectionFn]:
    def wrap(fn: CorrectionFn) -> CorrectionFn:
        CORRECTIONS[name] = fn
        return fn
    return wrap


def get_off_policy_correction(name: str) -> CorrectionFn:
    """``CORRECTIONS[name]``, or a ValueError listing the known names."""
    if name not in CORRECTIONS:
        raise ValueError(f"unknown off-policy correction {name!r}; known: {', '.join(CORRECTIONS)}")
    return CORRECTIONS[name]


def importance_ratio(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, level: str) -> tuple[Tensor, Tensor]:
    """(rho, units), detached. old_logp, rollout_logp, mask: (B, T).

        token:     rho_t = exp(clamp(old_t - rollout_t, -20, 20)), units = mask                  (B, T)
        sequence:  rho_b = exp(clamp(sum_t mask_t (old_t - rollout_t), -20, 20)),
                   units = [sum_t mask_t > 0]                                                     (B,)
    rho_b is the product of the sequence's token ratios: the likelihood ratio of the whole response.
    """
    mask = mask.float()
    log_ratio = (old_logp.detach().float() - rollout_logp.detach().float()) * mask
    if level == "token":
        return torch.exp(log_ratio.clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)), mask
    if level == "sequence":
        return (torch.exp(log_ratio.sum(dim=-1).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)),
                (mask.sum(dim=-1) > 0).float())
    raise ValueError(f"unknown importance-ratio level {level!r}; known: token, sequence")


def _per_token(per_unit: Tensor, like: Tensor) -> Tensor:
    """A (B,) per-sequence value on every position of its row, (B, T); a (B, T) value as it is."""
    return per_unit[:, None].expand_as(like) if per_unit.dim() == 1 else per_unit


def _truncated(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, cap: float, level: str) -> ImportanceWeights:
    """w = min(rho, cap); capped = [rho > cap]."""
    ratio, units = importance_ratio(old_logp, rollout_logp, mask, level)
    capped = (ratio > cap).float() * units
    return ImportanceWeights(_per_token(ratio.clamp(max=cap), old_logp), ratio, capped, torch.zeros_like(ratio), units)


def _masked(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, low: float, high: float,
            level: str) -> ImportanceWeights:
    """w = rho inside [low, high], 0 outside; masked = [rho outside [low, high]]."""
    ratio, units = importance_ratio(old_logp, rollout_logp, mask, level)
    outside = (ratio < low) | (ratio > high)
    weights = torch.where(outside, torch.zeros_like(ratio), ratio)
    return ImportanceWeights(_per_token(weights, old_logp), ratio, torch.zeros_like(ratio), outside.float() * units,
                             units)


@register("none")
def no_correction(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: OffPolicyParams) -> ImportanceWeights:
    """w_t = 1. The token ratio rho_t is still returned, for the metrics. (B, T) -> (B, T)."""
    ratio, units = importance_ratio(old_logp, rollout_logp, mask, "token")
    zeros = torch.zeros_like(ratio)
    return ImportanceWeights(torch.ones_like(ratio), ratio, zeros, zeros, units)


@register("token_tis")
def token_tis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: OffPolicyParams) -> ImportanceWeights:
    """Truncated importance sampling per token: w_t = min(rho_t, cap), rho_t = exp(old_t - rollout_t). (B, T)."""
    return _truncated(old_logp, rollout_logp, mask, params.cap, "token")


@register("seq_tis")
def seq_tis(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: OffPolicyParams) -> ImportanceWeights:
    """Truncated importance sampling per sequence: w_{b,t} = min(rho_b, cap) on every token of row b,
    rho_b = exp(sum_t mask (old - rollout)). Unbiased up to the cap for a sequence-level reward, but rho_b
    grows with the length of the response, so more sequences meet the cap than tokens do under token_tis."""
    return _truncated(old_logp, rollout_logp, mask, params.cap, "sequence")


@register("seq_mask")
def seq_mask(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: OffPolicyParams) -> ImportanceWeights:
    """Masked importance sampling per sequence: w_{b,t} = rho_b if low <= rho_b <= high, else 0 (the whole
    response dropped), rho_b = exp(sum_t mask (old - rollout))."""
    return _masked(old_logp, rollout_logp, mask, params.low, params.high, "sequence")


@register("icepop")
def icepop(old_logp: Tensor, rollout_logp: Tensor, mask: Tensor, params: OffPolicyParams) -> ImportanceWeights:
    """IcePop: w_t = rho_t if low <= rho_t <= high, else 0 (the token dropped), rho_t = exp(old_t - rollout_t)."""
    return _masked(old_logp, rollout_logp, mask, params.low, params.high, "token")
