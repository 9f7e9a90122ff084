"""The learner side of the weight sync, held by every rank of the policy's ``LearnerWorker``.

Rank 0 sends; under ZeRO-3 every rank drives the producer too (each bucket is a collective gather).
"""

from __future__ import annotations

import time
from typing import Any, Iterator, Optional

import torch

from rlhf_ray.weight_sync.plan import SyncPlan
from rlhf_ray.weight_sync.transport import SyncGroup, pack_ipc, send_weights

Named = Iterator[tuple[str, torch.Tensor]]


class WeightSender:
    """One learner rank's end: the agreed plan, and (rank 0) its place in the sync group."""

    def __init__(self, rank: int, device: torch.device):
        self.rank, self.device = rank, device
        self.plan: Optional[SyncPlan] = None
        self.group: Optional[SyncGroup] = None

    def make_plan(self, metadata: list, dtype: str, bucket_mb: int) -> SyncPlan:
        """The plan over ``metadata`` (name, shape, dtype) with every tensor cast to ``dtype`` (the engines')."""
        self.plan = SyncPlan.build([(name, shape, dtype) for name, shape, _ in metadata], bucket_mb << 20)
        return self.plan

    def join(self, host: str, port: int, world_size: int, backend: str, timeout_s: float) -> None:
        """Rank 0: join the sync group as its source; the engines' workers join as 1..world-1."""
        self.group = SyncGroup(host, port, 0, world_size, backend, timeout_s, self.device)

    def send(self, named: Named) -> dict[str, float]:
        """Broadcast ``named`` to every engine (rank 0); other ranks only drive the producer's gathers."""
        t0 = time.perf_counter()
        if self.rank != 0:
            for _ in named:
                pass
            return {"seconds": time.perf_counter() - t0, "bytes": 0.0}
        assert self.plan is not None and self.group is not None, "weight sync used before it was opened"
        dtypes = {name: getattr(torch, d) for bucket in self.plan.buckets for name, _, d in bucket}
        cast = ((name, t.to(dtypes.get(name, t.dtype))) for name, t in named)
        sent = send_weights(self.group, cast, self.plan)
        return {"seconds": time.perf_counter() - t0, "bytes": float(sent)}

    def send_ipc(self, named: Named, engine: Any, timeout_s: float) -> dict[str, float]:
        """Colocated GPU sync: share each bucket with the engine on this GPU through a CUDA IPC handle."""
        import ray

        assert self.plan is not None, "weight sync used before it was opened"
        t0 = time.perf_counter()
        sent = 0
        for bucket in self.plan.buckets:
            flat, handle = pack_ipc(bucket, named, self.device)
            ray.get(engine.load_ipc.remote([n for n, _, _ in bucket], [list(s) for _, s, _ in bucket], handle,
                                           timeout_s), timeout=timeout_s)
            sent += flat.numel() * flat.element_size()
            del flat
        for _ in named:
            pass
        return {"seconds": time.perf_counter() - t0, "bytes": float(sent)}
