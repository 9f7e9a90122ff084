"""The preference jobs' learner specs: reward model (Bradley-Terry), the DPO family, KTO, and their forwards.

Micro-batch layout ("two halves"): ``input_ids``, ``labels``, ``attention_mask``, ``position_ids`` of 2B
right-padded rows, where row i and row B + i belong to example i:

- pairs (RM, DPO): rows [0, B) the chosen sequences, rows [B, 2B) the rejected ones, one concatenated forward;
- KTO: rows [0, B) the labelled completions, rows [B, 2B) the mismatched ones (example i's prompt with
  another example's completion) that estimate the KL reference point.

Labels are ``IGNORE_INDEX`` on prompt tokens, so log-probs are sums over completion tokens. Extra keys: RM
``margin`` (B,); KTO ``desirable`` (B,) bool; ``ref_logps`` (B, 2): the reference model's summed log-probs
of both halves (from ``PairLogprobs``). Every loss comes from ``rlhf_ray.algos.preference``; each is a mean
over the global batch's pairs / examples (``BatchTotals.sequences``), scaled as ``objectives.common`` says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rlhf_ray.algos.preference import (PREFERENCE_LOSSES, bradley_terry_loss, chosen_nll, implicit_rewards,
                                       kto_loss, preference_accuracy)
from rlhf_ray.objectives.common import BatchTotals, sequence_scores, shifted_token_logprobs

if TYPE_CHECKING:
    from rlhf_ray.config.schema import Config

ROW_KEYS = ("input_ids", "labels", "attention_mask", "position_ids")
REF_KEY = "ref_logps"
"""Micro-batch key of the reference values, (B, 2) float32."""


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

@dataclass(frozen=True)
class PairLogprobs:
    """Summed completion log-probs of both halves, (B, 2): [:, 0] rows [0, B), [:, 1] rows [B, 2B)."""

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, _ = completion_logps(model, mb)
        return logps.view(2, -1).T


@dataclass(frozen=True)
class KTOKLLogratios:
    """log pi(y'|x) - log pi_ref(y'|x), (B,), on the mismatched half (the input of ``kto_reference_point``)."""

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        logps, _ = completion_logps(model, half(mb, 1))
        return logps - mb[REF_KEY][:, 1].to(logps)


# ---- losses --------------------------------------------------------------------------------------

def _sum(t: torch.Tensor) -> float:
    return t.detach().sum().item()


@dataclass(frozen=True)
class RMLoss:
    """Bradley-Terry loss on the score of chosen vs rejected (one forward over both halves), a mean over pairs."""

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor], totals: BatchTotals):
        scores = sequence_scores(model, mb)
        chosen, rejected = scores.view(2, -1)
        losses = bradley_terry_loss(chosen, rejected, mb["margin"].to(scores))
        return losses.sum() * totals.scale(totals.sequences), {
            "loss_sum": _sum(losses), "pairs": float(chosen.numel()),
            "correct": _sum(preference_accuracy(chosen, rejected)), "margin_sum": _sum(chosen - rejected),
            "chosen_sum": _sum(chosen), "rejected_sum": _sum(rejected)}


@dataclass(frozen=True)
class DPOLoss:
    """A ``PREFERENCE_LOSSES`` loss (+ ``nll_coef`` x chosen NLL), a mean over the pairs of the global batch.

    Implicit rewards (the metrics) are beta x the loss's chosen / rejected inputs: beta x (policy -
    reference) summed log-probs for DPO / IPO (per-token means with ``length_normalized``), beta x the average
    log-prob for SimPO. ``logps_chosen_sum`` / ``logps_rejected_sum`` are the policy's summed completion
    log-probs before the update and ``tokens_sum`` the completion tokens they count (labels not IGNORE_INDEX),
    both halves together: what online DPO checks against the engines' own counts and log-probs.
    """

    loss: str
    beta: float
    label_smoothing: float
    gamma: float
    nll_coef: float
    length_normalized: bool = False
    """Per-token mean log-probs instead of sums (``dpo.length_normalized``, default: the loss's own form)."""

    @classmethod
    def from_config(cls, cfg: "Config") -> "DPOLoss":
        d = cfg.dpo
        normalized = d.length_normalized
        if normalized is None:
            normalized = PREFERENCE_LOSSES[d.loss].length_normalized
        return cls(d.loss, d.beta, d.label_smoothing, d.simpo_gamma, d.nll_coef, normalized)

    @property
    def uses_reference(self) -> bool:
        return PREFERENCE_LOSSES[self.loss].uses_reference

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor], totals: BatchTotals):
        spec = PREFERENCE_LOSSES[self.loss]
        logps, lengths = completion_logps(model, mb)
        pc, pr = logps.view(2, -1)
        values = logps / lengths.clamp(min=1) if self.length_normalized else logps
        if spec.uses_reference:
            ref = mb[REF_KEY].to(logps).T.reshape(-1)  # (2B,) chosen then rejected, like the rows
            values = values - (ref / lengths.clamp(min=1) if self.length_normalized else ref)
        c, r = values.view(2, -1)
        losses = spec.fn(c, r, self.beta, self.label_smoothing, self.gamma)
        metrics = {}
        if self.nll_coef > 0:
            nll = chosen_nll(pc, lengths.view(2, -1)[0])
            losses = losses + self.nll_coef * nll
            metrics["nll_sum"] = _sum(nll)
        rc, rr = (self.beta * c).detach(), (self.beta * r).detach()
        metrics.update({"loss_sum": _sum(losses), "pairs": float(pc.numel()),
                        "correct": preference_accuracy(rc, rr).sum().item(), "chosen_sum": rc.sum().item(),
                        "rejected_sum": rr.sum().item(), "logps_chosen_sum": _sum(pc),
                        "logps_rejected_sum": _sum(pr), "tokens_sum": _sum(lengths)})
        return losses.sum() * totals.scale(totals.sequences), metrics


