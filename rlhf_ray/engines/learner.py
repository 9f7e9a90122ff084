"""One DeepSpeed learner process: model construction, ZeRO config, the optimizer step, checkpoints.

Used by every job's learner actor (policy, critic, reward model, DPO policy, ...). It knows nothing
about Ray or about the algorithm: a job hands it micro-batches and an objective (a function of the
model and one micro-batch returning a scaled loss and metrics) and gets metrics back.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import logging
import math
import os
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import torch

from rlhf_ray.metrics import accumulate
from rlhf_ray.config.schema import LearnerConfig, ModelConfig, OptimConfig
from rlhf_ray.engines.lr_schedule import lr_multiplier
from rlhf_ray.objectives.common import BatchTotals, Forward, Objective

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import Head, LearnerRoleSpec

log = logging.getLogger(__name__)


def _rank() -> int:
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _no_step(*args: Any, **kwargs: Any) -> None:
    """An optimizer's or LR scheduler's ``step`` that changes nothing (``LearnerEngine._update_dropped``)."""


def pick_device() -> torch.device:
    """CUDA when the actor was given a GPU (Ray sets CUDA_VISIBLE_DEVICES), else CPU."""
    return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")


def init_distributed(rank: int, world_size: int, master_addr: str, master_port: int, timeout_s: float) -> str:
    """Join the learner group's default process group (gloo on CPU, NCCL on GPU) through DeepSpeed."""
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    _import_deepspeed_muon_uncompiled()
    if backend == "gloo":
        # On CPU, DeepSpeed's comm backend JIT-compiles its shared-memory all-reduce kernel when the group
        # starts (~2 min on 2 cores on a fresh machine). Only DeepSpeed-Inference's tensor-parallel all-reduce
        # uses it; training collectives go through gloo either way. DeepSpeed keeps this dict for such edits.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    os.environ.update(
        MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
    )
    deepspeed.init_distributed(
        dist_backend=backend, auto_mpi_discovery=False, rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=timeout_s), verbose=False,
    )
    return backend


def _import_deepspeed_muon_uncompiled() -> None:
    """Import DeepSpeed's Muon optimizer module with its kernels left uncompiled (once per process).

    DeepSpeed 0.19 imports ``deepspeed.runtime.zero.muon`` whenever it builds a ZeRO engine (to check the
    optimizer's type) and in every ZeRO-1/2 gradient reduction; the module wraps three kernels in
    ``torch.compile`` at import, which loads TorchInductor: ~4 s of CPU in every learner process. Our
    learners never train with Muon (``optim`` builds AdamW), so the module is imported here with that
    decorator as the identity, and DeepSpeed's own imports find it loaded.
    """
    import sys

    name = "deepspeed.runtime.zero.muon.original_muon"
    if name in sys.modules:
        return
    from deepspeed.runtime import compiler

    compile_ = getattr(compiler, "compile", None)
    if compile_ is None:
        return
    compiler.compile = lambda *a, **k: (lambda fn: fn)
    try:
        import deepspeed.runtime.zero.muon.muon_optimizer  # noqa: F401 - imports original_muon
    except ImportError:  # a DeepSpeed without Muon: nothing to skip
        pass
    finally:
        compiler.compile = compile_


