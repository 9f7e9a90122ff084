"""The RL jobs' learner specs: the policy loss (PPO / REINFORCE family), the critic's value loss and values.

Glue only: forward pass -> per-token quantities -> the pure functions of ``rlhf_ray.algos`` -> one scaled
scalar (see ``objectives.common`` for the scaling). Micro-batches are ``RolloutBatch.tensors(...)`` slices:
``input_ids`` / ``attention_mask`` (B, T) and per-token fields (B, T-1) aligned with ``input_ids[:, 1:]``.
Each spec's ``fields`` says which of them the controller must ship.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Optional

import torch

from rlhf_ray.algos.aggregation import agg_loss
from rlhf_ray.algos.kl import kl_penalty
from rlhf_ray.algos.logprobs import entropy_from_logits, gather_token_logprobs
from rlhf_ray.algos.off_policy import ImportanceWeights, OffPolicyParams, get_off_policy_correction
from rlhf_ray.algos.policy_loss import get_policy_loss, get_ratio_level, value_loss
from rlhf_ray.objectives.common import SEQUENCE_FIELDS, BatchTotals, causal_lm_logits

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import Resolved


@dataclass(frozen=True)
class PolicyLoss:
    """Policy-gradient loss of one micro-batch.

    per-token loss = w_t * (L_pg(logp'_t, old_t, A_t) + kl_coef * KL_est(logp_t, ref_t)) - entropy_coef * H_t,
    aggregated by ``loss_agg`` over the mini-batch's ``BatchTotals``. logp' = logp at ``ratio_level`` token (PPO's
    ratio per token); at sequence, GSPO's rewrite (``algos.policy_loss.sequence_ratio``) whose ratio to old_t is
    the sequence's geometric-mean ratio, clipped by ``clip_low`` / ``clip_high`` (the config's sequence clip
    range then). w_t, detached, corrects for the engine's sampling distribution differing from the learner's:
    ``off_policy_correction`` names the function of ``rlhf_ray.algos.off_policy`` that derives it from
    exp(old_t - rollout_t) (None: pi_old is the engine's own, w = 1, no rollout log-probs needed); the KL term is
    present only when the reference KL goes into the loss (``kl_in_loss``). w_t weighs it too: its tokens were
    drawn by the engine as well, and the KL estimator's gradient is an expectation under pi_old
    (E_mu[(pi_old/mu) grad KL_est] = E_pi_old[grad KL_est]); a masking correction drops both terms of a token.

    ``old_from_update`` (``algo.old_logprobs: update``): old_t = logp_t detached, this forward pass being the
    first of the step's only optimizer step (ratio 1, gradient A_t * grad logp_t); the micro-batch then
    carries no ``old_logprobs``, and ``old_rollout_absdiff_sum`` = sum |old_t - rollout_t| reports the
    learner-vs-vLLM gap a separate pi_old pass would have.

    Metric sums of the correction (``importance_metric_sums``): over its units, action tokens
    (``importance_tokens``) or sequences (``importance_sequences``), the sum of the ratio rho it saw and the
    number of units it capped or masked.
    """

    policy_loss: str
    clip_low: float
    clip_high: float
    dual_clip: Optional[float]
    loss_agg: str
    temperature: float
    entropy_coef: float
    kl_estimator: str
    kl_in_loss: bool
    off_policy_correction: Optional[str]
    old_from_update: bool
    off_policy: OffPolicyParams = OffPolicyParams()
    """The correction's cap and band."""
    ratio_level: str = "token"
    """``algo.ratio_level``: token (PPO) or sequence (GSPO)."""
    kl_coef: float = 0.0
    """This step's coefficient (the adaptive controller moves it): ``with_kl_coef`` per step."""

    @classmethod
    def from_resolved(cls, resolved: "Resolved") -> "PolicyLoss":
        """The policy loss the config asks for; ``kl_coef`` is set per step."""
        a, rl = resolved.config.algo, resolved.rl
        assert rl is not None, "the policy loss belongs to jobs ppo and grpo"
        # importance_cap may be null where no truncating correction reads it.
        params = OffPolicyParams(cap=a.importance_cap if a.importance_cap is not None else OffPolicyParams.cap,
                                 low=a.importance_mask_low, high=a.importance_mask_high)
        sequence = a.ratio_level == "sequence"  # GSPO clips its sequence ratio with a range of its own
        return cls(policy_loss=a.policy_loss, clip_low=a.sequence_clip_ratio_low if sequence else a.clip_ratio_low,
                   clip_high=a.sequence_clip_ratio_high if sequence else a.clip_ratio_high, dual_clip=a.dual_clip,
                   loss_agg=a.loss_agg, temperature=resolved.config.rollout.temperature, entropy_coef=a.entropy_coef, kl_estimator=a.kl_estimator, kl_in_loss=rl.kl_in_loss,
                   off_policy_correction=rl.off_policy_correction, old_from_update=rl.old_logprobs == "update",
                   off_policy=params, ratio_level=a.ratio_level)

    def with_kl_coef(self, kl_coef: float) -> "PolicyLoss":
        """This spec with the step's KL coefficient (0 when the KL is not in the loss)."""
        return dataclasses.replace(self, kl_coef=kl_coef if self.kl_in_loss else 0.0)

    @property
    def fields(self) -> tuple[str, ...]:
        """The ``RolloutBatch`` fields this loss reads."""
        out = SEQUENCE_FIELDS + ("action_mask", "advantages")
        if not self.old_from_update:
            out += ("old_logprobs",)
        if self.old_from_update or self.off_policy_correction is not None:
            out += ("rollout_logprobs",)
        if self.kl_in_loss:
            out += ("ref_logprobs",)
        return out

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor], totals: BatchTotals):
        logits = causal_lm_logits(model, mb)[:, :-1].float()
        if self.temperature != 1.0:
            logits = logits / self.temperature
        logp = gather_token_logprobs(logits, mb["input_ids"][:, 1:])
        mask = mb["action_mask"].float()
        old = logp.detach() if self.old_from_update else mb["old_logprobs"]
        ratio_logp = get_ratio_level(self.ratio_level)(logp, old, mask)
        pg_mat, clipped = get_policy_loss(self.policy_loss)(ratio_logp, old, mb["advantages"], self.clip_low,
                                                            self.clip_high, self.dual_clip)
        metrics: dict[str, float] = {}
        weights = None
        if self.off_policy_correction is not None:
            correction = get_off_policy_correction(self.off_policy_correction)(old, mb["rollout_logprobs"], mask,
                                                                               self.off_policy)
            weights = correction.weights
            pg_mat = pg_mat * weights
            metrics.update(importance_metric_sums(correction))
        total = pg_mat
        if self.old_from_update:
            metrics["old_rollout_absdiff_sum"] = float(((old - mb["rollout_logprobs"]).abs() * mask).sum())
        if self.kl_coef > 0:
            kl = kl_penalty(logp, mb["ref_logprobs"], self.kl_estimator)
            total = total + self.kl_coef * (kl if weights is None else weights * kl)
            metrics["kl_sum"] = float((kl.detach() * mask).sum())
        if self.entropy_coef > 0:
            entropy = entropy_from_logits(logits)
            total = total - self.entropy_coef * entropy
        else:
            with torch.no_grad():
                entropy = entropy_from_logits(logits.detach())
        loss = agg_loss(total, mask, self.loss_agg, totals.tokens, totals.sequences, totals.horizon)
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
        return loss * totals.grad_scale, metrics


