"""The controller's end of the weight sync: open the channel once, push the policy into the engines each step.

Every wait is bounded by ``train.timeout_s`` and names whoever did not finish (a learner rank or an engine).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from rlhf_ray.controller.worker_group import wait_named

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import SyncSettings
    from rlhf_ray.controller.roles import LearnerRole, RolloutRole
    from rlhf_ray.controller.worker_group import Who


class SyncChannel:
    """Policy group -> engines, over the backend ``config.resolve`` chose (gloo, nccl or CUDA ipc)."""

    def __init__(self, policy: "LearnerRole", rollout: "RolloutRole", settings: "SyncSettings", timeout_s: float):
        self.policy, self.rollout, self.settings, self.timeout_s = policy, rollout, settings, timeout_s
        self.buckets = 0

    def _engines_who(self) -> list["Who"]:
        return [self.rollout.group.who(i) for i in range(self.rollout.num_engines)]

    def open(self) -> dict[str, Any]:
        """Agree on the plan with the policy group and join every engine worker to the sync group."""
        from rlhf_ray.workers.learner import LearnerWorker

        s, policy, engines = self.settings, self.policy, self.rollout.group.actors
        plans = policy.group.call_all(LearnerWorker.weight_sync_plan, s.dtype, s.bucket_mb)
        self.buckets = len(plans[0])
        if s.backend == "ipc":
            if policy.world != len(engines):
                raise ValueError(f"CUDA IPC weight sync pairs each learner rank with the engine on its GPU: "
                                 f"{policy.world} learner ranks but {len(engines)} engines")
            return {"backend": s.backend, "buckets": self.buckets}
        host, port = policy.group.call_rank0(LearnerWorker.rendezvous)
        world = 1 + len(engines) * s.tensor_parallel_size
        refs = [policy.group.actors[0].init_weight_sync.remote(host, port, world, s.backend, self.timeout_s)]
        refs += [engine.init_weight_sync.remote(host, port, 1 + e * s.tensor_parallel_size, world, s.backend,
                                                self.timeout_s, plans[0]) for e, engine in enumerate(engines)]
        # All ranks must join at once (a rendezvous); a missing one is named when the wait times out.
        wait_named(refs, [policy.group.who(0)] + self._engines_who(), "weight_sync.init", self.timeout_s)
        return {"backend": s.backend, "buckets": self.buckets, "world": world}

    def push(self) -> dict[str, float]:
        """The policy's current weights into every engine; returns seconds and bytes."""
        from rlhf_ray.workers.learner import LearnerWorker

        t0 = time.perf_counter()
        policy, engines = self.policy, self.rollout.group.actors
        if self.settings.backend == "ipc":
            sent = policy.group.call_split(LearnerWorker.send_weights_ipc, list(engines), self.timeout_s)
            refs = [e.finish_ipc_sync.remote() for e in engines]
            wait_named(refs, self._engines_who(), "weight_sync.finish", self.timeout_s)
        else:
            send = policy.group.async_all(LearnerWorker.send_weights)
            recv = [e.receive_weights.remote(self.timeout_s) for e in engines]
            names = [policy.group.who(r) for r in range(policy.world)] + self._engines_who()
            # One bounded wait over senders and receivers: a stall names whoever did not finish.
            sent = wait_named(send + recv, names, "weight_sync", self.timeout_s)[: policy.world]
        return {"seconds": time.perf_counter() - t0, "bytes": sum(r["bytes"] for r in sent)}
