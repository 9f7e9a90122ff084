"""PPO clip / dual clip / vanilla PG losses and gradients, the clipped value loss."""

import math
from typing import get_args, get_type_hints

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.policy_loss import POLICY_LOSSES, get_policy_loss, ppo_clip, value_loss, vanilla_pg
from rlhf_ray.config.schema import AlgoConfig


def close(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


# Asymmetric clip: ratio bounds [1 - 0.2, 1 + 0.28] = [0.8, 1.28]; swapping low/high would give [0.72, 1.2].
LOW, HIGH = 0.2, 0.28
#                       ratio, A  -> l1 = -A r, l2 = -A clamp(r), loss = max, clipped = l2 > l1
CASES = [(1.1, 2.0),   # inside:            l1 = -2.2,  l2 = -2.2         -> -2.2, 0
         (1.25, 2.0),  # inside (< 1.28):   l1 = -2.5,  l2 = -2.5         -> -2.5, 0
         (1.5, 2.0),   # above, A > 0:      l1 = -3.0,  l2 = -2*1.28      -> -2.56, 1
         (0.5, 2.0),   # below, A > 0:      l1 = -1.0,  l2 = -2*0.8=-1.6  -> -1.0, 0
         (0.5, -1.0),  # below, A < 0:      l1 = 0.5,   l2 = 0.8          -> 0.8, 1
         (0.75, -1.0),  # below (< 0.8):    l1 = 0.75,  l2 = 0.8          -> 0.8, 1
         (1.5, -1.0),  # above, A < 0:      l1 = 1.5,   l2 = 1.28         -> 1.5, 0
         (0.9, -1.0)]  # inside:            l1 = 0.9,   l2 = 0.9          -> 0.9, 0
EXPECTED_LOSS = [-2.2, -2.5, -2.56, -1.0, 0.8, 0.8, 1.5, 0.9]
EXPECTED_CLIPPED = [0, 0, 1, 0, 1, 1, 0, 0]


def _inputs(cases):
    ratios = torch.tensor([[r for r, _ in cases]])
    adv = torch.tensor([[a for _, a in cases]])
    old = torch.full_like(ratios, -1.0)
    return old + torch.log(ratios), old, adv   # logp - old_logp = log(ratio)


def test_ppo_clip_values():
    logp, old, adv = _inputs(CASES)
    loss, clipped = ppo_clip(logp, old, adv, LOW, HIGH, None)
    close(loss, [EXPECTED_LOSS])
    close(clipped, [EXPECTED_CLIPPED])


def test_ppo_clip_gradient():
    logp, old, adv = _inputs(CASES)
    logp = logp.clone().requires_grad_(True)
    loss, clipped = ppo_clip(logp, old, adv, LOW, HIGH, None)
    loss.sum().backward()
    # d(-A r)/d logp = -A r where unclipped; 0 where the clamped branch is active
    expected = [0.0 if c else -a * r for (r, a), c in zip(CASES, EXPECTED_CLIPPED)]
    close(logp.grad, [expected])   # [-2.2, -2.5, 0, -1.0, 0, 0, 1.5, 0.9]


def test_dual_clip():
    c = 3.0
    cases = [(5.0, -1.0),   # l1 = 5, l2 = 1.28 -> 5 > -A c = 3 -> capped at 3, clipped
             (2.0, -1.0),   # loss 2 < 3 -> 2, not clipped
             (0.5, -1.0),   # ratio clip -> 0.8 (< 3), clipped
             (5.0, 2.0)]    # A > 0: dual clip does not apply; ratio clip -> -2*1.28 = -2.56, clipped
    logp, old, adv = _inputs(cases)
    logp = logp.clone().requires_grad_(True)
    loss, clipped = ppo_clip(logp, old, adv, LOW, HIGH, c)
    close(loss, [[3.0, 2.0, 0.8, -2.56]])
    close(clipped, [[1.0, 0.0, 1.0, 1.0]])
    loss.sum().backward()
    close(logp.grad, [[0.0, 2.0, 0.0, 0.0]])   # only the unclipped token: -A r = 2
    no_dual, _ = ppo_clip(logp.detach(), old, adv, LOW, HIGH, None)
    close(no_dual, [[5.0, 2.0, 0.8, -2.56]])


def test_vanilla_pg_is_reinforce():
    logp = torch.tensor([[-0.5, -1.0, -2.0]], requires_grad=True)
    adv = torch.tensor([[2.0, -1.0, 0.5]])
    loss, clipped = vanilla_pg(logp, logp.detach(), adv, LOW, HIGH, None)
    close(loss, -adv)               # ratio = 1 -> -A
    close(clipped, torch.zeros(1, 3))
    loss.sum().backward()
    close(logp.grad, -adv)          # REINFORCE: d/dlogp = -A
    old = logp.detach() - math.log(2.0)   # ratio 2 -> loss -2A, no clipping at all
    close(vanilla_pg(logp.detach(), old, adv, LOW, HIGH, None)[0], -2.0 * adv)


def test_policy_loss_registry():
    assert set(POLICY_LOSSES) == set(get_args(get_type_hints(AlgoConfig)["policy_loss"]))
    assert get_policy_loss("ppo_clip") is ppo_clip
    with pytest.raises(ValueError, match="ppo_clip, vanilla_pg"):
        get_policy_loss("trpo")


def test_value_loss_clip():
    #              V,   old,  R  | (V-R)^2 | v_clip = old + clamp(V-old, +-0.2) | (v_clip-R)^2 | 0.5*max, clipped
    values = torch.tensor([[1.0, 1.0, 0.6, 0.0, 0.0]])
    old = torch.tensor([[0.5, 0.5, 0.5, 0.5, 0.5]])
    returns = torch.tensor([[0.9,   # 0.01 | 0.7 | 0.04 -> 0.02, 1
                             0.0,   # 1.0  | 0.7 | 0.49 -> 0.5, 0
                             1.0,   # 0.16 | 0.6 | 0.16 -> 0.08, 0
                             0.1,   # 0.01 | 0.3 | 0.04 -> 0.02, 1
                             1.0]])  # 1.0 | 0.3 | 0.49 -> 0.5, 0
    loss, clipped = value_loss(values, old, returns, clip=0.2)
    close(loss, [[0.02, 0.5, 0.08, 0.02, 0.5]])
    close(clipped, [[1.0, 0.0, 0.0, 1.0, 0.0]])
    loss, clipped = value_loss(values, old, returns, clip=None)
    close(loss, [[0.005, 0.5, 0.08, 0.005, 0.5]])   # 0.5 * (V-R)^2
    close(clipped, torch.zeros(1, 5))

