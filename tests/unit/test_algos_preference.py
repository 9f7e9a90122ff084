"""Preference losses against hand-computed values (sigma(1) = 0.7310585786, sigma(3) = 0.9525741268,
log(1 + e^-x) = -log sigmoid(x)). Tolerances are tight enough that a flipped sign or a missing beta fails."""

import math

import pytest
import torch

from rlhf_ray.algos.preference import (PREFERENCE_LOSSES, bradley_terry_loss, chosen_nll, dpo_sigmoid_loss,
                                       implicit_rewards, ipo_loss, kto_loss, kto_reference_point,
                                       preference_accuracy, simpo_loss)

T = torch.tensor


def close(got, want):
    assert torch.allclose(got, T(want, dtype=got.dtype), rtol=0, atol=1e-6), (got, want)


def test_bradley_terry_with_and_without_margin():
    chosen, rejected = T([2.0, 0.5]), T([1.0, 1.5])
    # gaps 1 and -1: log(1 + e^-1) = 0.3132616875, log(1 + e^1) = 1.3132616875
    close(bradley_terry_loss(chosen, rejected), [0.3132616875, 1.3132616875])
    # margin 0.5: gaps 0.5 and -1.5: log(1 + e^-0.5) = 0.4740769842, log(1 + e^1.5) = 1.7014132779
    close(bradley_terry_loss(chosen, rejected, 0.5), [0.4740769842, 1.7014132779])
    # per-pair margins (0, 1): gaps 1 and -2: 0.3132616875, log(1 + e^2) = 2.1269280110
    close(bradley_terry_loss(chosen, rejected, T([0.0, 1.0])), [0.3132616875, 2.1269280110])


