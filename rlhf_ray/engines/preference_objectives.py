"""Learner-side objectives and forwards of the preference jobs (reward model, DPO family, KTO).

Micro-batch layout ("two halves"): ``input_ids``, ``labels``, ``attention_mask``, ``position_ids`` of
2B right-padded rows, where row i and row B + i belong to example i:

- pairs (RM, DPO): rows [0, B) the chosen sequences, rows [B, 2B) the rejected ones, run as one
  concatenated forward;
- KTO: rows [0, B) the labelled completions, rows [B, 2B) the mismatched ones (example i's prompt with
  another example's completion) that estimate the KL reference point.

Labels are -100 on prompt tokens, so log-probs are sums over completion tokens. Extra keys: RM
``margin`` (B,); KTO ``desirable`` (B,) bool; ``ref_logps`` (B, 2): the reference model's summed
log-probs of both halves (from the ``pair_logprobs`` forward). Every loss comes from
``rlhf_ray.algos.preference``; objectives return ``(loss * loss_scale, metric sums)`` as in
``rlhf_ray.engines.objectives``, with ``loss_scale = accumulation x world / examples in the global batch``.
"""

from __future__ import annotations

import torch

from rlhf_ray.algos.preference import (PREFERENCE_LOSSES, bradley_terry_loss, chosen_nll, implicit_rewards,
                                       kto_loss, preference_accuracy)
from rlhf_ray.engines.objectives import register, register_forward, sequence_scores, shifted_token_logprobs

ROW_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")


def half(mb: dict[str, torch.Tensor], which: int) -> dict[str, torch.Tensor]:
    """Rows [0, B) (``which=0``) or [B, 2B) (``which=1``) of a two-halves micro-batch, trimmed of shared padding."""
    B = mb["input_ids"].shape[0] // 2
    rows = slice(which * B, (which + 1) * B)
    out = {k: mb[k][rows] for k in ROW_KEYS if k in mb}
    T = int(out["attention_mask"].sum(dim=-1).max())
    return {k: v[:, :T] for k, v in out.items()}


def completion_logps(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed completion log-probs (N,) and completion token counts (N,) of every row of ``mb``."""
    logps, mask = shifted_token_logprobs(model, mb)
    return (logps * mask).sum(dim=-1), mask.sum(dim=-1)


# ---- forwards (no grad) --------------------------------------------------------------------------

@register_forward("pair_logprobs")
def pair_logprobs_forward(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed completion log-probs of both halves, (B, 2): [:, 0] rows [0, B), [:, 1] rows [B, 2B)."""
    logps, _ = completion_logps(model, mb)
    return logps.view(2, -1).T


@register_forward("kto_kl_logratios")
def kto_kl_logratios_forward(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """log pi(y'|x) - log pi_ref(y'|x), (B,), on the mismatched half (the input of ``kto_reference_point``)."""
    logps, _ = completion_logps(model, half(mb, 1))
    return logps - mb["ref_logps"][:, 1].to(logps)


# ---- objectives ----------------------------------------------------------------------------------

@register("rm")
def reward_model_objective(model: torch.nn.Module, mb: dict[str, torch.Tensor], loss_scale: float):
    """Bradley-Terry loss on the score of chosen vs rejected (one forward over both halves), a mean over pairs."""
    scores = sequence_scores(model, mb)
    chosen, rejected = scores.view(2, -1)
    losses = bradley_terry_loss(chosen, rejected, mb["margin"].to(scores))
    d = lambda t: t.detach().sum().item()  # noqa: E731
    return losses.sum() * loss_scale, {
        "loss_sum": d(losses), "pairs": float(chosen.numel()), "correct": d(preference_accuracy(chosen, rejected)),
        "margin_sum": d(chosen - rejected), "chosen_sum": d(chosen), "rejected_sum": d(rejected)}


@register("dpo")
def dpo_objective(model: torch.nn.Module, mb: dict[str, torch.Tensor], loss: str, beta: float,
                  label_smoothing: float, gamma: float, nll_coef: float, loss_scale: float):
    """A ``PREFERENCE_LOSSES`` loss (+ ``nll_coef`` x chosen NLL), a mean over the pairs of the global batch.

    Implicit rewards (the metrics) are beta x the loss's chosen / rejected inputs: beta x (policy -
    reference) summed log-probs for DPO / IPO, beta x the average log-prob for SimPO.
    """
    spec = PREFERENCE_LOSSES[loss]
    logps, lengths = completion_logps(model, mb)
    pc, pr = logps.view(2, -1)
    values = logps / lengths.clamp(min=1) if spec.length_normalized else logps
    if spec.uses_reference:
        ref = mb["ref_logps"].to(logps).T.reshape(-1)  # (2B,) chosen then rejected, like the rows
        values = values - (ref / lengths.clamp(min=1) if spec.length_normalized else ref)
    c, r = values.view(2, -1)
    losses = spec.fn(c, r, beta, label_smoothing, gamma)
    metrics = {}
    if nll_coef > 0:
        nll = chosen_nll(pc, lengths.view(2, -1)[0])
        losses = losses + nll_coef * nll
        metrics["nll_sum"] = nll.detach().sum().item()
    rc, rr = (beta * c).detach(), (beta * r).detach()
    metrics.update({"loss_sum": losses.detach().sum().item(), "pairs": float(pc.numel()),
                    "correct": preference_accuracy(rc, rr).sum().item(), "chosen_sum": rc.sum().item(),
                    "rejected_sum": rr.sum().item(), "logps_chosen_sum": pc.detach().sum().item(),
                    "logps_rejected_sum": pr.detach().sum().item()})
    return losses.sum() * loss_scale, metrics


@register("kto")
def kto_objective(model: torch.nn.Module, mb: dict[str, torch.Tensor], beta: float, desirable_weight: float,
                  undesirable_weight: float, z0: float, loss_scale: float):
    """KTO loss on the labelled half with the global batch's reference point ``z0``, a mean over examples."""
    logps, _ = completion_logps(model, half(mb, 0))
    ref = mb["ref_logps"][:, 0].to(logps)
    good = mb["desirable"].to(torch.bool)
    losses = kto_loss(logps, ref, good, z0, beta, desirable_weight, undesirable_weight)
    rewards = implicit_rewards(logps, ref, beta).detach()
    n = float(good.numel())
    return losses.sum() * loss_scale, {
        "loss_sum": losses.detach().sum().item(), "examples": n, "desirable": good.sum().item(),
        "rewards_desirable_sum": rewards[good].sum().item(), "rewards_undesirable_sum": rewards[~good].sum().item(),
        "logps_desirable_sum": logps.detach()[good].sum().item(),
        "logps_undesirable_sum": logps.detach()[~good].sum().item(), "kl_sum": z0 * n}