def deepspeed_config(learner: LearnerConfig, optim: OptimConfig, dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON config derived from our typed config (never written by hand by users)."""
    zero: dict[str, Any] = {
        "stage": learner.zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
        "reduce_bucket_size": int(5e7),
    }
    if learner.offload and learner.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if learner.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if learner.zero_stage == 3:
        zero.update(stage3_param_persistence_threshold=int(1e4), stage3_max_live_parameters=int(1e9),
                    stage3_prefetch_bucket_size=int(5e7))
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": learner.micro_batch_size,
        "gradient_accumulation_steps": learner.grad_accum_steps,
        "train_batch_size": learner.global_batch_size,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
    }
    if optim.max_grad_norm > 0:
        cfg["gradient_clipping"] = optim.max_grad_norm
    return cfg


def load_model(model_cfg: ModelConfig, head: "Head", dtype: torch.dtype, trainable: bool) -> torch.nn.Module:
    """Load a transformers model (hub name or local dir) with the requested head, LoRA applied if set."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = {
        "causal_lm": AutoModelForCausalLM,
        "sequence_score": AutoModelForSequenceClassification,
        "token_value": AutoModelForTokenClassification,
    }[head]
    kwargs: dict[str, Any] = dict(dtype=dtype, trust_remote_code=model_cfg.trust_remote_code)
    if head != "causal_lm":
        kwargs["num_labels"] = 1
    if model_cfg.attn_implementation:
        kwargs["attn_implementation"] = model_cfg.attn_implementation
    if model_cfg.lora.enabled and model_cfg.lora.load_in_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = cls.from_pretrained(model_cfg.path, **kwargs)
    if model_cfg.lora.enabled and model_cfg.lora.load_in_4bit:
        _keep_4bit_forward_exact(model)
    if head != "causal_lm" and model.config.pad_token_id is None:
        model.config.pad_token_id = model.config.eos_token_id
    if not trainable:
        model.requires_grad_(False)
        return model.eval()
    if model_cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if model_cfg.lora.enabled:
        from peft import LoraConfig as PeftLoraConfig, TaskType, get_peft_model

        task = {"causal_lm": TaskType.CAUSAL_LM, "sequence_score": TaskType.SEQ_CLS,
                "token_value": TaskType.TOKEN_CLS}[head]
        if model_cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, PeftLoraConfig(
            task_type=task, r=model_cfg.lora.rank, lora_alpha=model_cfg.lora.alpha,
            lora_dropout=model_cfg.lora.dropout, target_modules=list(model_cfg.lora.target_modules)))
    return model


