"""The RL step's metrics: the off-policy correction's sums from the learner ranks become ``actor/importance_*``."""

from __future__ import annotations

import pytest
import torch

from rlhf_ray.algos.off_policy import OffPolicyParams, get_off_policy_correction
from rlhf_ray.controller.rl_metrics import policy_metrics
from rlhf_ray.controller.roles import merge_rank_metrics
from rlhf_ray.objectives.rl import importance_metric_sums
from rlhf_ray.types import RolloutBatch

# Three sequences, action tokens only where the mask is 1. d = old - rollout:
#   row 0: token ratios [3, 0.4, 1]      -> sequence ratio 1.2
#   row 1: token ratios [1, 1.2, 1.25]   -> 1.5
#   row 2: token ratios [0.5, 1]         -> 0.5   (its third position is padding with d = ln 4: never counted)
RATIOS = torch.tensor([[3.0, 0.4, 1.0], [1.0, 1.2, 1.25], [0.5, 1.0, 4.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
ROLLOUT = torch.full((3, 3), -1.0)
OLD = ROLLOUT + torch.log(RATIOS)


def _batch(with_old: bool) -> RolloutBatch:
    return RolloutBatch(input_ids=torch.zeros(3, 4, dtype=torch.long), attention_mask=torch.ones(3, 4),
                        action_mask=MASK, group_index=torch.tensor([0, 0, 0]), rollout_logprobs=ROLLOUT,
                        old_logprobs=OLD if with_old else None, advantages=torch.zeros(3, 3))


def _actor_step(name: str, params: OffPolicyParams, old_from_update: bool) -> dict:
    """One optimizer step of two learner ranks (rows 0-1 and row 2), merged as the policy role merges them."""
    ranks = []
    for rows in (slice(0, 2), slice(2, 3)):
        w = get_off_policy_correction(name)(OLD[rows], ROLLOUT[rows], MASK[rows], params)
        tokens = float(MASK[rows].sum())
        rank = {"pg_loss_sum": 0.0, "clipped_sum": 0.0, "entropy_sum": 0.0, "approx_kl_sum": 0.0,
                "action_tokens": tokens, "grad_norm": 1.0, "lr": 1e-5, "skipped_updates": 0.0, "seconds": 1.0,
                **importance_metric_sums(w)}
        if old_from_update:
            rank["old_rollout_absdiff_sum"] = 0.0
        ranks.append(rank)
    return merge_rank_metrics(ranks)


def test_token_level_correction_metrics():
    m = policy_metrics(_batch(with_old=True), None, [_actor_step("token_tis", OffPolicyParams(cap=2.0), False)], False)
    # 8 action tokens, ratios 3 + 0.4 + 1 + 1 + 1.2 + 1.25 + 0.5 + 1 = 9.35; capped: only 3 (> 2)
    assert m["actor/importance_ratio_mean"] == pytest.approx(9.35 / 8, abs=1e-6)
    assert m["actor/importance_capped_fraction"] == pytest.approx(1 / 8, abs=1e-6)
    assert m["actor/importance_masked_fraction"] == 0.0
    assert m["actor/importance_ratio_max"] == pytest.approx(3.0, abs=1e-6)   # the padding's 4 is not an action token


def test_icepop_reports_the_masked_fraction():
    m = policy_metrics(_batch(with_old=True), None,
                       [_actor_step("icepop", OffPolicyParams(low=0.5, high=2.0), False)], False)
    # outside [0.5, 2]: 3 and 0.4 (0.5 is on the edge, kept) -> 2 of 8
    assert m["actor/importance_masked_fraction"] == pytest.approx(2 / 8, abs=1e-6)
    assert m["actor/importance_capped_fraction"] == 0.0


def test_sequence_level_correction_metrics_count_sequences():
    steps = [_actor_step("seq_mask", OffPolicyParams(low=0.6, high=1.3), False)] * 2  # two optimizer steps
    m = policy_metrics(_batch(with_old=True), None, steps, False)
    # sequence ratios 1.2, 1.5, 0.5 (the same in both steps): mean 3.2 / 3; 1.5 > 1.3 and 0.5 < 0.6 masked: 2 of 3
    assert m["actor/importance_ratio_mean"] == pytest.approx(3.2 / 3, abs=1e-6)
    assert m["actor/importance_masked_fraction"] == pytest.approx(2 / 3, abs=1e-6)
    assert m["actor/importance_ratio_max"] == pytest.approx(1.5, abs=1e-6)   # the sequence's ratio, not a token's 3
    m = policy_metrics(_batch(with_old=True), None, [_actor_step("seq_tis", OffPolicyParams(cap=1.4), False)], False)
    assert m["actor/importance_capped_fraction"] == pytest.approx(1 / 3, abs=1e-6)   # only 1.5 > 1.4


def test_with_pi_old_from_the_update_the_max_comes_from_the_learners():
    """pi_old exists only inside the update: the max is the learners' ``_max`` key, folded by max across ranks
    (rank 0 saw 3, rank 1 saw 1: a sum would say 4)."""
    m = policy_metrics(_batch(with_old=False), None, [_actor_step("token_tis", OffPolicyParams(), True)], True)
    assert m["actor/importance_ratio_mean"] == pytest.approx(9.35 / 8, abs=1e-6)
    assert m["actor/importance_ratio_max"] == pytest.approx(3.0, abs=1e-6)


def test_accumulate_adds_sums_and_keeps_the_largest_max():
    from rlhf_ray.metrics import accumulate

    sums: dict[str, float] = {}
    for micro_batch in ({"loss_sum": 1.0, "ratio_max": 2.0}, {"loss_sum": 0.5, "ratio_max": 1.5}):
        accumulate(sums, micro_batch)
    assert sums == {"loss_sum": 1.5, "ratio_max": 2.0}


def test_without_a_correction_no_importance_metrics():
    step = _actor_step("none", OffPolicyParams(), False)
    step = {k: v for k, v in step.items() if not k.startswith("importance_")}   # PolicyLoss with correction None
    m = policy_metrics(_batch(with_old=True), None, [step], False)
    assert not any(k.startswith("actor/importance") for k in m)
