"""DAPO's overlong penalty: the pure function, and the reward scorer adding it in the training jobs only."""

from __future__ import annotations

import pytest
import torch
from torch.testing import assert_close

from rlhf_ray.algos.reward_shaping import overlong_penalty
from rlhf_ray.config import ConfigError, load_config, resolve
from rlhf_ray.config.schema import DataConfig, RewardConfig
from rlhf_ray.controller.reward_scoring import RewardScorer
from rlhf_ray.types import RolloutBatch


def close(actual, expected):
    assert_close(actual, torch.as_tensor(expected, dtype=torch.float32), atol=1e-6, rtol=0)


def test_overlong_penalty_values():
    # L_max = 10, buffer 4: free up to 10 - 4 = 6 tokens, then -(L - 6) / 4, -1 from 10 on; scaled by the penalty
    lengths = torch.tensor([0, 5, 6, 7, 8, 9, 10, 12])
    close(overlong_penalty(lengths, max_len=10, buffer=4, penalty=1.0),
          [0.0, 0.0, 0.0, -0.25, -0.5, -0.75, -1.0, -1.0])
    close(overlong_penalty(lengths, max_len=10, buffer=4, penalty=0.5),
          [0.0, 0.0, 0.0, -0.125, -0.25, -0.375, -0.5, -0.5])
    # buffer = L_max: the penalty grows from the first token, -L / L_max
    close(overlong_penalty(torch.tensor([0, 1, 4]), max_len=4, buffer=4, penalty=1.0), [0.0, -0.25, -1.0])


def _batch(response_lengths: list[int], responses: list[str], answers: list[str]) -> RolloutBatch:
    batch = RolloutBatch.from_generations([[1, 2]] * len(response_lengths), [[3] * n for n in response_lengths],
                                          [[-0.1] * n for n in response_lengths], list(range(len(responses))), 0)
    batch.responses, batch.prompts, batch.row_fields = responses, ["q"] * len(responses), {"answer": answers}
    return batch


def test_scorer_adds_the_penalty_to_the_rewards_and_logs_its_mean():
    cfg = RewardConfig(functions=["builtin:math"], overlong_penalty=1.0, overlong_buffer=4)
    batch = _batch([3, 8, 10], ["7", "7", "3"], ["7", "7", "7"])   # math: 1, 1, 0
    rewards, metrics = RewardScorer(cfg, DataConfig(), overlong_max_len=10).finish(batch, None, batch.prompts,
                                                                                  batch.row_fields)
    # lengths 3, 8, 10 with L_max 10, buffer 4: penalties 0, -0.5, -1
    close(rewards, [1.0, 0.5, -1.0])
    assert metrics["reward/math_mean"] == pytest.approx(2 / 3, abs=1e-6)
    assert metrics["reward/overlong_penalty_mean"] == pytest.approx(-0.5, abs=1e-6)   # (0 - 0.5 - 1) / 3
    rewards, metrics = RewardScorer(cfg, DataConfig()).finish(batch, None, batch.prompts, batch.row_fields)
    close(rewards, [1.0, 1.0, 0.0])   # no overlong_max_len: unshaped
    assert "reward/overlong_penalty_mean" not in metrics


BASE = {"model.path": "m", "reward.functions": ["builtin:math"], "learner.micro_batch_size": 2,
        "rollout.n_samples": 4, "algo.prompts_per_step": 2, "rollout.max_new_tokens": 64,
        "reward.overlong_penalty": 1.0, "reward.overlong_buffer": 16}


@pytest.mark.parametrize("job, max_len", [("grpo", 64), ("ppo", 64), ("online_dpo", 64), ("eval", None),
                                          ("best_of_n", None)])
def test_only_the_training_jobs_shape_their_rewards(job, max_len):
    resolved = resolve(load_config(values={**BASE, "job": job}))
    assert RewardScorer.from_resolved(resolved, None, None).overlong_max_len == max_len


@pytest.mark.parametrize("over, message", [
    ({"reward.overlong_buffer": None}, "reward.overlong_buffer: overlong_penalty > 0 needs the buffer length"),
    ({"reward.overlong_buffer": 0}, "reward.overlong_buffer: must be >= 1 token, got 0"),
    ({"reward.overlong_penalty": -1.0}, "reward.overlong_penalty: must be >= 0 (0: off), got -1.0"),
    ({"reward.overlong_buffer": 65}, "reward.overlong_buffer: 65 tokens is more than the rollout.max_new_tokens=64"),
])
def test_overlong_config_errors_name_the_key(over, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(values={**BASE, "job": "grpo", **over})
