"""Masked reductions, whitening and the loss-aggregation modes (micro-batch shares sum to the whole)."""

import math
from typing import get_args, get_type_hints

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.aggregation import (LOSS_AGG_MODES, agg_loss, last_index, masked_mean, masked_sum,
                                        masked_whiten)
from rlhf_ray.config.schema import AlgoConfig


def close(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]], dtype=torch.bool)
    close(masked_sum(x, mask), 3.0)                  # 1 + 2
    close(masked_sum(x, mask, dim=-1), [3.0, 0.0])
    close(masked_mean(x, mask), 1.5)                 # (1 + 2) / 2
    close(masked_mean(x, mask, dim=-1), [1.5, 0.0])  # empty row -> 0, not nan


def test_masked_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    # masked mean = 2, biased var = (1 + 0 + 1) / 3 = 2/3, std = 0.8164966; 100 is ignored
    s = math.sqrt(2 / 3)
    close(masked_whiten(x, mask)[:, :3], [[-1 / s, 0.0, 1 / s]])             # [-1.2247449, 0, 1.2247449]
    close(masked_whiten(x, mask, shift_mean=False)[:, :3], [[2 - 1 / s, 2.0, 2 + 1 / s]])


def test_last_index():
    mask = torch.tensor([[0, 1, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0]])
    assert last_index(mask).tolist() == [2, -1, 2]


# rows: loss / mask -> row sum s_b, tokens n_b
LOSS = torch.tensor([[1.0, 2.0, 3.0],    # mask 1 1 1 -> s=6, n=3
                     [4.0, 5.0, 6.0],    # mask 1 1 0 -> s=9, n=2
                     [7.0, 8.0, 9.0],    # mask 1 0 0 -> s=7, n=1
                     [1.0, 1.0, 1.0]])   # mask 0 0 0 -> s=0, n=0
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
NUM_TOKENS, NUM_SEQS, HORIZON = 6, 4, 3

# mode: (share of rows 0-1, share of rows 2-3, whole batch)
EXPECTED = {
    "token_mean": (15 / 6, 7 / 6, 22 / 6),                                    # (6+9+7) / 6 tokens
    "seq_mean_token_mean": ((2 + 4.5) / 4, (7 + 0) / 4, 13.5 / 4),           # (6/3 + 9/2 + 7/1 + 0/1) / 4 seqs
    "seq_mean_token_sum": (15 / 4, 7 / 4, 22 / 4),                            # (6+9+7) / 4 seqs
    "seq_mean_token_sum_norm": (15 / 12, 7 / 12, 22 / 12),                    # (6+9+7) / (4 seqs * horizon 3)
}


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
def test_agg_loss_shares_sum_to_whole(mode):
    first, second, whole = EXPECTED[mode]
    args = dict(mode=mode, num_tokens=NUM_TOKENS, num_seqs=NUM_SEQS, horizon=HORIZON)
    share_a = agg_loss(LOSS[:2], MASK[:2], **args)
    share_b = agg_loss(LOSS[2:], MASK[2:], **args)
    close(share_a, first)
    close(share_b, second)
    close(agg_loss(LOSS, MASK, **args), whole)
    close(share_a + share_b, whole)


def test_agg_loss_accepts_bool_mask_and_keeps_grad():
    loss = LOSS.clone().requires_grad_(True)
    out = agg_loss(loss, MASK.bool(), "token_mean", NUM_TOKENS, NUM_SEQS, HORIZON)
    out.backward()
    close(loss.grad, MASK / 6)  # d/dloss of sum(loss * mask) / 6


def test_agg_loss_unknown_mode():
    with pytest.raises(ValueError, match="seq_sum_nope"):
        agg_loss(LOSS, MASK, "seq_sum_nope", NUM_TOKENS, NUM_SEQS, HORIZON)


def test_modes_match_config():
    assert set(LOSS_AGG_MODES) == set(get_args(get_type_hints(AlgoConfig)["loss_agg"]))
