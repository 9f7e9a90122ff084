"""Build the learner groups that jobs use: rendezvous, process group, DeepSpeed engine on every rank."""

from __future__ import annotations

import logging
from typing import Sequence

from rlhf_ray.config.schema import LearnerConfig, ModelConfig, OptimConfig
from rlhf_ray.controller.worker_group import GroupSpec, WorkerGroup

log = logging.getLogger(__name__)


def learner_env(gpus: float) -> dict[str, str]:
    """Environment for learner actors: DeepSpeed must not probe for CUDA on CPU-only actors."""
    return {} if gpus > 0 else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


def start_learner_group(name: str, model: ModelConfig, optim: OptimConfig, learner: LearnerConfig,
                        total_steps: int, head: str, trainable: bool, seed: int, timeout_s: float,
                        placement_group, bundle_indices: Sequence[int], gpu_share: float = 1.0) -> WorkerGroup:
    """Create ``learner.num_workers`` LearnerWorker actors and set each up as one DeepSpeed rank."""
    from rlhf_ray.workers.learner import LearnerWorker

    gpus = learner.gpus_per_worker * gpu_share
    spec = GroupSpec(name=name, actor_cls=LearnerWorker, num_workers=learner.num_workers,
                     num_gpus=gpus, num_cpus=learner.cpus_per_worker,
                     env_vars=learner_env(learner.gpus_per_worker))
    group = WorkerGroup(spec, placement_group, bundle_indices, timeout_s)
    master = group.call_rank0("rendezvous")
    facts = group.call_all("setup", master, model, optim, learner, total_steps, head, trainable, seed, timeout_s)
    f0 = facts[0]
    log.info("%s: %d ranks on %s (%s), %.2fM params (%.2fM trainable)", name, len(facts),
             sorted({f["node"] for f in facts}), f0["backend"], f0["params"] / 1e6, f0["trainable_params"] / 1e6)
    group.facts = facts
    return group
