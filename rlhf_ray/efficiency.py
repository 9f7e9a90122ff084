"""How far each phase of a training step is from what the hardware allows: FLOPs, bytes, floors, MFU.

Pure functions of a model's shape, a step's token counts and a device calibration; imports nothing
from ray, vllm or deepspeed (torch only inside ``Calibration.measure``). Used by the benchmarks
(``benchmarks/``) and meant for every training run's metrics (``efficiency_metrics``).

Notation (one model): ``L`` layers, ``d`` hidden size, ``f`` MLP width, ``a = heads x head_dim`` (the
attention width), ``k = kv_heads x head_dim``, ``V`` vocabulary, ``h`` the output head's width (``V``
for a causal LM, 1 for a value / score head). Matmul parameters (embedding lookup and norms excluded,
they do no matmul):

    N_body = L (d a + 2 d k + a d + m d f)        m = 3 for a gated (SwiGLU) MLP, 2 otherwise
    N_head = d h

**Forward FLOPs** of one sequence of ``S`` tokens with the head applied at ``H`` positions
(multiply-add = 2 FLOPs; causal attention counts only the keys each query sees, i.e. the useful work):

    F(S, H) = 2 N_body S + 2 N_head H + 2 L a S (S + 1)

(``QK^T`` and ``AV``: query ``i`` meets ``i`` keys, ``2 a`` FLOPs each, ``sum_i 2 * 2 a i = 2 a S (S+1)``.)
Training is ``3 F`` (backward = 2 x forward; recomputation under gradient checkpointing is not
useful work and is not counted). Generating ``R`` tokens after a ``P``-token prompt feeds
``T = P + R - 1`` tokens through the model and applies the head at ``R`` positions: ``F(T, R)``.

**Floors** (seconds; the least time the measured device could take; ``D`` = devices of the phase,
``rate`` = measured matmul FLOP/s per device, ``bw`` = measured memory bytes/s per device):

    generate      max(FLOPs / (D rate), bytes / (D bw)), bytes = E R_max W + KV reads
                  (every decode step reads all ``W = (N_body + N_head) x dtype bytes`` weights on each of
                  the ``E`` engines, and at least ``R_max`` steps are sequential; each decoded token reads
                  the keys and values of its context, ``2 L k x dtype bytes`` per position, the prompt's
                  once per prompt group per step since a group shares its prefix)
    reference, old_logprobs, critic, reward_model
                  max(sum F(S, S) / (D rate), W / (D bw))          one forward of every sequence
    reward        0: reward functions are Python in the driver (its wall time also covers waiting on the
                  reward model, whose forward is ``reward_model``)
    train         sum 3 F(S, S) x passes / (D rate) + optimizer steps x 28 bytes x trainable params / (D bw)
                  (AdamW reads parameter, gradient, both moments and writes parameter and moments,
                  fp32: 7 x 4 bytes per parameter); critic training added the same way when there is one
    weight_sync   bytes sent / link bytes/s: a copy on the same device or host (CUDA IPC, gloo on one
                  machine) moves each byte twice through memory (``bw / 2``); to another GPU the measured
                  peer copy rate (or host<->device when only one GPU was there to measure); hybrid
                  placement adds the engines' weights waking (host->device) and the learners offloading
                  (device->host)
    sleep_wake    engine weights device->host + learner state host->device (hybrid placement)
    idle          0: the step's wall time that no phase covers (advantages, moving data between actors)

The step's floor is the sum of its phases' floors (the target: a step within 2x of it). ``vs_floor``
is seconds / floor (1 = at the floor). MFU = training FLOPs / (train seconds x D x peak FLOP/s), with
the datasheet peak when the device is known (``PEAK_TFLOPS``) and the measured matmul rate otherwise.
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
ADAM_BYTES_PER_PARAM = 28
"""AdamW step memory traffic per trainable parameter: read parameter, gradient, m, v; write parameter, m, v (fp32)."""

PHASES = ("generate", "reward", "reward_model", "old_logprobs", "reference", "critic", "train", "weight_sync",
          "sleep_wake", "idle")
"""Phases of an RL step in the order they run (the offline loop has ``train`` and, with a reference group,
``reference``). ``timing/<phase>_s`` holds each one's seconds."""
SCORING_PHASES = ("reward", "reward_model", "old_logprobs", "reference", "critic")
"""Phases that run concurrently (the forwards on their groups while the reward functions run in the driver)."""

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s per GPU.
    "H200": {"bfloat16": 989.4, "float16": 989.4},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
    "L40S": {"bfloat16": 362.0, "float16": 362.0},
}
"""Looked up by the first key contained in the device name (so "H100 PCIe" is listed before "H100")."""


