"""Shared fixtures: a tiny model written once per session, and one Ray instance for tests that need it."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-init Llama-shaped tiny causal LM + char tokenizer (written once per test session)."""
    from rlhf_ray.models.tiny import make_tiny_model

    return str(make_tiny_model(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray instance for the whole session, shut down at the end."""
    import ray

    if not ray.is_initialized():
        # Logical CPUs: more than the 2 cores so learner + rollout actors can all be scheduled. Logical GPUs:
        # placement tests ask for GPUs, get Ray's GPU ids, and run on the CPU all the same.
        ray.init(num_cpus=12, num_gpus=8, include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false"}})
    yield ray
    ray.shutdown()
