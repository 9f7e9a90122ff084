"""Advantage estimators against hand-computed values; padding stays zero; groups are normalised apart."""

import math
import statistics
from typing import get_args, get_type_hints

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.advantages import (ADVANTAGES, GROUP_BASED, NEEDS_CRITIC, AdvantageParams, get_advantage,
                                       return_to_go)
from rlhf_ray.config.schema import AlgoConfig

PAD = 9.0   # a junk reward / value on positions outside the mask: must never leak in


def close(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def seq_batch(scores, lengths, T=3):
    """token_rewards with score r_b at the last action token (and PAD after it), mask of ``lengths``."""
    rewards = torch.full((len(scores), T), PAD)
    mask = torch.zeros(len(scores), T)
    for b, (r, n) in enumerate(zip(scores, lengths)):
        rewards[b, :n] = 0.0
        rewards[b, n - 1] = r
        mask[b, :n] = 1.0
    return rewards, mask


def run(name, rewards, mask, groups, values=None, **params):
    return get_advantage(name)(rewards, mask, torch.tensor(groups), values, AdvantageParams(**params))


def per_seq(adv, mask):
    """The row's constant advantage, checking it is broadcast to all action tokens and 0 elsewhere."""
    out = adv[:, 0].clone()
    for b in range(adv.shape[0]):
        row = adv[b][mask[b].bool()]
        assert torch.all(row == row[0]), "advantage is not constant over the row's action tokens"
        assert torch.all(adv[b][~mask[b].bool()] == 0), "padding is not zero"
        out[b] = row[0]
    return out


def test_registry_matches_config():
    # algo.advantage is Optional[Literal[...]] (unset = the job's default); the Literal lists the names.
    literal = next(a for a in get_args(get_type_hints(AlgoConfig)["advantage"]) if a is not type(None))
    assert set(ADVANTAGES) == set(get_args(literal))
    assert NEEDS_CRITIC == {"gae"}
    assert GROUP_BASED == {"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"}
    with pytest.raises(ValueError, match="grpo"):
        get_advantage("ppo")


# ---------------------------------------------------------------- grpo / dr_grpo / rloo

def test_grpo_one_group():
    rewards, mask = seq_batch([1.0, 0.0, 0.0, 1.0], [2, 1, 3, 2])
    adv, ret = run("grpo", rewards, mask, [0, 0, 0, 0])
    # mean 0.5; unbiased var = 4 * 0.5^2 / 3 = 1/3, std = 0.5773503; A = +-0.5 / (0.5773503 + 1e-6) = +-0.8660239
    a = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    close(per_seq(adv, mask), [a, -a, -a, a])
    close(ret, adv)


def test_grpo_two_interleaved_groups_normalised_separately():
    rewards, mask = seq_batch([1.0, 0.0, 3.0, 0.0, 3.0], [3, 2, 1, 3, 2])
    adv, _ = run("grpo", rewards, mask, [7, 3, 7, 3, 3], eps=0.0)
    # group 7 = rows 0, 2: rewards 1, 3; mean 2, std = sqrt((1 + 1) / 1) = sqrt(2) -> -1/sqrt2, +1/sqrt2
    # group 3 = rows 1, 3, 4: rewards 0, 0, 3; mean 1, std = sqrt((1 + 1 + 4) / 2) = sqrt(3) -> -1/sqrt3, -1/sqrt3, 2/sqrt3
    s2, s3 = math.sqrt(2), math.sqrt(3)
    close(per_seq(adv, mask), [-1 / s2, -1 / s3, 1 / s2, -1 / s3, 2 / s3])


def test_grpo_center_only_singletons_and_ties():
    rewards, mask = seq_batch([1.0, 0.0, 0.0, 1.0], [2, 1, 3, 2])
    adv, _ = run("grpo", rewards, mask, [0, 0, 0, 0], norm_by_std=False)
    close(per_seq(adv, mask), [0.5, -0.5, -0.5, 0.5])       # r - 0.5
    rewards, mask = seq_batch([1.0, 1.0, 5.0], [2, 2, 2])
    adv, _ = run("grpo", rewards, mask, [0, 0, 1])
    close(adv, torch.zeros(3, 3))     # tied group: 0 / (0 + eps) = 0; group of size 1: 0


def test_dr_grpo():
    rewards, mask = seq_batch([1.0, 0.0, 3.0, 0.0, 3.0], [3, 2, 1, 3, 2])
    adv, ret = run("dr_grpo", rewards, mask, [7, 3, 7, 3, 3])
    # group 7 mean 2: 1-2, 3-2; group 3 mean 1: 0-1, 0-1, 3-1 (no std division)
    close(per_seq(adv, mask), [-1.0, -1.0, 1.0, -1.0, 2.0])
    close(ret, adv)


def test_rloo():
    rewards, mask = seq_batch([1.0, 0.0, 3.0, 0.0, 3.0, 4.0], [3, 2, 1, 3, 2, 2])
    adv, _ = run("rloo", rewards, mask, [7, 3, 7, 3, 3, 5])
    # group 7: 1 - 3 = -2, 3 - 1 = 2; group 3: 0 - (0+3)/2 = -1.5, -1.5, 3 - (0+0)/2 = 3; group 5 (size 1): 0
    close(per_seq(adv, mask), [-2.0, -1.5, 2.0, -1.5, 3.0, 0.0])


def test_group_score_sums_token_rewards_under_mask():
    # the score is sum_t token_rewards * mask: per-token penalties count, PAD after the mask does not
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 2.0, PAD]])   # r = 0.8, 1.8
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, _ = run("dr_grpo", rewards, mask, [0, 0])
    close(per_seq(adv, mask), [-0.5, 0.5])     # mean 1.3