def test_bradley_terry_gradient_raises_chosen_lowers_rejected():
    chosen, rejected = T([0.0], requires_grad=True), T([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).sum().backward()
    # d/dc -log sigmoid(c - r) = -sigmoid(-(c - r)) = -0.5 at c = r
    close(chosen.grad, [-0.5])
    close(rejected.grad, [0.5])


def test_implicit_rewards_and_accuracy():
    # 0.1 x (-10 - -12) = 0.2; 0.1 x (-4 - -3) = -0.1
    close(implicit_rewards(T([-10.0, -4.0]), T([-12.0, -3.0]), 0.1), [0.2, -0.1])
    # ties count as wrong
    close(preference_accuracy(T([1.0, 2.0, 3.0]), T([0.0, 2.0, 4.0])), [1.0, 0.0, 0.0])


def test_dpo_sigmoid_and_conservative():
    c, r = T([1.0]), T([-1.0])
    # h = 0.5 x (1 - -1) = 1 -> -log sigmoid(1) = 0.3132616875
    close(dpo_sigmoid_loss(c, r, beta=0.5), [0.3132616875])
    # swapped: h = -1 -> 1.3132616875
    close(dpo_sigmoid_loss(r, c, beta=0.5), [1.3132616875])
    # eps = 0.1: 0.9 x 0.3132616875 + 0.1 x 1.3132616875 = 0.4132616875
    close(dpo_sigmoid_loss(c, r, beta=0.5, label_smoothing=0.1), [0.4132616875])


def test_dpo_gradient_signs():
    c, r = T([1.0], requires_grad=True), T([-1.0], requires_grad=True)
    dpo_sigmoid_loss(c, r, beta=0.5).sum().backward()
    # dL/dc = -beta x sigmoid(-h) = -0.5 x 0.2689414214 = -0.1344707107; dL/dr = +0.1344707107
    close(c.grad, [-0.1344707107])
    close(r.grad, [0.1344707107])


def test_ipo():
    # beta 0.25 -> target gap 1 / (2 x 0.25) = 2: (1 - 0.5 - 2)^2 = 2.25; (3 - 0 - 2)^2 = 1
    close(ipo_loss(T([1.0, 3.0]), T([0.5, 0.0]), beta=0.25), [2.25, 1.0])
    # a gap beyond the target costs again: (6 - 0 - 2)^2 = 16
    close(ipo_loss(T([6.0]), T([0.0]), beta=0.25), [16.0])


def test_simpo():
    aw, al = T([-0.5]), T([-1.5])
    # h = 2 x (-0.5 - -1.5) - 0.5 = 1.5 -> log(1 + e^-1.5) = 0.2014132779
    close(simpo_loss(aw, al, beta=2.0, gamma=0.5), [0.2014132779])
    # eps 0.2: 0.8 x 0.2014132779 + 0.2 x log(1 + e^1.5) (= 1.7014132779) = 0.5014132779
    close(simpo_loss(aw, al, beta=2.0, label_smoothing=0.2, gamma=0.5), [0.5014132779])
    # the margin gamma makes an equal pair cost more than log 2: h = -0.5 -> log(1 + e^0.5) = 0.9740769842
    close(simpo_loss(aw, aw, beta=2.0, gamma=0.5), [0.9740769842])


def test_chosen_nll_is_per_token():
    # -(-6) / 3 = 2; a zero length is clamped to 1: -(-3) / 1 = 3
    close(chosen_nll(T([-6.0, -3.0]), T([3, 0])), [2.0, 3.0])


def test_registry():
    assert set(PREFERENCE_LOSSES) == {"sigmoid", "ipo", "simpo"}
    assert PREFERENCE_LOSSES["sigmoid"].fn is dpo_sigmoid_loss and PREFERENCE_LOSSES["sigmoid"].uses_reference
    assert PREFERENCE_LOSSES["ipo"].uses_reference and not PREFERENCE_LOSSES["ipo"].length_normalized
    s = PREFERENCE_LOSSES["simpo"]
    assert not s.uses_reference and s.length_normalized
    # every entry takes the shared signature (chosen, rejected, beta, label_smoothing, gamma)
    for spec in PREFERENCE_LOSSES.values():
        assert spec.fn(T([0.0]), T([0.0]), 1.0, 0.0, 0.0).shape == (1,)


def test_kto_reference_point_is_clamped_mean_and_detached():
    kl = T([1.0, 2.0, -0.5], requires_grad=True)
    z0 = kto_reference_point(kl)
    # (1 + 2 - 0.5) / 3 = 0.8333333333
    assert z0.shape == () and not z0.requires_grad
    assert z0.item() == pytest.approx(2.5 / 3, abs=1e-7)
    # a negative mean is clamped to 0
    assert kto_reference_point(T([-1.0, -2.0])).item() == 0.0


def test_kto_loss_values_and_gradients():
    policy = T([-1.0, -3.0], requires_grad=True)
    ref = T([-2.0, -2.0])
    desirable = T([True, False])
    z0 = T(0.5, requires_grad=True)
    loss = kto_loss(policy, ref, desirable, z0, beta=2.0, desirable_weight=1.5, undesirable_weight=0.5)
    # rho = (1, -1). desirable: 1.5 x (1 - sigmoid(2 x (1 - 0.5))) = 1.5 x (1 - 0.7310585786) = 0.4034121321
    # undesirable: 0.5 x (1 - sigmoid(2 x (0.5 - -1))) = 0.5 x (1 - 0.9525741268) = 0.0237129366
    close(loss, [0.4034121321, 0.0237129366])
    loss.sum().backward()
    # d/drho: desirable -w beta s(1)(1 - s(1)) = -1.5 x 2 x 0.1966119332 = -0.5898357997 (pushes rho up);
    # undesirable +w beta s(3)(1 - s(3)) = 0.5 x 2 x 0.0451766597 = 0.0451766597 (pushes rho down)
    close(policy.grad, [-0.5898357997, 0.0451766597])
    assert z0.grad is None  # the reference point is a constant


def test_kto_at_the_reference_costs_half_the_weight():
    # rho = 0 and z0 = 0: w x (1 - sigmoid(0)) = w / 2
    loss = kto_loss(T([-5.0, -5.0]), T([-5.0, -5.0]), T([True, False]), 0.0, beta=0.1,
                    desirable_weight=1.0, undesirable_weight=3.0)
    close(loss, [0.5, 1.5])
    assert math.isclose(float(loss.sum()), 2.0, abs_tol=1e-7)
