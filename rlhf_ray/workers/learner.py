"""The learner Ray actor: a thin shell around ``LearnerEngine`` (one per GPU / CPU process).

Each method is a fan-out target of ``WorkerGroup``. What to compute travels as a typed spec from
``rlhf_ray.objectives`` (a small frozen dataclass, pickled by Ray), never as a name and a bag of kwargs.
"""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import LearnerRoleSpec
    from rlhf_ray.objectives.common import BatchTotals, Forward, Objective


def node_address() -> str:
    """This node's IP as Ray sees it (what peers on other nodes can reach)."""
    import ray

    return ray.util.get_node_ip_address()


def node_id() -> str:
    """This node's Ray id (unique even when several nodes share an IP)."""
    import ray

    return ray.get_runtime_context().get_node_id()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class LearnerWorker:
    """One rank of a DeepSpeed learner group (policy, critic, reference, reward model...)."""

    def __init__(self, rank: int, world_size: int):
        self.rank, self.world_size = rank, world_size
        self.engine = None

    def rendezvous(self) -> tuple[str, int]:
        """Rank 0's address and a free port for the group's process group."""
        return node_address(), free_port()

    def setup(self, master: tuple[str, int], spec: "LearnerRoleSpec", total_steps: int,
              timeout_s: float) -> dict[str, Any]:
        """Join the process group and build the engine; returns device facts for the plan printout."""
        import torch

        from rlhf_ray.engines.learner import LearnerEngine, init_distributed

        torch.set_num_threads(max(1, int(spec.cpus)))
        backend = init_distributed(self.rank, self.world_size, master[0], master[1], timeout_s)
        torch.manual_seed(spec.seed)
        self.engine = LearnerEngine(spec, total_steps)
        n_params = sum(p.numel() for p in self.engine.module.parameters())
        n_train = sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)
        return {"rank": self.rank, "node": node_address(), "node_id": node_id(), "backend": backend,
                "device": str(self.engine.device), "params": n_params, "trainable_params": n_train,
                "pid": os.getpid(), "gpu_ids": _gpu_ids()}

    def calibrate(self) -> dict:
        """Measure this actor's device (matmul rate, memory and host<->device bandwidth) for the efficiency report."""
        from rlhf_ray.efficiency import calibrate_here

        return calibrate_here(dtype=str(self.engine.dtype).replace("torch.", ""))

    def train_step(self, micro_batches: list[dict], objective: "Objective", totals: "BatchTotals") -> dict:
        """One optimizer step on this rank's micro-batches with ``objective`` (a spec of ``rlhf_ray.objectives``)."""
        return self.engine.train_step(micro_batches, objective, totals)

    def evaluate(self, micro_batches: list[dict], objective: "Objective", totals: "BatchTotals") -> dict:
        """``objective``'s metric sums over micro-batches without updating (held-out evaluation)."""
        return self.engine.evaluate(micro_batches, objective, totals)

    def infer(self, micro_batches: list[dict], forward: "Forward") -> list:
        """The no-grad ``forward`` spec on each micro-batch, results on CPU."""
        return [self.engine.forward(mb, forward) for mb in micro_batches]

    # ---- weight sync into the rollout engines (rlhf_ray.weight_sync) -----------------------------
    def weight_sync_plan(self, dtype: str, bucket_mb: int) -> list:
        """The sync plan's buckets (HF names, shapes, ``dtype`` = the engines' dtype), same on every rank."""
        from rlhf_ray.weight_sync.sender import WeightSender

        self._sender = WeightSender(self.rank, self.engine.device)
        return self._sender.make_plan(self.engine.weight_metadata(), dtype, bucket_mb).buckets

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> dict:
        """Rank 0: join the sync group as its source (rank 0); the engines' workers join as 1..world-1."""
        self._sender.join(host, port, world_size, backend, timeout_s)
        return {"rank": 0, "device": str(self.engine.device)}

    def send_weights(self) -> dict:
        """Broadcast the current weights to every engine (rank 0); other ranks take part in ZeRO-3 gathers."""
        return self._sender.send(self.engine.named_weights())

    def send_weights_ipc(self, engine: Any, timeout_s: float) -> dict:
        """Colocated GPU sync: share each bucket with the engine on this GPU through a CUDA IPC handle."""
        return self._sender.send_ipc(self.engine.named_weights(), engine, timeout_s)

    def offload(self) -> float:
        return self.engine.offload()

    def reload(self) -> float:
        return self.engine.reload()

    def save_state(self, directory: str, client_state: dict) -> None:
        self.engine.save_state(directory, client_state)

    def load_state(self, directory: str) -> dict:
        return self.engine.load_state(directory)

    def export_hf(self, directory: str, tokenizer_path: str | None) -> None:
        """Write the HF checkpoint (rank 0 writes; all ranks take part in ZeRO-3 gathering)."""
        tokenizer = None
        if tokenizer_path and self.rank == 0:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        self.engine.export_hf(directory, tokenizer)


def _gpu_ids() -> list:
    import ray

    try:
        return list(ray.get_gpu_ids())
    except Exception:  # outside Ray (unit use)
        return []
