"""The vLLM side of the weight sync: methods injected into every vLLM worker process (``LLM(worker_extension_cls=...)``).

The rollout engine reaches them with ``llm.collective_rpc("rlhf_...")``; they run where the model's
weights live, so received tensors go straight into the model. Kept free of Ray and of our config so
that vLLM's workers import nothing else of ours.

Loading: on CPU, vLLM repacks linear weights for oneDNN after loading and drops the originals, so a
bare ``model.load_weights`` would write into emptied parameters; there the worker's
``model_runner.reload_weights(weights_iterator=...)`` re-runs that per-layer processing. On GPU an
unquantized model keeps its checkpoint layout, so ``model.load_weights`` copies straight into the
live parameters (the path RLHF frameworks have used on every vLLM GPU release; it keeps CUDA-graph
pointers valid and skips the layer-by-layer re-materialisation that 0.26's ``reload_weights`` does).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Iterable

import torch


class WeightSyncExtension:
    """Weight-sync endpoints of one vLLM worker (one tensor-parallel rank of one engine)."""

    def rlhf_init_sync_group(self, host: str, port: int, rank_offset: int, world_size: int, backend: str,
                             timeout_s: float, plan_buckets: list) -> dict[str, Any]:
        """Join the weight-sync group as rank ``rank_offset + tp_rank`` and remember the sync plan."""
        from rlhf_ray.weight_sync.plan import SyncPlan
        from rlhf_ray.weight_sync.transport import SyncGroup

        rank = rank_offset + self._rlhf_tp_rank()
        self._rlhf_group = SyncGroup(host, port, rank, world_size, backend, timeout_s, self._rlhf_device())
        self._rlhf_plan = SyncPlan([[(n, tuple(s), d) for n, s, d in b] for b in plan_buckets])
        return {"rank": rank, "device": str(self._rlhf_device())}

    def rlhf_receive_weights(self) -> dict[str, float]:
        """Receive one full set of weights over the sync group and load them into the model."""
        from rlhf_ray.weight_sync.transport import receive_weights

        t0 = time.perf_counter()
        self._rlhf_load(receive_weights(self._rlhf_group, self._rlhf_plan))
        self._rlhf_synchronize()
        return {"seconds": time.perf_counter() - t0, "bytes": float(self._rlhf_plan.num_bytes)}

    def rlhf_load_ipc(self, names: list[str], shapes: list[list[int]], handle: bytes) -> int:
        """Colocated GPU sync: load tensors that are views into a learner's flat CUDA buffer.

        ``handle`` is ``pickle.dumps(torch.multiprocessing.reductions.reduce_tensor(buffer))``, sent as
        bytes because collective_rpc's serializer does not carry functions.
        """
        from rlhf_ray.weight_sync.transport import unpack_ipc

        out = unpack_ipc(names, shapes, handle)
        self._rlhf_load(iter(out))
        self._rlhf_synchronize()
        return len(out)

    # ---- helpers --------------------------------------------------------------------------------
    def _rlhf_load(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        runner = self.model_runner
        reload = getattr(runner, "reload_weights", None)
        if (not torch.cuda.is_available() and reload is not None
                and "weights_iterator" in inspect.signature(reload).parameters):
            reload(weights_iterator=weights)
        else:
            self._rlhf_model().load_weights(weights=weights)

    def _rlhf_model(self) -> torch.nn.Module:
        # GPU runners may wrap the model for CUDA graphs; get_model() unwraps it.
        runner = self.model_runner
        return runner.get_model() if hasattr(runner, "get_model") else runner.model

    def _rlhf_tp_rank(self) -> int:
        from vllm.distributed import get_tensor_model_parallel_rank

        return int(get_tensor_model_parallel_rank())

    def _rlhf_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def _rlhf_synchronize(self) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
