"""The reward of ``test_kl_optimum``: a function of the first response token alone, graded over three characters
(every other token, end-of-sequence included, scores 0)."""

REWARDS = {"a": 1.0, "b": 0.75, "c": 0.5}
"""Reward per response text; with ``rollout.max_new_tokens: 1`` a response is one token, and each of these
characters is one token of the tiny model's character vocabulary."""


def reward_fn(prompts: list[str], responses: list[str], **row_fields) -> list[float]:
    return [REWARDS.get(r, 0.0) for r in responses]