# ---------------------------------------------------------------- reinforce++

def whitened(g_values):
    """(g - mean) / sqrt(pvariance + 1e-8) over the listed action-token returns (masked_whiten's formula)."""
    mean, var = statistics.fmean(g_values), statistics.pvariance(g_values)
    return [(g - mean) / math.sqrt(var + 1e-8) for g in g_values]


def test_reinforce_pp():
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 2.0, PAD]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = run("reinforce_pp", rewards, mask, [0, 0], gamma=0.5)
    # G row 0: t2 = 1.0; t1 = -0.1 + 0.5*1.0 = 0.4; t0 = -0.1 + 0.5*0.4 = 0.1
    # G row 1: t1 = 2.0; t0 = -0.2 + 0.5*2.0 = 0.8
    close(ret, [[0.1, 0.4, 1.0], [0.8, 2.0, 0.0]])
    # whiten over [0.1, 0.4, 1.0, 0.8, 2.0]: mean 0.86, var 2.112 / 5 = 0.4224
    assert statistics.pvariance([0.1, 0.4, 1.0, 0.8, 2.0]) == pytest.approx(0.4224)
    w = whitened([0.1, 0.4, 1.0, 0.8, 2.0])   # [-1.16937, -0.70778, 0.21541, -0.09232, 1.75405]
    close(adv, [w[:3], w[3:] + [0.0]])


