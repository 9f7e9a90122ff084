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
