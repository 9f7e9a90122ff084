"""DAPO's group filter and the prompt cursor that refills from the epoch order (hand-derived expectations)."""

from __future__ import annotations

import torch

from rlhf_ray.algos.filtering import varied_groups
from rlhf_ray.controller.loop import EpochOrder, PromptCursor, Schedule


def test_varied_groups_keeps_groups_whose_rewards_differ_in_first_seen_order():
    # group 2: [1, 0] differ -> kept; group 0: [1, 1] equal -> dropped; group 1: [0.5, 0.25] -> kept
    rewards = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.25, 0.0])
    groups = torch.tensor([2, 0, 1, 0, 1, 2])
    assert varied_groups(rewards, groups) == [2, 1]
    # a tolerance: group 1's spread is 0.25, kept at tol 0.2 and dropped at tol 0.25 (strictly greater needed)
    assert varied_groups(rewards, groups, tol=0.2) == [2, 1]
    assert varied_groups(rewards, groups, tol=0.25) == [2]


def _order(n: int = 10, per_step: int = 4) -> EpochOrder:
    # 10 items, 4 a step: 2 steps per epoch (2 items left out of each epoch, a different pair each reshuffle)
    return EpochOrder(n, Schedule(per_step, n // per_step, 6, 6), seed=7, shuffle=True)


def test_a_cursor_taking_a_step_at_a_time_gives_each_steps_batch():
    order, cursor = _order(), PromptCursor(_order())
    assert [cursor.take(4) for _ in range(5)] == [order.batch(s) for s in range(5)]
    assert cursor.taken == 20


def test_a_cursor_taking_more_moves_on_through_the_same_order_across_epochs():
    order = _order()
    cursor = PromptCursor(order)
    stream = order.batch(0) + order.batch(1) + order.batch(2) + order.batch(3)  # epochs 0 and 1
    got = cursor.take(3) + cursor.take(2) + cursor.take(6) + cursor.take(5)
    assert got == stream  # 3 + 2 + 6 + 5 = 16 = four steps' batches, in order
    # every item of epoch 0 that the epoch order uses (8 of 10) is taken exactly once
    assert sorted(got[:8]) == sorted(order.batch(0) + order.batch(1)) and len(set(got[:8])) == 8


def test_items_given_back_are_taken_again_first_then_the_order_goes_on():
    """A streaming rollout drops a stale group and gives its prompt back: the next take returns it first, and
    the order resumes where it was, so no item is lost or taken twice."""
    order = _order()
    cursor = PromptCursor(order)
    first = cursor.take(4)
    cursor.give_back([first[1]])
    assert cursor.take(3) == [first[1]] + order.batch(1)[:2]
    assert cursor.take(2) == order.batch(1)[2:] and cursor.returned == [] and cursor.taken == 8
