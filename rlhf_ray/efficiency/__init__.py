"""How far each phase of a training step is from what the hardware allows: FLOPs, bytes, floors, MFU.

Pure functions of a model's shape, a step's token counts and a device calibration; imports nothing
from ray, vllm or deepspeed (torch only inside ``Calibration.measure``). Used by the benchmarks
(``benchmarks/``) and meant for every training run's metrics (``efficiency_metrics``).

- ``shapes``: a model's dimensions -> its FLOPs and bytes (the formulas), MFU;
- ``calibration``: what the device measurably does (matmul rate, memory and copy bandwidths);
- ``floors``: one step's counts -> each phase's floor (the formulas) and the step's efficiency metrics;
- ``report``: a run's ``Resolved`` description and a step's batches -> the step's counts.
"""

from rlhf_ray.efficiency.calibration import (PEAK_TFLOPS, Calibration, calibrate_here, cpu_name,
                                             datasheet_peak_tflops)
from rlhf_ray.efficiency.floors import (ADAM_BYTES_PER_PARAM, PHASES, SCORING_PHASES, Floor, StepCounts,
                                        efficiency_metrics, forward_floor, generate_floor, idle_seconds,
                                        phase_floors, sleep_wake_floor, sync_bytes_per_s, train_floor,
                                        weight_sync_floor)
from rlhf_ray.efficiency.report import learner_state_bytes, offline_step_counts, phase_devices, rl_step_counts
from rlhf_ray.efficiency.shapes import (DTYPE_BYTES, UNGATED_MLP_MODELS, ModelShape, decode_kv_reads,
                                        forward_flops, generate_flops, mfu, train_flops)

__all__ = [
    "ADAM_BYTES_PER_PARAM", "DTYPE_BYTES", "PEAK_TFLOPS", "PHASES", "SCORING_PHASES", "UNGATED_MLP_MODELS",
    "Calibration", "Floor", "ModelShape", "StepCounts",
    "calibrate_here", "cpu_name", "datasheet_peak_tflops", "decode_kv_reads", "efficiency_metrics", "forward_floor",
    "forward_flops", "generate_floor", "generate_flops", "idle_seconds", "learner_state_bytes", "mfu",
    "offline_step_counts", "phase_devices", "phase_floors", "rl_step_counts", "sleep_wake_floor",
    "sync_bytes_per_s", "train_floor", "train_flops", "weight_sync_floor",
]
