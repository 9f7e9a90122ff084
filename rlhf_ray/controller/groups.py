"""Start the actor groups jobs use: DeepSpeed learner groups and vLLM rollout groups.

``launch_*`` creates the actors and starts their (slow) setup without waiting, so a job can start every
role at once; ``PendingGroup.ready()`` waits for that setup, bounded, and names a rank that fails.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Optional, Sequence

from rlhf_ray.config.schema import LearnerConfig, ModelConfig, OptimConfig, RolloutConfig
from rlhf_ray.controller.worker_group import GroupSpec, WorkerGroup

log = logging.getLogger(__name__)


def learner_env(gpus: float) -> dict[str, str]:
    """Environment for learner actors: DeepSpeed must not probe for CUDA on CPU-only actors."""
    return {} if gpus > 0 else {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}


@dataclass
class PendingGroup:
    """A group whose members are still setting up."""

    group: WorkerGroup
    refs: list
    done: bool = False

    def ready(self) -> WorkerGroup:
        """Wait (bounded) for every member's setup; later calls return the group at once."""
        if self.done:
            return self.group
        facts = self.group.wait(self.refs, "setup")
        self.done = True
        self.group.facts = facts
        f0 = facts[0]
        if "params" in f0:
            log.info("%s: %d ranks on %s (%s), %.2fM params (%.2fM trainable)", self.group.name, len(facts),
                     sorted({f["node"] for f in facts}), f0["backend"], f0["params"] / 1e6,
                     f0["trainable_params"] / 1e6)
        else:
            log.info("%s: %d engines on %s, started in %.1f s", self.group.name, len(facts),
                     sorted({f["node"] for f in facts}), max(f["start_s"] for f in facts))
        return self.group


def launch_learner_group(name: str, model: ModelConfig, optim: OptimConfig, learner: LearnerConfig,
                         total_steps: int, head: str, trainable: bool, seed: int, timeout_s: float,
                         placement_group, bundle_indices: Sequence[int], gpu_share: float = 1.0) -> PendingGroup:
    """Create ``learner.num_workers`` LearnerWorker actors and start setting each up as one DeepSpeed rank."""
    from rlhf_ray.workers.learner import LearnerWorker

    gpus = learner.gpus_per_worker * gpu_share
    spec = GroupSpec(name=name, actor_cls=LearnerWorker, num_workers=learner.num_workers,
                     num_gpus=gpus, num_cpus=learner.cpus_per_worker, env_vars=learner_env(learner.gpus_per_worker))
    group = WorkerGroup(spec, placement_group, bundle_indices, timeout_s)
    master = group.call_rank0("rendezvous")
    refs = group.async_all("setup", master, model, optim, learner, total_steps, head, trainable, seed, timeout_s)
    return PendingGroup(group, refs)


def start_learner_group(*args: Any, **kwargs: Any) -> WorkerGroup:
    """``launch_learner_group(...).ready()``."""
    return launch_learner_group(*args, **kwargs).ready()


def launch_rollout_group(model_path: str, tokenizer_path: Optional[str], cfg: RolloutConfig, dtype: str, seed: int,
                         max_model_len: int, trust_remote_code: bool, sleep_mode: bool, gpus_per_engine: float,
                         cpus_per_engine: float, timeout_s: float, placement_group,
                         bundle_indices: Sequence[int]) -> PendingGroup:
    """Create ``cfg.num_engines`` RolloutWorker actors (one vLLM engine each) and start their engines."""
    from rlhf_ray.workers.rollout import RolloutWorker

    env = {} if gpus_per_engine > 0 else {"CUDA_VISIBLE_DEVICES": ""}
    spec = GroupSpec(name="rollout", actor_cls=RolloutWorker, num_workers=cfg.num_engines, num_gpus=gpus_per_engine,
                     num_cpus=cpus_per_engine, env_vars=env)
    group = WorkerGroup(spec, placement_group, bundle_indices, timeout_s)
    refs = group.async_all("setup", model_path, cfg, dtype, seed, max_model_len, tokenizer_path, trust_remote_code,
                           sleep_mode)
    return PendingGroup(group, refs)
