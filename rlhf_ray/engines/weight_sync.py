"""Full, HF-named weights out of a (possibly ZeRO-3 sharded, possibly LoRA-wrapped) learner model.

``iter_named_params_for_sync`` is the one producer used by both checkpoint export and the weight sync
into vLLM: it walks the model once, groups parameters into buckets of about ``bucket_bytes``,
gathers each bucket (ZeRO-3: one collective per bucket, every rank must iterate), and yields
``(hf_name, tensor)`` with LoRA deltas merged (``W + B @ A * scaling``, through peft's own
``get_delta_weight``) and peft's wrapper names removed, so the names are those of the plain
transformers checkpoint that vLLM's ``load_weights`` and ``from_pretrained`` expect.
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


def _hf_model(module: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (or the module itself)."""
    if hasattr(module, "get_base_model"):
        return module.get_base_model()
    return module


def sync_entries(module: torch.nn.Module) -> list[_Entry]:
    """The tensors to export, in module order, with peft wrappers resolved to plain HF names."""
    from peft.tuners.lora import LoraLayer

    try:
        from peft.utils.other import ModulesToSaveWrapper
    except ImportError:  # pragma: no cover - older peft
        ModulesToSaveWrapper = ()  # type: ignore[assignment]

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
                tensor = e.param.data
                if e.lora_layer is not None:
                    tensor = tensor.clone()
                    for adapter in e.adapters:
                        tensor += e.lora_layer.get_delta_weight(adapter).to(tensor.dtype)
                yield e.name, tensor


def param_metadata(module: torch.nn.Module) -> list[tuple[str, tuple[int, ...], str]]:
    """``(hf_name, shape, dtype name)`` of every exported tensor, in sync order (no gathering needed)."""
    out = []
    for e in sync_entries(module):
        shape = tuple(getattr(e.param, "ds_shape", e.param.shape))
        out.append((e.name, tuple(int(s) for s in shape), str(e.param.dtype).replace("torch.", "")))
    return out
