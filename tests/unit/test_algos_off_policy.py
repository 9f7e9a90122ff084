"""Off-policy corrections (token / sequence, truncated / masked): weights, ratios, what is capped or masked."""

import math
from typing import get_args, get_type_hints

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.off_policy import (CORRECTIONS, OffPolicyParams, get_off_policy_correction, icepop,
                                       importance_ratio, no_correction, seq_mask, seq_tis, token_tis)
from rlhf_ray.config.schema import AlgoConfig


def close(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


# d = old - rollout per position. Row 0: three action tokens and a padding position (mask 0) whose d must not
# count; row 1: a prompt position (mask 0), then three action tokens.
#            token ratios exp(d)                 sequence ratio = product over action tokens
# row 0:     [3, 0.4, 1, (1.5 masked)]           3 * 0.4 * 1 = 1.2
# row 1:     [(0.25 masked), 1, 1.2, 1.25]       1 * 1.2 * 1.25 = 1.5
D = torch.log(torch.tensor([[3.0, 0.4, 1.0, 1.5], [0.25, 1.0, 1.2, 1.25]]))
MASK = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])
ROLLOUT = torch.full((2, 4), -1.5)
OLD = ROLLOUT + D


def test_importance_ratio_token_and_sequence():
    ratio, units = importance_ratio(OLD, ROLLOUT, MASK, "token")
    close(ratio, [[3.0, 0.4, 1.0, 1.0], [1.0, 1.0, 1.2, 1.25]])  # masked positions: d * 0 = 0 -> exp(0) = 1
    close(units, MASK)
    ratio, units = importance_ratio(OLD, ROLLOUT, MASK, "sequence")
    close(ratio, [1.2, 1.5])                                       # products above; the masked d's left out
    close(units, [1.0, 1.0])
    ratio, units = importance_ratio(OLD, ROLLOUT, torch.zeros(2, 4), "sequence")
    close(ratio, [1.0, 1.0])                                       # no action token: sum 0 -> 1, and not counted
    close(units, [0.0, 0.0])


def test_log_ratios_are_clamped_at_20_before_exp():
    old = torch.tensor([[15.0, 15.0, -30.0]])
    mask = torch.ones(1, 3)
    ratio, _ = importance_ratio(old, torch.zeros(1, 3), mask, "token")
    close(ratio, [[math.exp(15.0), math.exp(15.0), math.exp(-20.0)]])  # -30 clamped to -20
    ratio, _ = importance_ratio(old, torch.zeros(1, 3), mask, "sequence")
    close(ratio, [math.exp(0.0)])                                       # 15 + 15 - 30 = 0: the sum, then the clamp
    ratio, _ = importance_ratio(old[:, :2], torch.zeros(1, 2), mask[:, :2], "sequence")
    assert float(ratio) == pytest.approx(math.exp(20.0), rel=1e-6)     # 30 clamped to 20, finite


def test_none_keeps_weight_one_and_reports_the_token_ratio():
    w = no_correction(OLD, ROLLOUT, MASK, OffPolicyParams())
    close(w.weights, torch.ones(2, 4))
    close(w.ratio, [[3.0, 0.4, 1.0, 1.0], [1.0, 1.0, 1.2, 1.25]])
    close(w.capped, torch.zeros(2, 4))
    close(w.masked, torch.zeros(2, 4))
    assert w.level == "token"


def test_token_tis_truncates_each_token_at_the_cap():
    w = token_tis(OLD, ROLLOUT, MASK, OffPolicyParams(cap=2.0))
    close(w.weights, [[2.0, 0.4, 1.0, 1.0], [1.0, 1.0, 1.2, 1.25]])  # min(3, 2) = 2; the rest below the cap
    close(w.capped, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    close(w.masked, torch.zeros(2, 4))
    assert w.level == "token"
    w = token_tis(OLD, ROLLOUT, MASK, OffPolicyParams(cap=1.1))
    close(w.weights, [[1.1, 0.4, 1.0, 1.0], [1.0, 1.0, 1.1, 1.1]])   # 3, 1.2, 1.25 -> 1.1
    close(w.capped, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]])


def test_seq_tis_gives_each_sequence_one_truncated_weight():
    w = seq_tis(OLD, ROLLOUT, MASK, OffPolicyParams(cap=1.4))
    close(w.ratio, [1.2, 1.5])
    close(w.weights, [[1.2] * 4, [1.4] * 4])   # row 0: 1.2 < 1.4 kept; row 1: min(1.5, 1.4) = 1.4
    close(w.capped, [0.0, 1.0])
    close(w.masked, [0.0, 0.0])
    assert w.level == "sequence"