def importance_metric_sums(weights: ImportanceWeights) -> dict[str, float]:
    """A correction's metric sums over its units (``ImportanceWeights.units``): the count under
    ``importance_tokens`` or ``importance_sequences`` (which names the level), and the sums of the ratio rho and
    of the units capped and masked (``rl_metrics.policy_metrics`` divides them by the count), and the largest ratio
    (``importance_ratio_max``, which ``metrics.accumulate`` folds by max)."""
    units = weights.units
    counted = weights.ratio[units.bool()]
    return {f"importance_{weights.level}s": float(units.sum()),
            "importance_ratio_sum": float((weights.ratio * units).sum()),
            "importance_capped_sum": float((weights.capped * units).sum()),
            "importance_masked_sum": float((weights.masked * units).sum()),
            "importance_ratio_max": float(counted.max()) if counted.numel() else 0.0}


def token_values(model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
    """Critic values (B, T-1): V at position t scores the state before token t+1 is generated.

    The critic is a ``*ForTokenClassification`` model with one label: logits (B, T, 1).
    """
    out = model(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
    return out.logits[..., 0][:, :-1].float()


@dataclass(frozen=True)
class TokenValues:
    """Critic values (B, T-1) for the advantage estimate."""

    fields: ClassVar[tuple[str, ...]] = SEQUENCE_FIELDS

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor]) -> torch.Tensor:
        return token_values(model, mb)


@dataclass(frozen=True)
class ValueLoss:
    """Clipped value loss 0.5 * max((V - R)^2, (V_old + clip(V - V_old, -c, c) - R)^2), aggregated like the policy."""

    value_clip: Optional[float]
    loss_agg: str
    fields: ClassVar[tuple[str, ...]] = SEQUENCE_FIELDS + ("action_mask", "values", "returns")

    @classmethod
    def from_resolved(cls, resolved: "Resolved") -> "ValueLoss":
        a = resolved.config.algo
        return cls(value_clip=a.value_clip, loss_agg=a.loss_agg)

    def __call__(self, model: torch.nn.Module, mb: dict[str, torch.Tensor], totals: BatchTotals):
        values = token_values(model, mb)
        mask = mb["action_mask"].float()
        loss_mat, clipped = value_loss(values, mb["values"], mb["returns"], self.value_clip)
        loss = agg_loss(loss_mat, mask, self.loss_agg, totals.tokens, totals.sequences, totals.horizon)
        with torch.no_grad():
            metrics = {"value_loss_sum": float((loss_mat.detach() * mask).sum()),
                       "value_clipped_sum": float((clipped * mask).sum()),
                       "values_sum": float((values.detach() * mask).sum()),
                       "action_tokens": float(mask.sum())}
        return loss * totals.grad_scale, metrics
