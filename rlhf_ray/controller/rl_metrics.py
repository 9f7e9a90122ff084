"""Step metrics of the rollout loops: per-step reductions of rollout statistics and the learners' metric sums."""

from __future__ import annotations

from typing import Any, Optional

import numpy as np
import torch

from rlhf_ray.algos.aggregation import masked_mean


def rollout_metrics(batch: Any, gens: Any, sync: dict[str, float]) -> dict[str, float]:
    """Rollout statistics and the weight sync of one step (every rollout loop)."""
    lengths, rewards = batch.response_lengths, batch.rewards
    episodes = gens.trajectories.metrics() if gens.trajectories is not None else {}  # multi-turn: env/ metrics
    return {**episodes,
        "rollout/reward_mean": float(rewards.mean()), "rollout/reward_std": float(rewards.std(unbiased=False)),
        "rollout/reward_max": float(rewards.max()), "rollout/reward_min": float(rewards.min()),
        "rollout/response_length_mean": float(lengths.mean()), "rollout/response_length_max": float(lengths.max()),
        "rollout/truncated_fraction": sum(r == "length" for r in batch.finish_reasons) / batch.size,
        "rollout/sequences": float(batch.size), "rollout/generated_tokens": float(gens.num_tokens),
        "weight_sync/seconds": sync["seconds"], "weight_sync/bytes": sync["bytes"],
        "weight_sync/gb_per_s": sync["bytes"] / 1e9 / max(sync["seconds"], 1e-9),
    }


def policy_metrics(batch: Any, kl: Optional[torch.Tensor], actor_steps: list[dict], old_from_update: bool
                   ) -> dict[str, float]:
    """Advantages, the learner-vs-vLLM log-prob gap, the reference KL and the policy loss terms per action token."""
    mask = batch.action_mask
    tokens = sum(s["action_tokens"] for s in actor_steps)
    if old_from_update:  # one optimizer step: every micro-batch saw the pre-update policy
        gap = sum(s["old_rollout_absdiff_sum"] for s in actor_steps) / tokens
    else:
        gap = float(masked_mean((batch.old_logprobs - batch.rollout_logprobs).abs(), mask))
    m = {"rollout/advantage_mean": float(masked_mean(batch.advantages, mask)),
         "rollout/logprob_diff_learner_vllm": gap}
    if kl is not None:
        m["kl/policy_reference"] = float(masked_mean(kl, mask))
    per_token = lambda key: sum(s[key] for s in actor_steps) / tokens  # noqa: E731
    m.update({"actor/pg_loss": per_token("pg_loss_sum"), "actor/clip_fraction": per_token("clipped_sum"),
              "actor/entropy": per_token("entropy_sum"), "actor/approx_kl": per_token("approx_kl_sum"),
              "actor/grad_norm": float(np.mean([s["grad_norm"] for s in actor_steps])),
              "actor/lr": actor_steps[-1]["lr"],
              "actor/skipped_updates": sum(s["skipped_updates"] for s in actor_steps)})
    if any("kl_sum" in s for s in actor_steps):
        m["actor/kl_loss"] = sum(s.get("kl_sum", 0.0) for s in actor_steps) / tokens
    m.update(importance_metrics(batch, actor_steps))
    return m


def importance_metrics(batch: Any, actor_steps: list[dict]) -> dict[str, float]:
    """The off-policy correction's ratio rho = pi_old / mu and what it did, per unit of its level (action tokens
    or sequences, as the learners' ``importance_tokens`` / ``importance_sequences`` counts say); {} where the
    loss applies none (pi_old is the engine's own).

    ``actor/importance_ratio_mean`` and the fractions of units capped / masked come from the learners' sums.
    ``actor/importance_ratio_max`` is the largest ratio the learners saw (their ``_max`` key, folded by max over
    micro-batches and ranks), which also covers ``old_logprobs: update``, where pi_old exists only inside the
    update."""
    level = next((lv for lv in ("token", "sequence") if any(f"importance_{lv}s" in s for s in actor_steps)), None)
    if level is None:
        return {}
    units = sum(s[f"importance_{level}s"] for s in actor_steps)
    per_unit = lambda key: sum(s[key] for s in actor_steps) / max(units, 1.0)  # noqa: E731
    m = {"actor/importance_ratio_mean": per_unit("importance_ratio_sum"),
         "actor/importance_capped_fraction": per_unit("importance_capped_sum"),
         "actor/importance_masked_fraction": per_unit("importance_masked_sum")}
    if units > 0:
        m["actor/importance_ratio_max"] = max(s["importance_ratio_max"] for s in actor_steps)
    return m


def critic_metrics(critic_steps: list[dict]) -> dict[str, float]:
    """The value loss terms per action token ({} without a critic)."""
    if not critic_steps:
        return {}
    tokens = sum(s["action_tokens"] for s in critic_steps)
    return {"critic/value_loss": sum(s["value_loss_sum"] for s in critic_steps) / tokens,
            "critic/clip_fraction": sum(s["value_clipped_sum"] for s in critic_steps) / tokens,
            "critic/values_mean": sum(s["values_sum"] for s in critic_steps) / tokens,
            "critic/grad_norm": float(np.mean([s["grad_norm"] for s in critic_steps])),
            "critic/lr": critic_steps[-1]["lr"],
            "critic/skipped_updates": sum(s["skipped_updates"] for s in critic_steps)}
