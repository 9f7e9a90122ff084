"""The learner Ray actor: a thin shell around ``LearnerEngine`` (one per GPU / CPU process).

Each method is a fan-out target of ``WorkerGroup``; objectives are looked up by name in
``rlhf_ray.engines.objectives`` so no code travels as pickled closures.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from rlhf_ray.config.schema import LearnerConfig, ModelConfig, OptimConfig


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

    def setup(self, master: tuple[str, int], model_cfg: ModelConfig, optim_cfg: OptimConfig,
              learner_cfg: LearnerConfig, total_steps: int, head: str, trainable: bool, seed: int,
              timeout_s: float) -> dict[str, Any]:
        """Join the process group and build the engine; returns device facts for the plan printout."""
        import torch

        from rlhf_ray.engines.learner import LearnerEngine, init_distributed

        cpus = max(1, int(learner_cfg.cpus_per_worker))
        torch.set_num_threads(cpus)
        backend = init_distributed(self.rank, self.world_size, master[0], master[1], timeout_s)
        torch.manual_seed(seed)
        self.engine = LearnerEngine(model_cfg, optim_cfg, learner_cfg, total_steps, head=head, trainable=trainable)
        n_params = sum(p.numel() for p in self.engine.module.parameters())
        n_train = sum(p.numel() for p in self.engine.module.parameters() if p.requires_grad)
        return {"rank": self.rank, "node": node_address(), "node_id": node_id(), "backend": backend,
                "device": str(self.engine.device), "params": n_params, "trainable_params": n_train,
                "pid": os.getpid(), "gpu_ids": _gpu_ids()}

    def calibrate(self) -> dict:
        """Measure this actor's device (matmul rate, memory and host<->device bandwidth) for the efficiency report."""
        from rlhf_ray.efficiency import calibrate_here

        return calibrate_here(dtype=str(self.engine.dtype).replace("torch.", ""))

    def train_step(self, micro_batches: list[dict], objective: str, objective_kwargs: dict | None = None) -> dict:
        """One optimizer step on this rank's micro-batches with the named objective."""
        from rlhf_ray.engines.objectives import get_objective

        fn = get_objective(objective)
        kwargs = objective_kwargs or {}
        return self.engine.train_step(micro_batches, lambda model, mb: fn(model, mb, **kwargs))

    def evaluate(self, micro_batches: list[dict], objective: str, objective_kwargs: dict | None = None) -> dict:
        """Sum the named objective's metrics over micro-batches without updating (held-out evaluation)."""
        import torch

        from rlhf_ray.engines.objectives import get_objective

        fn = get_objective(objective)
        sums: dict[str, float] = {}
        self.engine.engine.eval()
        with torch.no_grad():
            for mb in micro_batches:
                _, metrics = fn(self.engine.engine, self.engine.to_device(mb), **(objective_kwargs or {}))
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v)
        return sums

    def infer(self, micro_batches: list[dict], forward: str, forward_kwargs: dict | None = None) -> list:
        """The named no-grad forward (``rlhf_ray.engines.objectives.FORWARDS``) on each micro-batch, on CPU."""
        from rlhf_ray.engines.objectives import get_forward

        fn = get_forward(forward)
        kwargs = forward_kwargs or {}
        return [self.engine.forward(mb, lambda model, b: fn(model, b, **kwargs)) for mb in micro_batches]

    # ---- weight sync into the rollout engines ----------------------------------------------------
    def weight_sync_plan(self, dtype: str, bucket_mb: int) -> list:
        """The sync plan's buckets (HF names, shapes, ``dtype`` = the engines' dtype), same on every rank."""
        from rlhf_ray.engines.weight_sync import SyncPlan

        meta = [(name, shape, dtype) for name, shape, _ in self.engine.weight_metadata()]
        self._sync_plan = SyncPlan.build(meta, bucket_mb << 20)
        return self._sync_plan.buckets

    def init_weight_sync(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> dict:
        """Rank 0: join the sync group as its source (rank 0); the engines' workers join as 1..world-1."""
        from rlhf_ray.engines.weight_sync import SyncGroup

        self._sync_group = SyncGroup(host, port, 0, world_size, backend, timeout_s, self.engine.device)
        return {"rank": 0, "device": str(self.engine.device)}

    def send_weights(self) -> dict:
        """Broadcast the current weights to every engine (rank 0); other ranks take part in ZeRO-3 gathers."""
        import time

        import torch

        from rlhf_ray.engines.weight_sync import send_weights

        t0 = time.perf_counter()
        named = self.engine.named_weights()
        if self.rank != 0:
            for _ in named:  # each step of the iterator may be a collective gather
                pass
            return {"seconds": time.perf_counter() - t0, "bytes": 0.0}
        dtypes = {name: getattr(torch, d) for bucket in self._sync_plan.buckets for name, _, d in bucket}
        cast = ((name, t.to(dtypes.get(name, t.dtype))) for name, t in named)
        sent = send_weights(self._sync_group, cast, self._sync_plan)
        return {"seconds": time.perf_counter() - t0, "bytes": float(sent)}

    def send_weights_ipc(self, engine: Any, timeout_s: float) -> dict:
        """Colocated GPU sync: share each bucket with the engine on this GPU through a CUDA IPC handle."""
        import pickle
        import time

        import ray
        import torch
        from torch.multiprocessing.reductions import reduce_tensor

        t0 = time.perf_counter()
        named = self.engine.named_weights()
        sent = 0
        for bucket in self._sync_plan.buckets:
            dtype = getattr(torch, bucket[0][2])
            total = sum(_numel(s) for _, s, _ in bucket)
            flat = torch.empty(total, dtype=dtype, device=self.engine.device)
            offset = 0
            for name, shape, _ in bucket:
                got, tensor = next(named)
                if got != name:
                    raise ValueError(f"weight sync: expected '{name}', the model gave '{got}'")
                n = tensor.numel()
                flat[offset:offset + n].copy_(tensor.reshape(-1))
                offset += n
            torch.cuda.synchronize()
            handle = pickle.dumps(reduce_tensor(flat))
            ray.get(engine.load_ipc.remote([n for n, _, _ in bucket], [list(s) for _, s, _ in bucket], handle,
                                           timeout_s), timeout=timeout_s)
            sent += flat.numel() * flat.element_size()
            del flat
        for _ in named:
            pass
        return {"seconds": time.perf_counter() - t0, "bytes": float(sent)}

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

    def ping(self) -> int:
        return self.rank


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _gpu_ids() -> list:
    import ray

    try:
        return list(ray.get_gpu_ids())
    except Exception:  # outside Ray (unit use)
        return []