def test_seq_mask_drops_sequences_outside_the_band_and_weighs_the_rest():
    w = seq_mask(OLD, ROLLOUT, MASK, OffPolicyParams(low=0.5, high=1.3))
    close(w.weights, [[1.2] * 4, [0.0] * 4])    # 1.2 in [0.5, 1.3] -> weight 1.2; 1.5 > 1.3 -> dropped
    close(w.masked, [0.0, 1.0])
    close(w.capped, [0.0, 0.0])
    w = seq_mask(OLD, ROLLOUT, MASK, OffPolicyParams(low=1.25, high=2.0))
    close(w.weights, [[0.0] * 4, [1.5] * 4])    # 1.2 < 1.25 -> dropped (the lower edge); 1.5 kept
    close(w.masked, [1.0, 0.0])


def test_icepop_masks_tokens_outside_the_band_and_weighs_the_rest():
    w = icepop(OLD, ROLLOUT, MASK, OffPolicyParams(low=0.5, high=2.0))
    # row 0: 3 > 2 and 0.4 < 0.5 dropped, 1 kept; row 1: 1, 1.2, 1.25 kept at their ratios
    close(w.weights, [[0.0, 0.0, 1.0, 1.0], [1.0, 1.0, 1.2, 1.25]])
    close(w.masked, [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])  # masked positions are not units: never counted
    close(w.capped, torch.zeros(2, 4))
    w = icepop(OLD, ROLLOUT, MASK, OffPolicyParams(low=0.3, high=1.2))
    close(w.weights, [[0.0, 0.4, 1.0, 1.0], [1.0, 1.0, 1.2, 0.0]])   # the band is closed: 1.2 kept, 1.25 dropped
    close(w.masked, [[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.mark.parametrize("name", ["none", "token_tis", "seq_tis", "seq_mask", "icepop"])
def test_weights_are_detached(name):
    old = OLD.clone().requires_grad_(True)
    w = get_off_policy_correction(name)(old, ROLLOUT, MASK, OffPolicyParams())
    assert not w.weights.requires_grad and not w.ratio.requires_grad


def test_registry_matches_the_config_names():
    assert set(CORRECTIONS) == set(get_args(get_type_hints(AlgoConfig)["off_policy_correction"]))
    assert get_off_policy_correction("icepop") is icepop
    with pytest.raises(ValueError, match="none, token_tis, seq_tis, seq_mask, icepop"):
        get_off_policy_correction("tis")


# ---- what the correction is for: the stale sample's policy gradient, made unbiased -----------------------------------
# A one-token policy pi = softmax(z) over 3 tokens, its samples drawn from a stale mu (one step off: mu = the policy
# one update ago). The objective is the KL-regularised reward J(z) = E_pi[r] - beta KL(pi || ref), whose gradient is
#     dJ/dz_j = pi_j (R_j - E_pi[R]),   R(y) = r(y) - beta (log pi(y) - log ref(y))   (k1 at the current pi)
# (the score-function gradient; the pathwise term beta E_pi[d log pi] is 0). Each row below is one response y; the
# expectation over y ~ mu is exact: each row's loss weighed by mu(y). With d log pi(y) / dz = e_y - pi, corrected:
# sum_y mu_y (pi_y / mu_y) A_y (e_y - pi)_j = pi_j A_j - pi_j sum_y pi_y A_y = pi_j A_j (E_pi[A] = 0), i.e. dJ/dz_j;
# uncorrected: mu_j A_j - pi_j sum_y mu_y A_y.

def _stale_gradient(pi: torch.Tensor, ref: torch.Tensor, mu: torch.Tensor, rewards: torch.Tensor, beta: float,
                    correction: str) -> torch.Tensor:
    """-d/dz E_{y~mu}[loss(y)] at z = log pi, the loss composed as ``RLLoop.step`` and ``PolicyLoss`` compose it:
    k1 at pi_old (= pi: one optimizer step per batch) in the reward, advantage A = R - E_pi[R] (the exact baseline),
    vanilla_pg, times the correction's weight from pi_old / mu."""
    from rlhf_ray.algos.kl import kl_in_reward, kl_penalty
    from rlhf_ray.algos.policy_loss import vanilla_pg

    z = pi.log().clone().requires_grad_(True)
    logp = torch.log_softmax(z, dim=-1)[:, None]                 # (3, 1): row y is the response y
    old, mask = logp.detach(), torch.ones(3, 1)
    R = kl_in_reward(rewards, kl_penalty(old, ref.log()[:, None], "k1"), mask, beta)[:, 0]
    adv = (R - (pi * R).sum())[:, None]
    loss, _ = vanilla_pg(logp, old, adv, 0.2, 0.2, None)
    w = get_off_policy_correction(correction)(old, mu.log()[:, None], mask, OffPolicyParams(cap=2.0)).weights
    (mu[:, None] * loss * w).sum().backward()
    return -z.grad


def _objective_gradient(pi: torch.Tensor, ref: torch.Tensor, rewards: torch.Tensor, beta: float) -> torch.Tensor:
    """dJ/dz by autograd of J = sum_y pi_y r_y - beta sum_y pi_y log(pi_y / ref_y) itself."""
    z = pi.log().clone().requires_grad_(True)
    p = torch.softmax(z, dim=-1)
    (p * rewards - beta * p * (p.log() - ref.log())).sum().backward()
    return z.grad


def test_token_tis_makes_a_stale_batch_give_the_gradient_of_the_kl_regularised_reward():
    ln2 = math.log(2.0)
    # The policy at the reference (the KL term 0): pi = ref = (1/2, 1/4, 1/4), r = (1, 0, 0), beta = 1, so R = r,
    # E_pi[R] = 1/2, A = (1/2, -1/2, -1/2) and dJ/dz = pi * A = (1/4, -1/8, -1/8). mu = (1/4, 1/4, 1/2): the weights
    # pi / mu = (2, 1, 1/2) (2 is at the cap, not over it). Uncorrected, sum_y mu_y A_y = 1/8 - 1/8 - 1/4 = -1/4 and
    # mu_j A_j - pi_j (-1/4) = (1/8 + 1/8, -1/8 + 1/16, -1/4 + 1/16) = (1/4, -1/16, -3/16).
    pi, r, mu = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.25, 0.25, 0.5])
    close(_stale_gradient(pi, pi, mu, r, 1.0, "token_tis"), [1 / 4, -1 / 8, -1 / 8])
    close(_objective_gradient(pi, pi, r, 1.0), [1 / 4, -1 / 8, -1 / 8])
    close(_stale_gradient(pi, pi, mu, r, 1.0, "none"), [1 / 4, -1 / 16, -3 / 16])
    # The KL term alone: pi = (1/2, 1/4, 1/4), ref = (1/4, 1/4, 1/2), r = 0, beta = 1. log(pi / ref) = (ln2, 0, -ln2),
    # R = (-ln2, 0, ln2), E_pi[R] = -ln2/2 + ln2/4 = -ln2/4, A = (-3ln2/4, ln2/4, 5ln2/4), dJ/dz = pi * A =
    # (-3ln2/8, ln2/16, 5ln2/16). mu = (1/4, 1/2, 1/4): weights (2, 1/2, 1). Uncorrected: sum_y mu_y A_y =
    # (-3/16 + 2/16 + 5/16) ln2 = ln2/4, mu_j A_j - pi_j ln2/4 = (-3/16 - 2/16, 2/16 - 1/16, 5/16 - 1/16) ln2.
    ref, r0, mu = torch.tensor([0.25, 0.25, 0.5]), torch.zeros(3), torch.tensor([0.25, 0.5, 0.25])
    close(_stale_gradient(pi, ref, mu, r0, 1.0, "token_tis"), [-3 * ln2 / 8, ln2 / 16, 5 * ln2 / 16])
    close(_objective_gradient(pi, ref, r0, 1.0), [-3 * ln2 / 8, ln2 / 16, 5 * ln2 / 16])
    close(_stale_gradient(pi, ref, mu, r0, 1.0, "none"), [-5 * ln2 / 16, ln2 / 16, 4 * ln2 / 16])


def test_at_the_kl_regularised_optimum_every_advantage_is_zero_corrected_or_not():
    """pi* = ref exp(r / beta) / Z makes R(y) = r(y) - beta log(pi*(y) / ref(y)) = beta log Z for every y: each
    advantage is 0, so the gradient is 0 whatever mu sampled. ref = (1/2, 1/4, 1/4), r = (ln2, 0, 0), beta = 1:
    pi* = (1, 1/4, 1/4) / Z with Z = 3/2, i.e. (2/3, 1/6, 1/6); R = ln2 - ln(4/3) = 0 - ln(2/3) = ln(3/2)."""
    ref, r = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([math.log(2.0), 0.0, 0.0])
    star = torch.tensor([2 / 3, 1 / 6, 1 / 6])
    from rlhf_ray.algos.kl import kl_in_reward, kl_penalty

    mask = torch.ones(3, 1)
    R = kl_in_reward(r, kl_penalty(star.log()[:, None], ref.log()[:, None], "k1"), mask, 1.0)
    close(R, [[math.log(1.5)]] * 3)
    for mu in (torch.tensor([0.25, 0.25, 0.5]), torch.tensor([0.6, 0.3, 0.1])):
        for name in ("token_tis", "none"):
            close(_stale_gradient(star, ref, mu, r, 1.0, name), [0.0, 0.0, 0.0])
    close(_objective_gradient(star, ref, r, 1.0), [0.0, 0.0, 0.0])
