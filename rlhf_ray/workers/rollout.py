"""The rollout Ray actor: one vLLM engine (``RolloutEngine``) per actor, used through ``controller.roles.RolloutRole``."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import RolloutRoleSpec


class RolloutWorker:
    """One vLLM engine. Built in ``setup`` (not ``__init__``) so a failing start reaches the caller as an error."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.engine = None

    def setup(self, spec: "RolloutRoleSpec") -> dict[str, Any]:
        """Start the engine (engine i samples with seed + i); returns where it runs."""
        from rlhf_ray.engines.rollout_engine import RolloutEngine
        from rlhf_ray.workers.learner import _gpu_ids, node_address, node_id

        self.engine = RolloutEngine(spec, spec.seed + self.rank)
        return {"rank": self.rank, "node": node_address(), "node_id": node_id(), "gpu_ids": _gpu_ids(),
                "pid": os.getpid(), "start_s": self.engine.start_seconds,
                "device": "cuda" if self.engine.on_gpu else "cpu", "dtype": self.engine.dtype}

    def generate(self, prompt_ids: list[list[int]], spec):
        return self.engine.generate(prompt_ids, spec)

    def submit(self, requests, spec) -> None:
        self.engine.submit(requests, spec)

    def poll(self, max_seconds: float):
        return self.engine.poll(max_seconds)

    def interrupt(self):
        return self.engine.interrupt()

    def sequence_logprobs(self, sequences: list[list[int]]):
        return self.engine.sequence_logprobs(sequences)

    def reseed(self, seed: int) -> None:
        """Engine i samples the next batch from seed + i."""
        self.engine.reseed(seed + self.rank)

    # ---- weight sync (rlhf_ray.weight_sync) -----------------------------------------------------
    def init_weight_sync(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                         timeout_s: float, plan_buckets: list) -> list[dict]:
        from rlhf_ray.weight_sync.engine import join_sync_group

        return join_sync_group(self.engine.llm, host, port, rank_offset, world_size, backend, timeout_s,
                               plan_buckets)

    def receive_weights(self, timeout_s: float) -> dict[str, float]:
        from rlhf_ray.weight_sync.engine import receive

        return receive(self.engine.llm, timeout_s)

    def load_ipc(self, names, shapes, handle, timeout_s: float) -> int:
        from rlhf_ray.weight_sync.engine import load_ipc

        return load_ipc(self.engine.llm, names, shapes, handle, timeout_s)

    def finish_ipc_sync(self) -> None:
        self.engine.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights

    # ---- memory (hybrid placement on GPU) -------------------------------------------------------
    def sleep(self) -> float:
        return self.engine.sleep()

    def wake_up(self, tags: Optional[list[str]] = None) -> float:
        return self.engine.wake_up(tags)