def _keep_4bit_forward_exact(model: torch.nn.Module) -> None:
    """Make every bitsandbytes 4-bit layer compute with ``dequantize_4bit(weight)``, in training and in eval.

    On a CPU with AVX512-BF16, bitsandbytes (0.50 here) switches a ``Linear4bit`` to a fused bf16 kernel the
    first time it runs in eval mode without gradients, which is how ``forward`` gets reference / old
    log-probs and the log-probs a weight sync is checked against. It repacks the weight in place into that
    kernel's layout, rounds the fp32 block scales (absmax) to bf16, and from then on every forward, in
    training too, multiplies in bf16 through an op without a backward (PyTorch warns; the gradient through
    the frozen base to the adapters of earlier layers is lost). The learner's log-probs move by 4e-3 on the
    tiny test model, the producer's ``dequantize_4bit`` reads the repacked data as if it were not repacked
    and exports scrambled weights (0.87 in log-probs after a sync), and the repacking cannot be undone
    exactly (bitsandbytes' inverse is 1e-4 off: the fp32 scales are gone). With the kernel off, every
    forward dequantizes and multiplies in the compute dtype: the dense weights the producer sends
    (``weight_sync.producer``) are the weights the learner computes and trains with.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def save_hf_weights(state: dict[str, torch.Tensor], directory: str | Path, max_shard_bytes: int = 5 << 30) -> None:
    """Write ``state`` as HF safetensors shards (+ index when sharded), as ``save_pretrained`` would.

    Written directly rather than through a model's ``save_pretrained``: building even a meta model
    under an active ZeRO-3 config starts a collective that only rank 0 would join.
    """
    from huggingface_hub import split_torch_state_dict_into_shards
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, max_shard_size=max_shard_bytes)
    for filename, names in split.filename_to_tensors.items():
        save_file({n: state[n].contiguous() for n in names}, str(d / filename), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                 "weight_map": split.tensor_to_filename}
        (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


class LearnerEngine:
    """A DeepSpeed-wrapped model plus optimizer and LR schedule, stepping on given micro-batches."""

    def __init__(self, spec: "LearnerRoleSpec", total_steps: int):
        import deepspeed

        self.device = pick_device()
        self.dtype: torch.dtype = getattr(torch, spec.dtype)  # resolved (config.resolve.auto_dtype)
        learner_cfg, optim_cfg, model_cfg = spec.learner, spec.optim, spec.model
        self.learner_cfg, self.optim_cfg, self.model_cfg = learner_cfg, optim_cfg, model_cfg
        trainable, head = spec.trainable, spec.head
        self.trainable, self.head = trainable, head
        ds_config = deepspeed_config(learner_cfg, optim_cfg, self.dtype)
        if not trainable:
            # Frozen models (reference, reward) run ZeRO-3 inference only when asked; otherwise plain.
            ds_config.pop("gradient_clipping", None)
            ds_config["zero_optimization"] = {"stage": 3 if learner_cfg.zero_stage == 3 else 0}
        self._hf_ds_config = None
        if ds_config["zero_optimization"]["stage"] == 3:
            # Keeps transformers' from_pretrained partitioning the weights at load (zero.Init).
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        model = load_model(model_cfg, head, self.dtype, trainable)
        self.step = 0
        self.on_nonfinite = spec.on_nonfinite
        self.skipped_updates = 0
        """Updates dropped under ``train.on_nonfinite=skip`` since this process started."""
        if trainable:
            params = [p for p in model.parameters() if p.requires_grad]
            optimizer = self._make_optimizer(params)
            self._base_optimizer = optimizer  # what DeepSpeed's optimizer wraps; its step applies the update
            scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(
                s, total_steps, optim_cfg.warmup_steps, optim_cfg.schedule, optim_cfg.min_lr_ratio))
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        else:
            self.engine, *_ = deepspeed.initialize(model=model, config=ds_config)
            self.optimizer = self.scheduler = None
            self.engine.eval()

    def _make_optimizer(self, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
        o = self.optim_cfg
        if self.learner_cfg.offload and self.learner_cfg.zero_stage > 0:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            return DeepSpeedCPUAdam(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        return torch.optim.AdamW(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
                                 fused=self.device.type == "cuda")

    @property
    def module(self) -> torch.nn.Module:
        """The wrapped transformers (or peft) model."""
        return self.engine.module

    def to_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective,
                   totals: BatchTotals) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (its share of the global batch).

        ``objective(model, micro_batch, totals)`` returns a loss already scaled so that DeepSpeed's
        1/accumulation scaling and data-parallel averaging produce the global objective (``objectives.common``).
        A non-finite loss or gradient norm is handled as ``train.on_nonfinite`` says (``_nonfinite``); the
        result's ``skipped_updates`` is 1 when this step's update was dropped (on every rank alike), else 0.
        """
        if len(micro_batches) != self.engine.gradient_accumulation_steps():
            raise ValueError(f"train_step got {len(micro_batches)} micro-batches, DeepSpeed expects "
                             f"{self.engine.gradient_accumulation_steps()} (learner.global_batch_size / "
                             "(micro_batch_size x num_workers))")
        self.engine.train()
        t0 = time.perf_counter()
        sums: dict[str, float] = {}
        n_tokens = 0
        bad, step = False, self.step + 1
        last = len(micro_batches) - 1
        for i, mb in enumerate(micro_batches):
            mb = self.to_device(mb)
            loss, metrics = objective(self.engine, mb, totals)
            if not bad and not torch.isfinite(loss):
                bad = self._nonfinite(f"loss ({float(loss)}) on micro-batch {i}", step,
                                      "stopped before it reached the weights")
            # Even after a bad loss: the ZeRO gradient reductions run inside backward, collectives every rank joins.
            self.engine.backward(loss)
            if i < last:
                self.engine.step()  # inside the accumulation: DeepSpeed only counts the micro-batch
            accumulate(sums, metrics)
            n_tokens += int(mb["attention_mask"].sum()) if "attention_mask" in mb else 0
        own_norm = self._unchecked_grad_norm()
        if not bad and own_norm is not None and not math.isfinite(own_norm):
            bad = self._nonfinite(f"gradient norm ({own_norm})", step, "stopped before it reached the weights")
        # Every rank must take the same decision, or one would step while another does not.
        drop = self.on_nonfinite == "skip" and self._any_rank(bad)
        with self._update_dropped() if drop else contextlib.nullcontext():
            self.engine.step()  # the accumulation boundary: the optimizer step
        self.step = step
        grad_norm = self.engine.get_global_grad_norm()
        grad_norm = float(grad_norm) if grad_norm is not None else own_norm
        if not drop and grad_norm is not None and not math.isfinite(grad_norm):
            # DeepSpeed's optimizers (ZeRO 1-3, bf16 / fp16) take the global norm in their step and drop an update
            # whose norm is not finite, on every rank alike (the norm is all-reduced): it did not reach the weights.
            drop = self._nonfinite(f"gradient norm ({grad_norm})", step, "DeepSpeed dropped the update on every rank")
        if drop:
            self.skipped_updates += 1
            log.warning("optimizer step %d: update dropped on every rank (non-finite loss or gradient norm; "
                        "train.on_nonfinite=skip), %d so far", step, self.skipped_updates)
        out = {k: v for k, v in sums.items()}
        out["grad_norm"] = grad_norm if grad_norm is not None else float("nan")
        out["lr"] = float(self.scheduler.get_last_lr()[0])
        out["tokens"] = float(n_tokens)
        out["skipped_updates"] = float(drop)
        out["seconds"] = time.perf_counter() - t0
        return out

    def _nonfinite(self, what: str, step: int, outcome: str) -> bool:
        """Raise under ``train.on_nonfinite=stop`` (naming step, rank and value); under ``skip``, return True."""
        if self.on_nonfinite == "skip":
            log.warning("learner rank %d, optimizer step %d: non-finite %s", _rank(), step, what)
            return True
        raise FloatingPointError(
            f"non-finite {what} of optimizer step {step} on learner rank {_rank()}; {outcome}, and the run stops "
            "before the weights reach the rollout engines or a checkpoint (train.on_nonfinite=stop; "
            "train.on_nonfinite=skip drops such an update on every rank and goes on)")

    def _unchecked_grad_norm(self) -> Optional[float]:
        """The global gradient norm where DeepSpeed's optimizer does not check it itself, else None.

        DeepSpeed's own optimizers (ZeRO 1-3, bf16 / fp16; they expose ``overflow``) take the global norm in their
        step and drop an update whose norm is not finite. A plain torch optimizer (ZeRO-0 in fp32) does neither; its
        gradients, all-reduced by the boundary backward, are the same on every rank, so this norm is global.
        """
        if hasattr(self.engine.optimizer, "overflow"):
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` holds on any rank of this learner group (a MAX all-reduce of one number)."""
        t = torch.tensor([float(flag)], device=self.device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    @contextlib.contextmanager
    def _update_dropped(self) -> Iterator[None]:
        """Run DeepSpeed's boundary ``step`` with the optimizer's update and the LR schedule's advance as no-ops.

        DeepSpeed still does the rest of a step (gradients reduced, clipped and cleared, ZeRO's partition buffers
        reset, its step counters advanced), so the engine stays consistent; what an update would change (weights,
        Adam moments, the learning rate) stays as it was, as when DeepSpeed itself drops an overflowing fp16 step.
        Every ZeRO stage calls our optimizer's and scheduler's ``step`` by attribute, so an instance attribute
        shadows them for this one call.
        """
        objs = (self._base_optimizer, self.scheduler)
        saved = [obj.__dict__.get("step") for obj in objs]  # torch's LR scheduler already wraps optimizer.step here
        for obj in objs:
            obj.step = _no_step
        try:
            yield
        finally:
            for obj, step in zip(objs, saved):
                if step is None:
                    del obj.step
                else:
                    obj.step = step

    @torch.no_grad()
    def forward(self, batch: dict[str, torch.Tensor], fn: Forward) -> torch.Tensor:
        """Evaluate ``fn(model, batch)`` without gradients (reference log-probs, values, rewards)."""
        self.engine.eval()
        return fn(self.engine, self.to_device(batch)).float().cpu()

    @torch.no_grad()
    def evaluate(self, micro_batches: list[dict[str, torch.Tensor]], objective: Objective,
                 totals: BatchTotals) -> dict[str, float]:
        """``objective``'s metric sums over ``micro_batches`` without updating (held-out evaluation)."""
        self.engine.eval()
        sums: dict[str, float] = {}
        for mb in micro_batches:
            _, metrics = objective(self.engine, self.to_device(mb), totals)
            accumulate(sums, metrics)
        return sums

    # ---- checkpoints --------------------------------------------------------------------------
    def save_state(self, directory: str | Path, client_state: dict[str, Any]) -> None:
        """Optimizer, scheduler and model shards (DeepSpeed format) plus this rank's RNG state."""
        d = Path(directory)
        self.engine.save_checkpoint(str(d / "deepspeed"), tag="state", client_state=client_state)
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = {"python": random.getstate(), "torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        torch.save(rng, d / f"rng_rank{rank}.pt")

    def load_state(self, directory: str | Path) -> dict[str, Any]:
        """Restore what ``save_state`` wrote; returns the client state (step, data position, ...)."""
        d = Path(directory)
        _, client_state = self.engine.load_checkpoint(str(d / "deepspeed"), tag="state",
                                                      load_optimizer_states=True, load_lr_scheduler_states=True)
        if client_state is None:
            raise RuntimeError(f"checkpoint {d} has no DeepSpeed state (expected {d / 'deepspeed' / 'state'})")
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = torch.load(d / f"rng_rank{rank}.pt", weights_only=True)  # tuples, ints and tensors only
        random.setstate(rng["python"])
        torch.set_rng_state(rng["torch"])
        if rng["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(client_state.get("step", 0))
        return client_state

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full HF-named weights on rank 0 (None elsewhere); ZeRO-3 shards gathered, LoRA merged.

        Every rank must call it (ZeRO-3 gathering is collective).
        """
        from rlhf_ray.weight_sync.producer import iter_named_params_for_sync

        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        out: dict[str, torch.Tensor] = {}
        zero3 = self.engine.zero_optimization_stage() == 3
        for name, tensor in iter_named_params_for_sync(self.module, zero3=zero3,
                                                       bucket_bytes=self.learner_cfg.zero3_bucket_mb << 20):
            if rank == 0:
                out[name] = tensor.detach().to("cpu", copy=True)
        return out if rank == 0 else None

    # ---- weights out: sync into vLLM ------------------------------------------------------------
    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named weights (ZeRO-3 gathered in buckets, LoRA merged); every rank must exhaust it."""
        from rlhf_ray.weight_sync.producer import iter_named_params_for_sync

        return iter_named_params_for_sync(self.module, zero3=self.engine.zero_optimization_stage() == 3,
                                          bucket_bytes=self.learner_cfg.zero3_bucket_mb << 20)

    def weight_metadata(self) -> list[tuple[str, tuple[int, ...], str]]:
        from rlhf_ray.weight_sync.producer import param_metadata

        return param_metadata(self.module)

    # ---- memory (hybrid placement on GPU) ------------------------------------------------------
    def offload(self) -> float:
        """Move parameters, gradients and optimizer state to host memory so vLLM can use the GPU."""
        if self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        if self.optimizer is not None:
            self.engine.offload_states(non_blocking=True)
        else:
            self.engine.module.to("cpu", non_blocking=True)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        return time.perf_counter() - t0

    def reload(self) -> float:
        """Undo ``offload`` before the next forward / training pass."""
        if self.device.type != "cuda":
            return 0.0
        t0 = time.perf_counter()
        if self.optimizer is not None:
            self.engine.reload_states(non_blocking=True)
        else:
            self.engine.module.to(self.device, non_blocking=True)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def export_hf(self, directory: str | Path, tokenizer=None) -> None:
        """Write a plain transformers checkpoint (safetensors) that transformers and vLLM load as is."""
        state = self.full_state_dict()
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        if rank != 0:
            return
        base = self.module
        if hasattr(base, "get_base_model"):  # peft: the base architecture, LoRA merged into the weights
            base = base.get_base_model()
        save_hf_weights(state, directory)
        config = copy.deepcopy(base.config)
        # The class that was trained (e.g. LlamaForSequenceClassification for a reward model loaded from a
        # causal-LM checkpoint): vLLM and other readers of `architectures` pick the model type from it.
        config.architectures = [type(base).__name__]
        if getattr(config, "quantization_config", None) is not None:
            # QLoRA: the weights written are dense (the 4-bit base dequantized, adapters merged); a
            # quantization_config left in config.json would make transformers and vLLM expect 4-bit weights.
            del config.quantization_config
        config.save_pretrained(str(directory))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(directory))
        gen = getattr(base, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(str(directory))
        (Path(directory) / "rlhf_ray_export.json").write_text(json.dumps({"head": self.head}))
