"""One step's counts -> each phase's floor, and the step's efficiency metrics.

**Floors** (seconds; the least time the measured device could take; ``D`` = devices of the phase,
``rate`` = measured matmul FLOP/s per device, ``bw`` = measured memory bytes/s per device; ``F``, ``W`` and
the other symbols as in ``shapes``):

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

from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Optional, Sequence

from rlhf_ray.efficiency.calibration import Calibration
from rlhf_ray.efficiency.shapes import ModelShape, decode_kv_reads, forward_flops, generate_flops, mfu, train_flops

ADAM_BYTES_PER_PARAM = 28
"""AdamW step memory traffic per trainable parameter: read parameter, gradient, m, v; write parameter, m, v (fp32)."""

PHASES = ("generate", "reward", "reward_model", "old_logprobs", "reference", "critic", "train", "weight_sync",
          "sleep_wake", "idle")
"""Phases of an RL step in the order they run (the offline loop has ``train`` and, with a reference group,
``reference``). ``timing/<phase>_s`` holds each one's seconds."""
SCORING_PHASES = ("reward", "reward_model", "old_logprobs", "reference", "critic")
"""Phases that run concurrently (the forwards on their groups while the reward functions run in the driver)."""


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