# ---- model shape and FLOPs -------------------------------------------------------------------------

UNGATED_MLP_MODELS = ("gpt2", "gpt_neox", "gptj", "opt", "bloom", "falcon", "phi", "starcoder2")
"""Model types whose MLP is two matrices (up, down); every other decoder is taken as gated (gate, up, down:
Llama, Qwen2, Mistral, Gemma, ...)."""


@dataclass(frozen=True)
class ModelShape:
    """The dimensions that set a decoder's FLOPs and bytes (see the module docstring for the formulas)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    head_out: int
    """Width of the output projection: ``vocab`` for a causal LM, 1 for a value or score head."""
    gated_mlp: bool = True
    qkv_bias: bool = False
    tied: bool = False
    """Output head shares the embedding matrix (counted once in ``params``; its matmul still runs)."""

    @classmethod
    def from_hf_config(cls, config: Any, head: Literal["causal_lm", "token_value", "sequence_score"] = "causal_lm"
                       ) -> "ModelShape":
        """From a transformers config (Llama / Qwen2 / Mistral-style decoders) or a model directory path."""
        if isinstance(config, (str, os.PathLike)):
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(str(config))
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        qkv_bias = getattr(config, "attention_bias", None)
        if qkv_bias is None:
            qkv_bias = getattr(config, "model_type", "") == "qwen2"
        return cls(layers=config.num_hidden_layers, hidden=config.hidden_size,
                   intermediate=config.intermediate_size, heads=heads,
                   kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
                   vocab=config.vocab_size, head_out=config.vocab_size if head == "causal_lm" else 1,
                   gated_mlp=getattr(config, "model_type", "") not in UNGATED_MLP_MODELS,
                   qkv_bias=bool(qkv_bias),
                   tied=bool(getattr(config, "tie_word_embeddings", False)) and head == "causal_lm")

    def with_head(self, head_out: int) -> "ModelShape":
        """The same backbone with another output head (e.g. a critic's 1-wide value head)."""
        return dataclasses.replace(self, head_out=head_out, tied=self.tied and head_out == self.vocab)

    @property
    def attn_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def body_params(self) -> int:
        """N_body = L (d a + 2 d k + a d + m d f): the matmul weights of the transformer blocks."""
        d, a, k = self.hidden, self.attn_dim, self.kv_dim
        mlp = (3 if self.gated_mlp else 2) * d * self.intermediate
        return self.layers * (d * a + 2 * d * k + a * d + mlp)

    @property
    def head_params(self) -> int:
        """N_head = d h."""
        return self.hidden * self.head_out

    @property
    def matmul_params(self) -> int:
        return self.body_params + self.head_params

    @property
    def params(self) -> int:
        """Every parameter: matmul weights, embedding, norms (2 per layer + final), q/k/v biases."""
        norms = self.hidden * (2 * self.layers + 1)
        biases = self.layers * (self.attn_dim + 2 * self.kv_dim) if self.qkv_bias else 0
        head = 0 if self.tied else self.head_params
        return self.body_params + head + self.vocab * self.hidden + norms + biases

    def weight_bytes(self, dtype_bytes: int) -> int:
        """Bytes of matmul weights one forward step reads (the embedding is only gathered row by row)."""
        return self.matmul_params * dtype_bytes

    def kv_bytes_per_position(self, dtype_bytes: int) -> int:
        """Key + value cache of one position across layers: 2 L k x dtype bytes."""
        return 2 * self.layers * self.kv_dim * dtype_bytes


def forward_flops(shape: ModelShape, seq_len: int, head_positions: Optional[int] = None) -> float:
    """F(S, H) = 2 N_body S + 2 N_head H + 2 L a S (S + 1); ``head_positions`` H defaults to S."""
    S = int(seq_len)
    H = S if head_positions is None else int(head_positions)
    attention = 2.0 * shape.layers * shape.attn_dim * S * (S + 1)
    return 2.0 * shape.body_params * S + 2.0 * shape.head_params * H + attention


def train_flops(shape: ModelShape, seq_lens: Sequence[int], passes: int = 1) -> float:
    """3 F(S, S) per sequence (forward + backward), ``passes`` times over the batch (PPO epochs)."""
    return 3.0 * passes * sum(forward_flops(shape, s) for s in seq_lens)


def generate_flops(shape: ModelShape, prompt_len: int, response_len: int) -> float:
    """F(P + R - 1, R): the prompt and all but the last sampled token go through the model; the head runs
    once per sampled token (vLLM computes logits only where it samples)."""
    if response_len <= 0:
        return forward_flops(shape, prompt_len, 0)
    return forward_flops(shape, prompt_len + response_len - 1, response_len)


def decode_kv_reads(prompt_lens: Sequence[int], response_lens: Sequence[int],
                    group_index: Optional[Sequence[int]] = None) -> float:
    """Cache positions read while decoding, prompt prefixes shared within a group.

    The token at position p (0-based) attends to p + 1 positions. Decoding processes positions
    P .. P + R - 2 of each sequence; their reads split into the prompt's P positions, read once per
    decode step by the whole group (``P (R_max,group - 1)``), and the sequence's own generated
    positions, ``sum_{j=1}^{R-1} j = R (R - 1) / 2``. Without ``group_index`` every sequence is its own
    group, giving ``(R - 1)(2P + R) / 2`` per sequence.
    """
    groups = group_index if group_index is not None else range(len(prompt_lens))
    longest: dict[Any, tuple[int, int]] = {}
    total = 0.0
    for g, P, R in zip(groups, prompt_lens, response_lens):
        P, R = int(P), int(R)
        total += R * (R - 1) / 2
        prev = longest.get(g, (P, 0))
        longest[g] = (P, max(prev[1], R))
    total += sum(P * max(Rmax - 1, 0) for P, Rmax in longest.values())
    return total


def mfu(flops: float, seconds: float, devices: float, peak_flops_per_device: float) -> float:
    """Model FLOPs utilisation: flops / (seconds x devices x peak)."""
    return flops / max(seconds * devices * peak_flops_per_device, 1e-30)


# ---- calibration ------------------------------------------------------------------------------------

@dataclass
class Calibration:
    """What one device measurably does: matmul rate, memory and copy bandwidths (the floors' denominators).

    Rates are the best of a few repeats (the least noisy estimate of what the device can do). On a CPU
    "the device" is the whole machine at ``threads`` threads, and host and device are the same memory,
    so the host<->device rates are plain copy rates.
    """

    device: str
    """``cuda`` or ``cpu``."""
    device_name: str
    dtype: str
    """The dtype of the matmuls (the run's compute dtype) and of the weights in the bytes formulas."""
    matmul_tflops: float
    """Measured dense matmul rate, TFLOP/s, for an n x n x n product in ``dtype``."""
    matmul_size: int
    mem_gbps: float
    """Memory bandwidth, GB/s (1e9 bytes), counting bytes read + written by one large on-device copy."""
    h2d_gbps: float
    """Host -> device copy (pinned host memory on CUDA), GB/s of bytes copied."""
    d2h_gbps: float
    d2d_gbps: Optional[float] = None
    """GPU -> another GPU copy rate, GB/s, when two GPUs were visible; None otherwise."""
    peak_tflops: Optional[float] = None
    """The device's datasheet dense peak in ``dtype`` when known (``PEAK_TFLOPS``); MFU is against it."""
    threads: int = 1
    seconds: float = 0.0
    """How long the calibration took."""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def matmul_flops_per_s(self) -> float:
        return self.matmul_tflops * 1e12

    @property
    def mfu_peak_flops_per_s(self) -> float:
        """The MFU denominator: datasheet peak when known, else the measured matmul rate."""
        return (self.peak_tflops or self.matmul_tflops) * 1e12

    @property
    def mem_bytes_per_s(self) -> float:
        return self.mem_gbps * 1e9

    @property
    def copy_bytes_per_s(self) -> float:
        """Bytes copied per second within one device's memory (each byte read and written: ``mem / 2``)."""
        return self.mem_gbps * 1e9 / 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def measure(cls, device: Optional[str] = None, dtype: str = "auto", matmul_size: Optional[int] = None,
                copy_mb: Optional[int] = None, repeats: int = 5) -> "Calibration":
        """Measure this process's device: ``cuda`` (the current GPU) when available, else ``cpu``.

        ``dtype`` auto is bfloat16 on CUDA and float32 on CPU (as ``model.dtype: auto``). Defaults:
        an 8192^3 matmul and 2 GiB copies on CUDA, 1024^3 and 256 MiB on CPU (a few seconds).
        """
        import torch

        t_start = time.perf_counter()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = device.startswith("cuda")
        if dtype == "auto":
            dtype = "bfloat16" if on_cuda else "float32"
        tdtype = getattr(torch, dtype)
        n = matmul_size or (8192 if on_cuda else 1024)
        nbytes = (copy_mb or (2048 if on_cuda else 256)) << 20
        dev = torch.device(device)
        sync = torch.cuda.synchronize if on_cuda else (lambda: None)

        def best_seconds(fn) -> float:
            fn()
            fn()
            sync()
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                fn()
                sync()
                best = min(best, time.perf_counter() - t0)
            return max(best, 1e-9)

        a = torch.randn(n, n, device=dev, dtype=tdtype)
        b = torch.randn(n, n, device=dev, dtype=tdtype)
        out = torch.empty(n, n, device=dev, dtype=tdtype)
        matmul_tflops = 2.0 * n ** 3 / best_seconds(lambda: torch.matmul(a, b, out=out)) / 1e12
        del a, b, out

        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
        dst = torch.empty_like(src)
        mem_gbps = 2.0 * nbytes / best_seconds(lambda: dst.copy_(src)) / 1e9
        if on_cuda:
            host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            h2d = nbytes / best_seconds(lambda: dst.copy_(host, non_blocking=True)) / 1e9
            d2h = nbytes / best_seconds(lambda: host.copy_(dst, non_blocking=True)) / 1e9
            d2d = None
            if torch.cuda.device_count() > 1:
                here = dev.index if dev.index is not None else torch.cuda.current_device()
                other_dev = torch.device("cuda", (here + 1) % torch.cuda.device_count())
                other = torch.empty(nbytes, dtype=torch.uint8, device=other_dev)

                def peer() -> None:
                    other.copy_(src, non_blocking=True)
                    torch.cuda.synchronize(other_dev)

                d2d = nbytes / best_seconds(peer) / 1e9
                del other
            del host
            name = torch.cuda.get_device_name(dev)
            threads = 1
        else:
            h2d = d2h = mem_gbps / 2
            d2d = None
            name = cpu_name()
            threads = torch.get_num_threads()
        del src, dst
        return cls(device="cuda" if on_cuda else "cpu", device_name=name, dtype=dtype,
                   matmul_tflops=matmul_tflops, matmul_size=n, mem_gbps=mem_gbps, h2d_gbps=h2d, d2h_gbps=d2h,
                   d2d_gbps=d2d, peak_tflops=datasheet_peak_tflops(name, dtype), threads=threads,
                   seconds=time.perf_counter() - t_start)


def datasheet_peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Dense peak TFLOP/s of a known GPU in ``dtype`` (``PEAK_TFLOPS``); None when unknown."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def calibrate_here(dtype: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """Measure the calling process's device and return ``Calibration.to_dict()``.

    Meant for a learner actor at setup (its GPU is the one the phases run on). On a CPU it measures
    with every core (the machine is the device) and restores the thread count afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        if not torch.cuda.is_available():
            torch.set_num_threads(os.cpu_count() or 1)
        return Calibration.measure(dtype=dtype, **kwargs).to_dict()
    finally:
        torch.set_num_threads(threads)


# ---- one step's floors --------------------------------------------------------------------------------

@dataclass
class StepCounts:
    """What one step did, for its floors: per-sequence lengths and where things ran."""

    prompt_lengths: Sequence[int]
    """(B,) prompt tokens of each sequence (offline jobs: the whole sequence, with ``response_lengths`` 0)."""
    response_lengths: Sequence[int]
    """(B,) generated tokens of each sequence."""
    group_index: Optional[Sequence[int]] = None
    """(B,) the prompt each sequence answers (its samples share the prompt's KV cache); None: all distinct."""
    train_passes: int = 1
    """Times the learners train on each sequence (``algo.ppo_epochs``)."""
    optimizer_steps: int = 1
    """Optimizer steps in the step (``algo.mini_batches x algo.ppo_epochs``; offline jobs 1)."""
    trainable_params: Optional[int] = None
    """Parameters the optimizer updates (LoRA: the adapters'); None: every parameter of the model."""
    weight_sync_bytes: float = 0.0
    sync_link: Literal["copy", "device_to_device"] = "copy"
    """copy: engines on the learners' device or host (CUDA IPC, gloo on one machine); device_to_device: NCCL
    to other GPUs."""
    engines: int = 1
    """Rollout engines (each reads its whole weights every decode step)."""
    devices: Mapping[str, float] = field(default_factory=dict)
    """Devices each phase runs on (``phase_devices``); a phase not named runs on 1."""
    total_devices: Optional[float] = None
    """Devices the whole run holds (for tokens/s per device); None: the most any phase uses."""
    hybrid: bool = False
    """Engines sleep during training and learners offload during generation (``placement.mode: hybrid`` on GPU)."""
    learner_offload_bytes: float = 0.0
    """Bytes the learners move to the host and back in hybrid placement (parameters, gradients, optimizer)."""

    @classmethod
    def offline(cls, sequence_lengths: Sequence[int], **kwargs: Any) -> "StepCounts":
        """An offline step (SFT, RM, DPO, KTO): ``sequence_lengths`` (B,) of every sequence trained on
        (DPO: chosen and rejected both)."""
        return cls(prompt_lengths=list(sequence_lengths), response_lengths=[0] * len(sequence_lengths), **kwargs)

    @property
    def sequence_lengths(self) -> list[int]:
        return [int(p) + int(r) for p, r in zip(self.prompt_lengths, self.response_lengths)]

    def devices_of(self, phase: str) -> float:
        return float(self.devices.get(phase, 1.0)) or 1.0


@dataclass
class Floor:
    """One phase's floor: seconds, the work behind it, and which resource binds."""

    seconds: float
    flops: float = 0.0
    bytes: float = 0.0
    bound: str = "none"
    """compute, memory, link, or none (no physical floor: Python reward functions, idle)."""


def _roofline(flops: float, nbytes: float, devices: float, cal: Calibration) -> Floor:
    compute = flops / (devices * cal.matmul_flops_per_s)
    memory = nbytes / (devices * cal.mem_bytes_per_s)
    return Floor(max(compute, memory), flops, nbytes, "compute" if compute >= memory else "memory")


def generate_floor(counts: StepCounts, policy: ModelShape, cal: Calibration) -> Floor:
    """max(sum F(P+R-1, R) / (D rate), (E R_max W + KV reads x 2 L k b) / (D bw))."""
    P, R = counts.prompt_lengths, counts.response_lengths
    b = cal.dtype_bytes
    flops = sum(generate_flops(policy, p, r) for p, r in zip(P, R))
    steps = max((int(r) for r in R), default=0)
    nbytes = (counts.engines * steps * policy.weight_bytes(b)
              + decode_kv_reads(P, R, counts.group_index) * policy.kv_bytes_per_position(b))
    return _roofline(flops, nbytes, counts.devices_of("generate"), cal)


def forward_floor(counts: StepCounts, shape: ModelShape, cal: Calibration, phase: str) -> Floor:
    """max(sum F(S, S) / (D rate), W / (D bw)): one forward over every sequence of the step."""
    flops = sum(forward_flops(shape, s) for s in counts.sequence_lengths)
    return _roofline(flops, shape.weight_bytes(cal.dtype_bytes), counts.devices_of(phase), cal)


def train_floor(counts: StepCounts, policy: ModelShape, cal: Calibration, critic: Optional[ModelShape] = None
                ) -> Floor:
    """sum 3 F(S, S) x passes / (D rate) + optimizer steps x 28 bytes x trainable params / (D bw), for the
    policy and (when given) the critic, one after the other."""
    lengths = counts.sequence_lengths
    D = counts.devices_of("train")
    seconds, flops, nbytes = 0.0, 0.0, 0.0
    for i, shape in enumerate(s for s in (policy, critic) if s is not None):
        f = train_flops(shape, lengths, counts.train_passes)
        params = counts.trainable_params if (i == 0 and counts.trainable_params is not None) else shape.params
        opt = counts.optimizer_steps * ADAM_BYTES_PER_PARAM * params
        devices = counts.devices_of("critic_train") if i == 1 and "critic_train" in counts.devices else D
        seconds += f / (devices * cal.matmul_flops_per_s) + opt / (devices * cal.mem_bytes_per_s)
        flops, nbytes = flops + f, nbytes + opt
    return Floor(seconds, flops, nbytes, "compute")


def sync_bytes_per_s(counts: StepCounts, cal: Calibration) -> float:
    """The weight sync's link: a same-device / same-host copy (``bw / 2``), or the measured GPU peer copy
    (host<->device when no second GPU was there to measure)."""
    if counts.sync_link == "device_to_device":
        return (cal.d2d_gbps or min(cal.h2d_gbps, cal.d2h_gbps)) * 1e9
    return cal.copy_bytes_per_s


def weight_sync_floor(counts: StepCounts, policy: ModelShape, cal: Calibration) -> Floor:
    """bytes / link rate; hybrid adds the engines' weights host->device and the learners' state device->host."""
    seconds = counts.weight_sync_bytes / sync_bytes_per_s(counts, cal)
    nbytes = counts.weight_sync_bytes
    if counts.hybrid:
        engine_w = counts.engines * policy.params * cal.dtype_bytes
        seconds += engine_w / (cal.h2d_gbps * 1e9) + counts.learner_offload_bytes / (cal.d2h_gbps * 1e9)
        nbytes += engine_w + counts.learner_offload_bytes
    return Floor(seconds, 0.0, nbytes, "link")


def sleep_wake_floor(counts: StepCounts, policy: ModelShape, cal: Calibration) -> Floor:
    """Engine weights device->host (sleep level 1) + learner state host->device (reload)."""
    engine_w = counts.engines * policy.params * cal.dtype_bytes
    seconds = engine_w / (cal.d2h_gbps * 1e9) + counts.learner_offload_bytes / (cal.h2d_gbps * 1e9)
    return Floor(seconds, 0.0, engine_w + counts.learner_offload_bytes, "link")


def phase_floors(phases: Sequence[str], counts: StepCounts, policy: ModelShape, cal: Calibration,
                 critic: Optional[ModelShape] = None, reward_model: Optional[ModelShape] = None
                 ) -> dict[str, Floor]:
    """The floor of each named phase (see the module docstring); unknown phases get no floor (0)."""
    floors: dict[str, Floor] = {}
    for phase in phases:
        if phase == "generate":
            floors[phase] = generate_floor(counts, policy, cal)
        elif phase in ("old_logprobs", "reference"):
            floors[phase] = forward_floor(counts, policy, cal, phase)
        elif phase == "critic":
            floors[phase] = forward_floor(counts, critic or policy.with_head(1), cal, phase)
        elif phase == "reward_model" and reward_model is not None:
            floors[phase] = forward_floor(counts, reward_model, cal, "reward")
        elif phase == "train":
            floors[phase] = train_floor(counts, policy, cal, critic)
        elif phase == "weight_sync":
            floors[phase] = weight_sync_floor(counts, policy, cal)
        elif phase == "sleep_wake":
            floors[phase] = sleep_wake_floor(counts, policy, cal)
        else:  # reward functions (Python in the driver), idle, anything else: no physical floor
            floors[phase] = Floor(0.0)
    return floors


def idle_seconds(timings: Mapping[str, float], concurrent: Sequence[str] = SCORING_PHASES) -> float:
    """Step seconds no phase covers; the ``concurrent`` phases (our loop's scoring stage) count as their longest."""
    t = {k[len("timing/"):-2]: float(v) for k, v in timings.items() if k.startswith("timing/") and k.endswith("_s")}
    if "step" not in t:
        return 0.0
    scoring = max((t[p] for p in concurrent if p in t), default=0.0)
    serial = sum(t[p] for p in t if p not in concurrent and p not in ("step", "idle"))
    return max(0.0, t["step"] - serial - scoring)


def efficiency_metrics(timings: Mapping[str, float], counts: StepCounts, policy: Any, calibration: Any,
                       critic: Any = None, reward_model: Any = None,
                       concurrent: Sequence[str] = SCORING_PHASES) -> dict[str, float]:
    """Each timed phase beside its floor, the step's summed floor, MFU and per-device throughput.

    ``timings``: a step's metrics holding ``timing/<phase>_s`` and ``timing/step_s`` (other keys are
    ignored, so a loop's whole metrics dict may be passed). ``policy`` / ``critic`` / ``reward_model``:
    ``ModelShape``s, or HF configs / model directories. ``calibration``: a ``Calibration`` or its dict.
    ``concurrent``: phases that overlap each other (``idle`` counts them once, as their longest).

    Returns (every phase found in ``timings``, plus ``idle`` when there is a step time):
    ``efficiency/<phase>_floor_s``, ``efficiency/<phase>_vs_floor`` (seconds / floor; absent where the
    floor is 0), ``efficiency/idle_s``, ``efficiency/step_floor_s``, ``efficiency/step_vs_floor``,
    ``efficiency/mfu`` and ``efficiency/train_tflops_per_device`` (when ``train`` is timed),
    ``efficiency/tokens_per_s_per_device``, ``efficiency/generate_floor_tokens_per_s`` and
    ``efficiency/weight_sync_floor_gb_per_s`` (when those phases are timed).
    """
    cal = calibration if isinstance(calibration, Calibration) else Calibration.from_dict(calibration)
    policy = policy if isinstance(policy, ModelShape) else ModelShape.from_hf_config(policy)
    if critic is not None and not isinstance(critic, ModelShape):
        critic = ModelShape.from_hf_config(critic, head="token_value")
    if reward_model is not None and not isinstance(reward_model, ModelShape):
        reward_model = ModelShape.from_hf_config(reward_model, head="sequence_score")

    seconds = {k[len("timing/"):-2]: float(v) for k, v in timings.items()
               if k.startswith("timing/") and k.endswith("_s") and k != "timing/step_s"}
    phases = [p for p in PHASES if p in seconds] + sorted(p for p in seconds if p not in PHASES)
    out: dict[str, float] = {}
    if "timing/step_s" in timings:
        seconds["idle"] = idle_seconds(timings, concurrent)
        out["efficiency/idle_s"] = seconds["idle"]
        if "idle" not in phases:
            phases.append("idle")
    floors = phase_floors(phases, counts, policy, cal, critic, reward_model)
    for phase in phases:
        fl = floors[phase]
        out[f"efficiency/{phase}_floor_s"] = fl.seconds
        if fl.seconds > 0:
            out[f"efficiency/{phase}_vs_floor"] = seconds[phase] / fl.seconds
    step_floor = sum(f.seconds for f in floors.values())
    out["efficiency/step_floor_s"] = step_floor
    step_s = float(timings.get("timing/step_s", 0.0))
    if step_s > 0 and step_floor > 0:
        out["efficiency/step_vs_floor"] = step_s / step_floor
    if "train" in floors and seconds.get("train", 0) > 0:
        D = counts.devices_of("train")
        out["efficiency/mfu"] = mfu(floors["train"].flops, seconds["train"], D, cal.mfu_peak_flops_per_s)
        out["efficiency/train_tflops_per_device"] = floors["train"].flops / seconds["train"] / D / 1e12
    if step_s > 0:
        total = counts.total_devices or max([counts.devices_of(p) for p in phases] or [1.0])
        out["efficiency/tokens_per_s_per_device"] = sum(counts.sequence_lengths) / step_s / total
    if "generate" in floors and floors["generate"].seconds > 0:
        out["efficiency/generate_floor_tokens_per_s"] = (sum(int(r) for r in counts.response_lengths)
                                                         / floors["generate"].seconds)
    if "weight_sync" in floors:
        out["efficiency/weight_sync_floor_gb_per_s"] = sync_bytes_per_s(counts, cal) / 1e9
    return out


def phase_devices(cfg: Any, on_gpu: bool) -> dict[str, float]:
    """Devices of each phase from a run's ``Config`` (GPU runs; on a CPU the machine is one device).

    generate: engines x tensor parallel; old_logprobs / train: policy workers x GPUs each; reference the
    same (its group mirrors the policy's learner settings); critic: critic workers; reward: reward workers.
    Hybrid placement puts every role on the learners' GPUs; the counts are the same.
    """
    if not on_gpu:
        return {}
    lc, r = cfg.learner, cfg.rollout
    learners = lc.num_workers * lc.gpus_per_worker
    critic_workers = cfg.critic.num_workers or lc.num_workers
    return {"generate": r.num_engines * r.tensor_parallel_size, "old_logprobs": learners, "train": learners,
            "reference": learners, "critic": critic_workers * lc.gpus_per_worker,
            "critic_train": critic_workers * lc.gpus_per_worker,
            "reward": cfg.reward.num_workers * cfg.reward.gpus_per_worker}


def learner_state_bytes(params: int, trainable: bool, dtype_bytes: int) -> float:
    """Bytes a learner moves when it offloads: parameters in the compute dtype, plus for a trained model its
    gradients (same dtype) and fp32 optimizer state (master copy and two moments, 12 bytes)."""
    return float(params * (2 * dtype_bytes + 12 if trainable else dtype_bytes))


def rl_step_counts(batch: Any, cfg: Any, on_gpu: bool, weight_sync_bytes: float, policy: ModelShape,
                   critic: Optional[ModelShape] = None, reward_model: Optional[ModelShape] = None,
                   trainable_params: Optional[int] = None) -> StepCounts:
    """``StepCounts`` of one RL step from its ``RolloutBatch`` (``attention_mask`` (B, T), ``response_lengths``
    (B,), ``group_index`` (B,)) and the run's ``Config``; ``weight_sync_bytes`` as the sync reported;
    ``trainable_params`` the policy's (LoRA: the adapters'; None: all of them)."""
    total = [int(x) for x in batch.attention_mask.sum(-1).tolist()]
    resp = [int(x) for x in batch.response_lengths.tolist()]
    a, r = cfg.algo, cfg.rollout
    hybrid = on_gpu and cfg.placement.mode == "hybrid"
    devices = phase_devices(cfg, on_gpu)
    b = DTYPE_BYTES.get(_dtype_name(cfg.model.dtype, on_gpu), 4)
    offload = 0.0
    if hybrid:
        offload = learner_state_bytes(policy.params, True, b)
        offload += learner_state_bytes(policy.params, False, b) if a.kl_coef > 0 else 0.0
        offload += learner_state_bytes(critic.params, True, b) if critic is not None else 0.0
        offload += learner_state_bytes(reward_model.params, False, b) if reward_model is not None else 0.0
    total_devices = None
    if on_gpu:
        learners = devices["train"]
        if cfg.placement.mode == "hybrid":
            total_devices = learners
        else:
            side = [devices["critic"] if critic is not None else 0.0,
                    devices["reward"] if reward_model is not None else 0.0]
            ref = devices["reference"] if a.kl_coef > 0 and cfg.placement.mode == "separate" else 0.0
            total_devices = learners + devices["generate"] + ref + (
                max(side) if cfg.placement.mode == "shared" else sum(side))
    return StepCounts(prompt_lengths=[t - x for t, x in zip(total, resp)], response_lengths=resp,
                      group_index=[int(g) for g in batch.group_index.tolist()], train_passes=a.ppo_epochs,
                      optimizer_steps=a.mini_batches * a.ppo_epochs, weight_sync_bytes=float(weight_sync_bytes),
                      sync_link="device_to_device" if on_gpu and not hybrid else "copy", engines=r.num_engines,
                      devices=devices, total_devices=total_devices, hybrid=hybrid, learner_offload_bytes=offload,
                      trainable_params=trainable_params)


def offline_step_counts(micro_batches: Any, cfg: Any, on_gpu: bool, trainable_params: Optional[int] = None
                        ) -> StepCounts:
    """``StepCounts`` of one offline step (SFT, RM, DPO, KTO) from every rank's micro-batches (dicts with
    ``attention_mask`` (B, T); a list of lists, one per rank, as the loop hands them to ``train_step``)."""
    lengths: list[int] = []
    for rank in micro_batches:
        for mb in rank:
            lengths += [int(x) for x in mb["attention_mask"].sum(-1).tolist()]
    lc = cfg.learner
    devices = {"train": lc.num_workers * lc.gpus_per_worker, "reference": lc.num_workers * lc.gpus_per_worker} \
        if on_gpu else {}
    return StepCounts.offline(lengths, devices=devices, total_devices=devices.get("train"),
                              trainable_params=trainable_params)


def _dtype_name(dtype: str, on_gpu: bool) -> str:
    return ("bfloat16" if on_gpu else "float32") if dtype == "auto" else dtype
