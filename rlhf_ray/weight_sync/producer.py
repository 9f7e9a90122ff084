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

from rlhf_ray.weight_sync.plan import bucketize, numel


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


def _entry_bytes(e: _Entry) -> int:
    # ZeRO-3 partitioned parameters keep their full shape in ds_shape (shape is the local shard's, often empty).
    return sum(numel(getattr(p, "ds_shape", p.shape)) * p.element_size() for p in e.params)


def _quant_state(p: torch.nn.Parameter):
    """bitsandbytes' QuantState of a 4-bit weight (QLoRA base), or None for a plain parameter."""
    return getattr(p, "quant_state", None)


def _refuse_cpu_packed(entries: list[_Entry]) -> None:
    """Refuse 4-bit weights that bitsandbytes repacked for its CPU bf16 inference kernel.

    ``dequantize_4bit`` cannot read that layout (it returns scrambled weights, in bf16), and bitsandbytes'
    own inverse does not restore the fp32 block scales. ``engines.learner.load_model`` keeps the kernel
    off; this stops a model loaded some other way before anything is sent.
    """
    packed = [e.name for e in entries if getattr(_quant_state(e.param), "packing_format_for_cpu", False)]
    if packed:
        raise RuntimeError(
            f"{packed[0]} (and {len(packed) - 1} more 4-bit weights) were repacked in place by bitsandbytes' CPU "
            "bf16 inference kernel (a Linear4bit run in eval mode without gradients on an AVX512-BF16 CPU); they "
            "cannot be exported exactly. Load the model with rlhf_ray.engines.learner.load_model, or set "
            "support_avx512bf16_for_cpu = False on every bitsandbytes Linear4bit before its first forward")


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
    """The tensors to export, in module order, with peft wrappers resolved to plain HF names.

    Both ``iter_named_params_for_sync`` and ``param_metadata`` start here, so a model that cannot be exported
    exactly is refused before a plan is made or a bucket is sent.
    """
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
    _refuse_cpu_packed(entries)
    return entries


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
    for group in bucketize(sync_entries(module), _entry_bytes, bucket_bytes):
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
