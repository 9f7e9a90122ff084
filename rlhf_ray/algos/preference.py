"""Preference losses: Bradley-Terry reward models, the DPO family (DPO, conservative DPO, IPO, SimPO), KTO.

Pure torch, no side effects. Every loss returns one value per example, shape (B,); the objective
(``rlhf_ray.objectives.preference``) scales and sums them so that the global batch gets the
mean. Inputs are per-sequence log-probabilities of the *completion* tokens (prompt tokens excluded):
summed over tokens for DPO / IPO / KTO (as in the papers), averaged over tokens for SimPO;
``dpo.length_normalized`` averages them for DPO and IPO too (IPO's form in TRL and the IPO authors' results).

Pairwise DPO-family losses share one signature and sit in ``PREFERENCE_LOSSES`` (named by
``dpo.loss``). Each takes the chosen and rejected *log-ratios*

    c = log pi(y_w | x) - log pi_ref(y_w | x),    r = log pi(y_l | x) - log pi_ref(y_l | x)   (B,)

(for a reference-free loss such as SimPO, ``c`` and ``r`` are the policy's length-averaged log-probs
and ``PairwiseLoss.uses_reference`` is False), with ``beta``, ``label_smoothing`` and ``gamma``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

import torch
import torch.nn.functional as F

from rlhf_ray.algos.names import REFERENCE_FREE_PREFERENCE_LOSSES

Tensor = torch.Tensor


# ---- reward models -------------------------------------------------------------------------------

def bradley_terry_loss(chosen_scores: Tensor, rejected_scores: Tensor, margin: Union[Tensor, float] = 0.0) -> Tensor:
    """Pairwise reward-model loss (Bradley-Terry; InstructGPT), with an optional margin (Llama 2).

    chosen_scores, rejected_scores: (B,) scalar rewards r(x, y_w), r(x, y_l); margin: () or (B,), >= 0.
    Returns (B,):   loss = -log sigmoid(r(x, y_w) - r(x, y_l) - m)
    The margin asks for a score gap of at least ``m`` before the pair stops contributing much.
    """
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float() - margin)


def preference_accuracy(chosen: Tensor, rejected: Tensor) -> Tensor:
    """1.0 where the chosen value is strictly above the rejected one (ties count as wrong). (B,) -> (B,)"""
    return (chosen > rejected).float()


# ---- DPO family ----------------------------------------------------------------------------------

def implicit_rewards(policy_logps: Tensor, reference_logps: Tensor, beta: float) -> Tensor:
    """DPO / KTO implicit reward  beta * (log pi(y|x) - log pi_ref(y|x)).  (B,), (B,) -> (B,)"""
    return beta * (policy_logps.float() - reference_logps.float())


def dpo_sigmoid_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
                     label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """DPO (Rafailov et al. 2023); conservative DPO when ``label_smoothing`` = eps > 0 (Mitchell 2023).

    chosen_logratios c, rejected_logratios r: (B,). With h = beta * (c - r), returns (B,):
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)
    eps is the assumed probability that a pair's label is flipped; eps = 0 is plain DPO.
    ``gamma`` is unused (the shared signature).
    """
    h = beta * (chosen_logratios.float() - rejected_logratios.float())
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def ipo_loss(chosen_logratios: Tensor, rejected_logratios: Tensor, beta: float,
             label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """IPO (Azar et al. 2023): squared regression of the log-ratio gap onto 1 / (2 beta).

    chosen_logratios c, rejected_logratios r: (B,). Returns (B,):  loss = (c - r - 1 / (2 beta))^2
    Here ``beta`` is the paper's tau (regularisation strength). Unlike the sigmoid loss it does not
    push the gap to infinity on deterministic preferences. ``label_smoothing`` and ``gamma`` are
    unused (the config rejects label_smoothing with IPO).
    """
    return (chosen_logratios.float() - rejected_logratios.float() - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(chosen_avg_logps: Tensor, rejected_avg_logps: Tensor, beta: float,
               label_smoothing: float = 0.0, gamma: float = 0.0) -> Tensor:
    """SimPO (Meng et al. 2024): reference-free, length-normalised, with a target margin gamma.

    chosen_avg_logps a_w, rejected_avg_logps a_l: (B,) policy log-probs averaged over completion
    tokens. With h = beta * (a_w - a_l) - gamma and eps = label_smoothing, returns (B,):
        loss = -(1 - eps) * log sigmoid(h) - eps * log sigmoid(-h)
    """
    h = beta * (chosen_avg_logps.float() - rejected_avg_logps.float()) - gamma
    return -(1.0 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)


def chosen_nll(chosen_logps: Tensor, chosen_lengths: Tensor) -> Tensor:
    """Length-normalised negative log-likelihood of the chosen completion (RPO's extra term).

    chosen_logps: (B,) summed completion log-probs; chosen_lengths: (B,) completion tokens (>= 1).
    Returns (B,):  nll = -log pi(y_w | x) / |y_w|
    Per pair, so that it averages over pairs like the preference term it is added to.
    """
    return -chosen_logps.float() / chosen_lengths.float().clamp(min=1.0)


@dataclass(frozen=True)
class PairwiseLoss:
    """A DPO-family loss and what its inputs are."""

    fn: Callable[..., Tensor]
    """``(chosen, rejected, beta, label_smoothing, gamma) -> (B,)`` losses."""
    uses_reference: bool
    """True: inputs are policy - reference log-ratios; False: policy log-probs alone (no reference pass)."""
    length_normalized: bool
    """True: log-probs averaged over completion tokens; False: summed."""


PREFERENCE_LOSSES: dict[str, PairwiseLoss] = {
    name: PairwiseLoss(fn, uses_reference=name not in REFERENCE_FREE_PREFERENCE_LOSSES, length_normalized=normalized)
    for name, fn, normalized in (("sigmoid", dpo_sigmoid_loss, False), ("ipo", ipo_loss, False),
                                 ("simpo", simpo_loss, True))
}
"""Pairwise preference losses by ``dpo.loss`` name."""


# ---- KTO -----------------------------------------------------------------------------------------

def kto_reference_point(kl_logratios: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean KL estimate), detached (Ethayarajh et al. 2024, eq. 7).

    kl_logratios: (N,) log pi(y'|x) - log pi_ref(y'|x) for *mismatched* pairs (x, y'): each prompt
    with another example's completion, so z0 estimates KL(pi || pi_ref) over the prompt
    distribution rather than on the very completions whose rewards are being pushed (which would
    move z0 with the objective itself). Returns a 0-dim tensor; no gradient flows through it.
    """
    return kl_logratios.detach().float().mean().clamp(min=0.0)


def kto_loss(policy_logps: Tensor, reference_logps: Tensor, desirable: Tensor, z0: Union[Tensor, float],
             beta: float, desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> Tensor:
    """KTO (Ethayarajh et al. 2024) on unpaired completions labelled desirable or undesirable.

    policy_logps, reference_logps: (B,) summed completion log-probs; desirable: (B,) bool;
    z0: () reference point (``kto_reference_point``), treated as a constant. With the log-ratio
    rho = log pi(y|x) - log pi_ref(y|x), returns (B,):
        desirable:    lambda_D * (1 - sigmoid(beta * (rho - z0)))
        undesirable:  lambda_U * (1 - sigmoid(beta * (z0 - rho)))
    """
    rho = policy_logps.float() - reference_logps.float()
    z0 = torch.as_tensor(z0, dtype=rho.dtype, device=rho.device).detach()
    good = desirable.to(torch.bool)
    value = torch.where(good, torch.sigmoid(beta * (rho - z0)), torch.sigmoid(beta * (z0 - rho)))
    weight = torch.where(good, torch.full_like(rho, desirable_weight), torch.full_like(rho, undesirable_weight))
    return weight * (1.0 - value)
