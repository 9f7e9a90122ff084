"""Learner-side objectives of the RL jobs: the policy loss (PPO / REINFORCE family) and the critic's value loss.

Glue only: forward pass -> per-token quantities -> the pure functions of ``rlhf_ray.algos`` -> one
scaled scalar. Micro-batches are ``RolloutBatch.tensors(...)`` slices: ``input_ids`` / ``attention_mask``
(B, T) and per-token fields (B, T-1) aligned with ``input_ids[:, 1:]``.

Scaling: ``agg_loss`` returns this micro-batch's additive share of the mini-batch's aggregate (its
denominators are the whole mini-batch's token / sequence counts); ``grad_scale`` = accumulation
steps x data-parallel ranks undoes DeepSpeed's averaging, so the update is the gradient of the
mini-batch aggregate however it is split. Metrics are sums over action tokens.
"""

from __future__ import annotations

import torch

from rlhf_ray.algos.aggregation import agg_loss
from rlhf_ray.algos.kl import kl_penalty
from rlhf_ray.algos.logprobs import entropy_from_logits, gather_token_logprobs
from rlhf_ray.algos.policy_loss import get_policy_loss, truncated_importance_weights, value_loss
from rlhf_ray.engines.objectives import causal_lm_logits, register, register_forward


@register("policy")
def policy_objective(model: torch.nn.Module, mb: dict[str, torch.Tensor], *, policy_loss: str, clip_low: float,
                     clip_high: float, dual_clip: float | None, loss_agg: str, num_tokens: int, num_seqs: int,
                     horizon: int, grad_scale: float, temperature: float, entropy_coef: float, kl_coef: float,
                     kl_estimator: str, importance_cap: float | None, old_from_update: bool = False):
    """Policy-gradient loss of one micro-batch.

    per-token loss = w_t * L_pg(logp_t, old_t, A_t) + kl_coef * KL_est(logp_t, ref_t) - entropy_coef * H_t
    where w_t = min(exp(old_t - rollout_t), importance_cap) corrects for the rollout engine's sampling
    distribution differing from the learner's (None: w = 1), and the KL term is present only when the
    KL penalty is applied in the loss (kl_coef > 0 here).

    ``old_from_update`` (``algo.old_logprobs: update``): old_t = logp_t detached, this forward pass being the
    first of the step's only optimizer step (ratio 1, gradient A_t * grad logp_t); the micro-batch then
    carries no ``old_logprobs``, and ``old_rollout_absdiff_sum`` = sum |old_t - rollout_t| reports the
    learner-vs-vLLM gap that a separate pi_old pass would have.
    """
    logits = causal_lm_logits(model, mb)[:, :-1].float()
    if temperature != 1.0:
        logits = logits / temperature
    logp = gather_token_logprobs(logits, mb["input_ids"][:, 1:])
    mask = mb["action_mask"].float()
    old = logp.detach() if old_from_update else mb["old_logprobs"]
    pg_mat, clipped = get_policy_loss(policy_loss)(logp, old, mb["advantages"], clip_low, clip_high, dual_clip)
    if importance_cap is not None:
        pg_mat = pg_mat * truncated_importance_weights(old, mb["rollout_logprobs"], importance_cap)
    total = pg_mat
    metrics: dict[str, float] = {}
    if old_from_update:
        metrics["old_rollout_absdiff_sum"] = float(((old - mb["rollout_logprobs"]).abs() * mask).sum())
    if kl_coef > 0:
        kl = kl_penalty(logp, mb["ref_logprobs"], kl_estimator)
        total = total + kl_coef * kl
        metrics["kl_sum"] = float((kl.detach() * mask).sum())
    if entropy_coef > 0:
        entropy = entropy_from_logits(logits)
        total = total - entropy_coef * entropy
    else:
        with torch.no_grad():
            entropy = entropy_from_logits(logits.detach())
    loss = agg_loss(total, mask, loss_agg, num_tokens, num_seqs, horizon) * grad_scale
    with torch.no_grad():
        log_ratio = logp.detach() - old
        metrics.update({
            "pg_loss_sum": float((pg_mat.detach() * mask).sum()),
            "clipped_sum": float((clipped * mask).sum()),
            "entropy_sum": float((entropy.detach() * mask).sum()),
            # 0.5 * E[(log pi - log pi_old)^2]: how far this epoch's updates moved the policy.
            "approx_kl_sum": float((0.5 * log_ratio ** 2 * mask).sum()),
            "action_tokens": float(mask.sum()),
        })
    return loss, metrics


def token_values(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values (B, T-1): V at position t scores the state before token t+1 is generated.

    The critic is a ``*ForTokenClassification`` model with one label: logits (B, T, 1).
    """
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
    return out.logits[..., 0][:, :-1].float()


@register_forward("token_values")
def token_values_forward(model: torch.nn.Module, mb: dict[str, torch.Tensor]):
    """Critic values (B, T-1) for the advantage estimate."""
    return token_values(model, mb)


@register("value")
def value_objective(model: torch.nn.Module, mb: dict[str, torch.Tensor], *, value_clip: float | None, loss_agg: str,
                    num_tokens: int, num_seqs: int, horizon: int, grad_scale: float):
    """Clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), aggregated like the policy."""
    values = token_values(model, mb)
    mask = mb["action_mask"].float()
    loss_mat, clipped = value_loss(values, mb["values"], mb["returns"], value_clip)
    loss = agg_loss(loss_mat, mask, loss_agg, num_tokens, num_seqs, horizon) * grad_scale
    with torch.no_grad():
        metrics = {"value_loss_sum": float((loss_mat.detach() * mask).sum()),
                   "value_clipped_sum": float((clipped * mask).sum()),
                   "values_sum": float((values.detach() * mask).sum()),
                   "action_tokens": float(mask.sum())}
    return loss, metrics
