"""PPO clip / dual clip / vanilla PG losses and gradients, GSPO's sequence ratio, the clipped value loss."""

import math
from typing import get_args, get_type_hints

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.aggregation import agg_loss
from rlhf_ray.algos.policy_loss import (POLICY_LOSSES, RATIO_LEVELS, get_policy_loss, get_ratio_level, ppo_clip,
                                        sequence_ratio, token_ratio, value_loss, vanilla_pg)
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



# GSPO: logp - old per position. Row 0: two action tokens and a padding position (its 5.0 must not count);
# row 1: three action tokens.
#   row 0: mean(0.1, 0.3) = 0.2    -> s_0 = e^0.2  = 1.2214028
#   row 1: mean(-0.2, 0.0, -0.1) = -0.1 -> s_1 = e^-0.1 = 0.9048374
GSPO_DIFF = torch.tensor([[0.1, 0.3, 5.0], [-0.2, 0.0, -0.1]])
GSPO_MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
S0, S1 = math.exp(0.2), math.exp(-0.1)


def _gspo_inputs():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-1.5, -0.7, -3.0]])
    return (old + GSPO_DIFF).requires_grad_(True), old


def test_sequence_ratio_is_the_geometric_mean_on_every_token():
    logp, old = _gspo_inputs()
    ratio = torch.exp(sequence_ratio(logp, old, GSPO_MASK) - old)
    close(ratio, [[S0, S0, S0], [S1, S1, S1]])   # padding included: the row's ratio, harmless under the mask
    close(torch.exp(token_ratio(logp, old, GSPO_MASK) - old), torch.exp(GSPO_DIFF))   # token level: e^diff each
    # d ratio_{b,t} / d logp_{b,t} = s_b (each token's own log-prob only; the sequence mean is stop-gradient)
    ratio.sum().backward()
    close(logp.grad, [[S0, S0, S0], [S1, S1, S1]])


def test_gspo_loss_and_gradient_match_the_sequence_objective():
    """ppo_clip on the rewritten log-probs, aggregated seq_mean_token_mean, is GSPO's
    -1/G sum_b min(s_b A_b, clip(s_b) A_b), and its gradient is s_b A_b / |y_b| per token of an unclipped row."""
    logp, old = _gspo_inputs()
    adv = torch.tensor([[1.0, 1.0, 1.0], [-1.0, -1.0, -1.0]])
    loss_mat, clipped = ppo_clip(sequence_ratio(logp, old, GSPO_MASK), old, adv, 0.2, 0.2, None)
    # row 0: A = 1, s_0 = 1.2214 > 1.2 -> clipped, -1.2 on each token; row 1: A = -1, s_1 inside -> 0.9048374
    close(loss_mat * GSPO_MASK, [[-1.2, -1.2, 0.0], [S1, S1, S1]])
    close(clipped * GSPO_MASK, [[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]])   # a sequence is clipped as a whole
    loss = agg_loss(loss_mat, GSPO_MASK, "seq_mean_token_mean", num_tokens=5, num_seqs=2, horizon=3)
    close(loss, (-1.2 + S1) / 2)                                      # = -0.1475813
    loss.backward()
    # row 0 clipped: no gradient; row 1: -A * s_1 / (|y_1| = 3) / (G = 2) = 0.9048374 / 6 = 0.1508062 per token
    close(logp.grad, [[0.0, 0.0, 0.0], [S1 / 6, S1 / 6, S1 / 6]])
    # The token-level ratio would give row 1 different weights per token (e^-0.2, 1, e^-0.1 over 6) and leave
    # row 0 unclipped for its first token (e^0.1 < 1.2): the level changes the update.
    logp.grad = None
    _, token_clipped = ppo_clip(token_ratio(logp, old, GSPO_MASK), old, adv, 0.2, 0.2, None)
    close(token_clipped * GSPO_MASK, [[0.0, 1.0, 0.0], [0.0, 0.0, 0.0]])   # e^0.3 = 1.35 > 1.2 only


def test_ratio_level_registry():
    assert set(RATIO_LEVELS) == set(get_args(get_type_hints(AlgoConfig)["ratio_level"]))
    assert get_ratio_level("sequence") is sequence_ratio
    with pytest.raises(ValueError, match="token, sequence"):
        get_ratio_level("group")