@dataclass(frozen=True)
class KTOLoss:
    """KTO loss on the labelled half with the global batch's reference point ``z0``, a mean over examples.

    ``z0`` is a statistic of the whole global batch under the current policy: the offline loop sets it per
    step with ``with_z0`` from a ``KTOKLLogratios`` pass.
    """

    beta: float
    desirable_weight: float
    undesirable_weight: float
    z0: float = 0.0

    @classmethod
    def from_config(cls, cfg: "Config") -> "KTOLoss":
        k = cfg.kto
        return cls(k.beta, k.desirable_weight, k.undesirable_weight)

    def with_z0(self, outputs: list[torch.Tensor]) -> "KTOLoss":
        """This loss with z0 from the batch's ``KTOKLLogratios`` outputs (``kto_reference_point``)."""
        from dataclasses import replace

        from rlhf_ray.algos.preference import kto_reference_point

        return replace(self, z0=float(kto_reference_point(torch.cat(outputs))))

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor], totals: BatchTotals):
        logps, _ = completion_logps(model, half(mb, 0))
        ref = mb[REF_KEY][:, 0].to(logps)
        good = mb["desirable"].to(torch.bool)
        losses = kto_loss(logps, ref, good, self.z0, self.beta, self.desirable_weight, self.undesirable_weight)
        rewards = implicit_rewards(logps, ref, self.beta).detach()
        n = float(good.numel())
        return losses.sum() * totals.scale(totals.sequences), {
            "loss_sum": _sum(losses), "examples": n, "desirable": good.sum().item(),
            "rewards_desirable_sum": rewards[good].sum().item(), "rewards_undesirable_sum": rewards[~good].sum().item(),
            "logps_desirable_sum": logps.detach()[good].sum().item(),
            "logps_undesirable_sum": logps.detach()[~good].sum().item(), "kl_sum": self.z0 * n}
