"""KL estimators, KL-in-reward placement and the KL coefficient controllers."""

import math
from typing import get_args, get_type_hints

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.kl import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, kl_in_reward,
                               kl_penalty)
from rlhf_ray.config.schema import AlgoConfig


def close(actual, expected, atol=1e-6):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=atol, rtol=0)


LOGP = torch.tensor([[-1.0, -2.0, -0.5], [-0.1, -3.0, -1.0]])
REF = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -2.0, -2.0]])
# log_ratio = logp - ref = [[0.5, -1.0, 0.0], [0.1, -1.0, 1.0]]


def test_k1():
    close(kl_penalty(LOGP, REF, "k1"), [[0.5, -1.0, 0.0], [0.1, -1.0, 1.0]])


def test_k2():
    # 0.5 * lr^2: 0.5*0.25, 0.5*1, 0, 0.5*0.01, 0.5*1, 0.5*1
    close(kl_penalty(LOGP, REF, "k2"), [[0.125, 0.5, 0.0], [0.005, 0.5, 0.5]])


def test_k3():
    # exp(-lr) - 1 + lr:
    #   0.5: 0.60653066 - 0.5 = 0.10653066     -1.0: 2.71828183 - 2 = 0.71828183     0: 1 - 1 + 0 = 0
    #   0.1: 0.90483742 - 0.9 = 0.00483742      1.0: 0.36787944 - 0 = 0.36787944
    close(kl_penalty(LOGP, REF, "k3"), [[0.10653066, 0.71828183, 0.0], [0.00483742, 0.71828183, 0.36787944]])


def test_k3_nonnegative_and_clamped():
    logp = torch.linspace(-30.0, 5.0, 71).reshape(1, -1)
    k3 = kl_penalty(logp, torch.zeros_like(logp), "k3")
    assert bool((k3 >= 0).all()) and bool(torch.isfinite(k3).all())
    # log_ratio -30: exp(30) - 31 is capped at 10 (verl / OpenRLHF); so is log_ratio -3: exp(3) - 1 - 3 = 16.09
    assert k3[0, 0].item() == 10.0
    at = lambda x: k3[0, round((x + 30.0) * 2)].item()  # noqa: E731 - linspace step 0.5 from -30
    assert at(-3.0) == 10.0 and at(-2.0) == pytest.approx(math.exp(2) - 3, rel=1e-6)  # 4.389 < 10: as is
    assert at(5.0) == pytest.approx(math.exp(-5) - 1 + 5, rel=1e-6)  # positive log-ratios grow linearly


@pytest.mark.parametrize("name", ["k1", "k2", "k3"])
def test_zero_when_equal(name):
    close(kl_penalty(LOGP, LOGP.clone(), name), torch.zeros(2, 3))


def test_unknown_estimator_lists_known():
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(LOGP, REF, "k4")


def test_estimators_match_config():
    assert set(KL_ESTIMATORS) == set(get_args(get_type_hints(AlgoConfig)["kl_estimator"]))


def test_kl_in_reward_placement():
    seq_rewards = torch.tensor([1.0, 2.0, 5.0])
    kl = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.5, 0.5, 0.5, 0.5], [1.0, 1.0, 1.0, 1.0]])
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    before = (seq_rewards.clone(), kl.clone(), mask.clone())
    out = kl_in_reward(seq_rewards, kl, mask, coef=0.1)
    close(out, [[0.0, -0.02, -0.03 + 1.0, 0.0],          # -0.1*kl on action tokens, reward 1 at index 2
                [-0.05, -0.05, -0.05, -0.05 + 2.0],      # reward 2 at the last index 3
                [0.0, 0.0, 0.0, 0.0]])                   # no action token: all zero
    assert out.dtype == torch.float32
    for a, b in zip(before, (seq_rewards, kl, mask)):
        assert torch.equal(a, b)


def test_fixed_controller():
    ctl = FixedKLController(0.05)
    ctl.update(current_kl=100.0, n_steps=10)
    assert ctl.value == 0.05
    other = FixedKLController(0.0)
    other.load_state_dict(ctl.state_dict())
    assert other.value == 0.05


def test_adaptive_controller():
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=12.0, n_steps=256)   # err = clip(12/6 - 1 = 1, +-0.2) = 0.2; 0.1 * (1 + 0.2*256/1e4)
    assert ctl.value == pytest.approx(0.100512, abs=1e-12)
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10000)
    ctl.update(current_kl=3.0, n_steps=256)    # err = clip(3/6 - 1 = -0.5) = -0.2; 0.1 * (1 - 0.00512)
    assert ctl.value == pytest.approx(0.099488, abs=1e-12)
    ctl = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=1000)
    ctl.update(current_kl=6.6, n_steps=100)    # err = 0.1 (inside the clip); 0.1 * (1 + 0.1*100/1000)
    assert ctl.value == pytest.approx(0.101, abs=1e-12)
    ctl.update(current_kl=6.0, n_steps=100)    # on target: err = 0, unchanged
    assert ctl.value == pytest.approx(0.101, abs=1e-12)
    resumed = AdaptiveKLController(init_coef=0.5, target=6.0, horizon=1000)
    resumed.load_state_dict(ctl.state_dict())
    assert resumed.value == ctl.value