def test_reinforce_pp_baseline():
    # row 2 starts after a prompt position (mask 0 1 1) and is alone in its group
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 2.0, PAD], [PAD, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    adv, ret = run("reinforce_pp_baseline", rewards, mask, [0, 0, 1], gamma=0.5)
    # scores 0.8, 1.8 (group 0, mean 1.3), 3.0 (group 1, mean 3.0); subtract at the last action token:
    #   row 0 [-0.1, -0.1, -0.3]; row 1 [-0.2, 0.7, -]; row 2 [-, 0.0, 0.0]
    # G row 0: t2 = -0.3; t1 = -0.1 + 0.5*-0.3 = -0.25; t0 = -0.1 + 0.5*-0.25 = -0.225
    # G row 1: t1 = 0.7; t0 = -0.2 + 0.5*0.7 = 0.15;   G row 2: 0, 0
    close(ret, [[-0.225, -0.25, -0.3], [0.15, 0.7, 0.0], [0.0, 0.0, 0.0]])
    w = whitened([-0.225, -0.25, -0.3, 0.15, 0.7, 0.0, 0.0])
    close(adv, [w[0:3], [w[3], w[4], 0.0], [0.0, w[5], w[6]]])


def test_reinforce_pp_baseline_takes_the_raw_rewards_not_the_kl_penalised_sums():
    # The token rewards of test_reinforce_pp_baseline, their per-token KL penalties (-0.1, -0.2) now known to be
    # shaping: raw rewards 1.0, 2.0 (group 0, mean 1.5) and 3.0 (group 1) give the baseline.
    rewards = torch.tensor([[-0.1, -0.1, 1.0], [-0.2, 2.0, PAD], [PAD, 0.0, 3.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [0.0, 1.0, 1.0]])
    adv, ret = get_advantage("reinforce_pp_baseline")(rewards, mask, torch.tensor([0, 0, 1]), None,
                                                      AdvantageParams(gamma=0.5), scores=torch.tensor([1.0, 2.0, 3.0]))
    # minus 1.5 at row 0's and row 1's last token, 3.0 at row 2's: row 0 [-0.1, -0.1, -0.5]; row 1 [-0.2, 0.5]
    # G row 0: t2 = -0.5; t1 = -0.1 + 0.5*-0.5 = -0.35; t0 = -0.1 + 0.5*-0.35 = -0.275
    # G row 1: t1 = 0.5; t0 = -0.2 + 0.5*0.5 = 0.05;   G row 2: 0, 0
    close(ret, [[-0.275, -0.35, -0.5], [0.05, 0.5, 0.0], [0.0, 0.0, 0.0]])
    w = whitened([-0.275, -0.35, -0.5, 0.05, 0.5, 0.0, 0.0])
    close(adv, [w[0:3], [w[3], w[4], 0.0], [0.0, w[5], w[6]]])


def test_return_to_go_skips_masked_positions():
    rewards = torch.tensor([[PAD, 1.0, PAD, 2.0, PAD]])
    mask = torch.tensor([[0.0, 1.0, 0.0, 1.0, 0.0]])
    # action tokens only: t3 = 2; t1 = 1 + 0.5*2 = 2 (the masked gap is neither rewarded nor discounted)
    close(return_to_go(rewards, mask, 0.5), [[0.0, 2.0, 0.0, 2.0, 0.0]])


# ---------------------------------------------------------------- gae

def test_gae_by_hand():
    # one prompt position, three action tokens, one padding position
    rewards = torch.tensor([[PAD, 0.2, 0.0, 1.0, PAD]])
    values = torch.tensor([[PAD, 0.5, 0.6, 0.7, PAD]])
    mask = torch.tensor([[0.0, 1.0, 1.0, 1.0, 0.0]])
    adv, ret = run("gae", rewards, mask, [0], values, gamma=0.9, lam=0.8)
    # gamma*lam = 0.72
    # t3: delta = 1.0 + 0.9*0 - 0.7 = 0.3;       A = 0.3
    # t2: delta = 0.0 + 0.9*0.7 - 0.6 = 0.03;    A = 0.03 + 0.72*0.3 = 0.246
    # t1: delta = 0.2 + 0.9*0.6 - 0.5 = 0.24;    A = 0.24 + 0.72*0.246 = 0.41712
    close(adv, [[0.0, 0.41712, 0.246, 0.3, 0.0]])
    close(ret, [[0.0, 0.41712 + 0.5, 0.246 + 0.6, 0.3 + 0.7, 0.0]])   # A + V


def test_gae_with_unit_gamma_lambda_and_zero_values_is_return_to_go():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, PAD]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv, ret = run("gae", rewards, mask, [0, 1], torch.zeros(2, 3), gamma=1.0, lam=1.0)
    close(adv, [[6.0, 5.0, 3.0], [9.0, 5.0, 0.0]])   # 1+2+3, 2+3, 3; 4+5, 5
    close(ret, adv)


def test_gae_needs_values():
    rewards, mask = seq_batch([1.0], [2])
    with pytest.raises(ValueError, match="values"):
        run("gae", rewards, mask, [0])


# ---------------------------------------------------------------- all estimators

@pytest.mark.parametrize("name", sorted(ADVANTAGES))
def test_zero_outside_mask_float32_and_inputs_unchanged(name):
    torch.manual_seed(0)
    rewards = torch.randn(6, 5)
    values = torch.randn(6, 5)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 1, 0, 0], [0, 1, 0, 0, 0],
                         [0, 1, 1, 1, 1], [0, 0, 1, 1, 0], [0, 1, 1, 1, 0]], dtype=torch.bool)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    before = (rewards.clone(), values.clone(), mask.clone(), groups.clone())
    adv, ret = get_advantage(name)(rewards, mask, groups, values, AdvantageParams())
    assert adv.dtype == ret.dtype == torch.float32
    assert torch.all(adv[~mask] == 0) and torch.all(ret[~mask] == 0)
    assert bool(torch.isfinite(adv).all())
    for a, b in zip(before, (rewards, values, mask, groups)):
        assert torch.equal(a, b)
