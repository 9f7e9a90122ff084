"""KL estimators against the reference policy, KL-in-reward shaping, and the KL coefficient controllers.

log_ratio = logp - ref_logp per action token, with tokens sampled from the current policy, so
E[k1] = KL(pi || ref). See Schulman, "Approximating KL Divergence" (2020).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from rlhf_ray.algos.aggregation import last_index

LOG_RATIO_CLAMP = 20.0
K3_CLAMP = 10.0
"""Cap of the k3 estimate per token (verl's and OpenRLHF's low-variance KL clamp)."""


def kl_k1(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k1 = log_ratio (unbiased, can be negative). logp, ref_logp: (B, T) -> (B, T)."""
    return logp.float() - ref_logp.float()


def kl_k2(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k2 = 0.5 * log_ratio**2 (biased, low variance, >= 0). logp, ref_logp: (B, T) -> (B, T)."""
    return 0.5 * (logp.float() - ref_logp.float()) ** 2


def kl_k3(logp: Tensor, ref_logp: Tensor) -> Tensor:
    """k3 = min(exp(-log_ratio) - 1 + log_ratio, 10) (unbiased below the cap, always >= 0). (B, T) -> (B, T).

    log_ratio is clamped to [-20, 20] first so exp cannot overflow, and the estimate is capped at
    ``K3_CLAMP`` = 10 as verl and OpenRLHF do: one token far from the reference (k3 grows like exp(|log_ratio|))
    would otherwise dominate the loss and its gradient. No gradient flows beyond either clamp.
    """
    log_ratio = (logp.float() - ref_logp.float()).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return (torch.exp(-log_ratio) - 1.0 + log_ratio).clamp(-K3_CLAMP, K3_CLAMP)


KL_ESTIMATORS: dict[str, Callable[[Tensor, Tensor], Tensor]] = {"k1": kl_k1, "k2": kl_k2, "k3": kl_k3}


def kl_penalty(logp: Tensor, ref_logp: Tensor, estimator: str) -> Tensor:
    """Per-token KL estimate ``KL_ESTIMATORS[estimator](logp, ref_logp)``: (B, T) -> (B, T)."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"unknown kl estimator {estimator!r}; known: {', '.join(KL_ESTIMATORS)}")
    return KL_ESTIMATORS[estimator](logp, ref_logp)


def kl_in_reward(seq_rewards: Tensor, kl: Tensor, mask: Tensor, coef: float) -> Tensor:
    """Token rewards with the KL penalty folded in (Ziegler et al. 2019; PPO-RLHF).

    seq_rewards: (B,); kl, mask: (B, T). Returns token_rewards (B, T) float32:
        token_rewards[b, t] = -coef * kl[b, t] * mask[b, t]  +  seq_rewards[b] * [t == last action token of b]
    Rows with no action token are all zeros.
    """
    mask = mask.float()
    token_rewards = -coef * kl.float() * mask
    last = last_index(mask)
    rows = (last >= 0).nonzero().squeeze(-1)
    at_last = torch.zeros_like(token_rewards)
    at_last[rows, last[rows]] = seq_rewards.float()[rows]
    return token_rewards + at_last


class FixedKLController:
    """A constant KL coefficient; ``update`` does nothing."""

    def __init__(self, coef: float) -> None:
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        """No-op (kept so both controllers share one interface)."""

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController:
    """Adaptive KL coefficient (Ziegler et al. 2019) that steers the measured KL toward ``target``.

    update:  err = clip(current_kl / target - 1, -0.2, 0.2);   value *= 1 + err * n_steps / horizon
    """

    def __init__(self, init_coef: float, target: float, horizon: int) -> None:
        if target <= 0 or horizon <= 0:
            raise ValueError(f"AdaptiveKLController needs target > 0 and horizon > 0, got {target}, {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
