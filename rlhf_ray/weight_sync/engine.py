"""The rollout engine's weight-sync calls: each reaches every vLLM worker of one ``vllm.LLM`` through
``collective_rpc`` (methods of ``vllm_receiver.WeightSyncExtension``)."""

from __future__ import annotations

from typing import Any



def join_sync_group(llm: Any, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                    timeout_s: float, plan_buckets: list) -> list[dict]:
    """Every worker of ``llm`` joins the sync group as rank ``rank_offset + tp_rank``."""
    return llm.collective_rpc("rlhf_init_sync_group", timeout=timeout_s,
                              args=(host, port, rank_offset, world_size, backend, timeout_s, plan_buckets))


def receive(llm: Any, timeout_s: float) -> dict[str, float]:
    """Load one broadcast of the weights (blocks until the learner has sent everything)."""
    results = llm.collective_rpc("rlhf_receive_weights", timeout=timeout_s)
    llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
    return results[0]


def load_ipc(llm: Any, names: list[str], shapes: list[list[int]], handle: bytes, timeout_s: float) -> int:
    """Load one bucket shared through a CUDA IPC handle (hybrid placement)."""
    return llm.collective_rpc("rlhf_load_ipc", timeout=timeout_s, args=(names, shapes, handle))[0]
