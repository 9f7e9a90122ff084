"""End-to-end fixtures shared across files: a reward model trained once by the real ``rm`` job."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def trained_rm(ray_cluster, tiny_model_dir, tmp_path_factory):
    """(config, result, output dir) of a 120-step ``job: rm`` run on the demo preference set.

    test_preference checks what it learned and exported; test_rl's PPO run uses its export as the reward model.
    """
    from rlhf_ray.jobs import get_job
    from tests.e2e.test_preference import pref_config

    out = tmp_path_factory.mktemp("trained_rm") / "rm"
    cfg = pref_config("rm", tiny_model_dir, out, **{
        "train.max_steps": 120, "train.eval_every": 40, "optim.min_lr_ratio": 0.1})
    return cfg, get_job("rm").run(cfg), out
