"""The rollout Ray actor: one vLLM engine (``RolloutEngine``) per actor, driven by ``RolloutGroup``."""

from __future__ import annotations

import os
from typing import Any, Optional

from rlhf_ray.config.schema import RolloutConfig


class RolloutWorker:
    """One vLLM engine. Built in ``setup`` (not ``__init__``) so a failing start reaches the caller as an error."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.engine = None

    def setup(self, model_path: str, cfg: RolloutConfig, dtype: str, seed: int, max_model_len: int,
              tokenizer_path: Optional[str], trust_remote_code: bool, sleep_mode: bool) -> dict[str, Any]:
        from rlhf_ray.engines.rollout_engine import RolloutEngine
        from rlhf_ray.workers.learner import _gpu_ids, node_address, node_id

        self.engine = RolloutEngine(model_path, cfg, dtype, seed + self.rank, max_model_len, tokenizer_path,
                                    trust_remote_code, sleep_mode)
        return {"rank": self.rank, "node": node_address(), "node_id": node_id(), "gpu_ids": _gpu_ids(),
                "pid": os.getpid(), "start_s": self.engine.start_seconds,
                "device": "cuda" if self.engine.on_gpu else "cpu", "dtype": self.engine.dtype}

    def generate(self, prompt_ids: list[list[int]], spec):
        return self.engine.generate(prompt_ids, spec)

    def sequence_logprobs(self, sequences: list[list[int]]):
        return self.engine.sequence_logprobs(sequences)

    def init_weight_sync(self, *args: Any) -> list[dict]:
        return self.engine.init_weight_sync(*args)

    def receive_weights(self, timeout_s: float) -> dict[str, float]:
        return self.engine.receive_weights(timeout_s)

    def load_ipc(self, names, shapes, handle, timeout_s: float) -> int:
        return self.engine.load_ipc(names, shapes, handle, timeout_s)

    def finish_ipc_sync(self) -> None:
        self.engine.finish_ipc_sync()

    def weight_checksum(self) -> float:
        return self.engine.weight_checksum()

    def sleep(self) -> float:
        return self.engine.sleep()

    def wake_up(self, tags: Optional[list[str]] = None) -> float:
        return self.engine.wake_up(tags)

    def node_ip(self) -> str:
        from rlhf_ray.workers.learner import node_address

        return node_address()
