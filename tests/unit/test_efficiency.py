"""FLOPs, bytes, floors and MFU of ``rlhf_ray.efficiency`` against hand-computed values.

The hand-checked model (``SHAPE``): L=2 layers, d=4, f=8 (gated MLP), 2 heads of 2 (a=4), 1 KV head (k=2),
V=10, untied head:
    per layer d a + 2 d k + a d + 3 d f = 16 + 16 + 16 + 96 = 144  ->  N_body = 288
    N_head = d V = 40; matmul params 328; params = 288 + 40 (head) + 40 (embedding) + 4 x 5 (norms) = 388
The calibration (``CAL``) runs 1000 FLOP/s and 1000 bytes/s so floors read as FLOPs or bytes / 1000.
"""

from pathlib import Path

import pytest

from rlhf_ray.efficiency import (Calibration, ModelShape, StepCounts, datasheet_peak_tflops, decode_kv_reads,
                                 efficiency_metrics, forward_flops, generate_flops, idle_seconds, phase_devices,
                                 phase_floors, train_flops)

SHAPE = ModelShape(layers=2, hidden=4, intermediate=8, heads=2, kv_heads=1, head_dim=2, vocab=10, head_out=10)
CAL = Calibration(device="cpu", device_name="test", dtype="bfloat16", matmul_tflops=1e-9, matmul_size=1,
                  mem_gbps=1e-6, h2d_gbps=1e-6, d2h_gbps=1e-6)
# Two samples of one 2-token prompt, 3 generated tokens each: sequences of 5 tokens.
COUNTS = StepCounts(prompt_lengths=[2, 2], response_lengths=[3, 3], group_index=[0, 0], weight_sync_bytes=776.0)


def test_shape_parameter_counts():
    assert SHAPE.body_params == 288
    assert SHAPE.head_params == 40
    assert SHAPE.matmul_params == 328
    assert SHAPE.params == 388
    assert SHAPE.weight_bytes(2) == 656
    assert SHAPE.kv_bytes_per_position(2) == 16  # 2 (K, V) x 2 layers x k=2 x 2 bytes
    assert SHAPE.with_head(1).matmul_params == 292  # value head: d x 1


@pytest.mark.parametrize("shape,arch,tied", [("qwen2.5-0.5b", "qwen2", False), ("qwen2.5-0.5b", "qwen2", True),
                                             ("tiny", "llama", False)])
def test_params_match_transformers(shape, arch, tied):
    """params counts exactly what transformers builds (Qwen2 carries q/k/v biases; tied heads count once)."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    from rlhf_ray.models.tiny import SHAPES

    dims = dict(SHAPES[shape])
    dims.setdefault("vocab_size", 128)
    config = (Qwen2Config if arch == "qwen2" else LlamaConfig)(**dims, tie_word_embeddings=tied)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    ms = ModelShape.from_hf_config(config)
    assert ms.params == sum(p.numel() for p in model.parameters())
    assert ms.qkv_bias == (arch == "qwen2") and ms.tied == tied


def test_forward_flops():
    # F(S=3, H=3) = 2 x 288 x 3 + 2 x 40 x 3 + 2 x L=2 x a=4 x 3 x 4 = 1728 + 240 + 192
    assert forward_flops(SHAPE, 3) == 2160
    # head at one position only: 1728 + 80 + 192
    assert forward_flops(SHAPE, 3, head_positions=1) == 2000


def test_generate_and_train_flops():
    # P=2, R=2: T = 3 tokens through the model, head at 2 positions: 1728 + 160 + 192
    assert generate_flops(SHAPE, 2, 2) == 2080
    # nothing generated: the prompt's forward without a head: 2 x 288 x 2 + 2 x 2 x 4 x 2 x 3 = 1152 + 96
    assert generate_flops(SHAPE, 2, 0) == 1248
    # 3 x F(3) x 2 passes
    assert train_flops(SHAPE, [3], passes=2) == 3 * 2160 * 2


def test_decode_kv_reads_share_the_prompt_within_a_group():
    # own generated positions: R (R-1) / 2 = 3 per sequence; the shared prompt: P x (R_max - 1) = 2 x 2 once
    assert decode_kv_reads([2, 2], [3, 3], [0, 0]) == 3 + 3 + 4
    # as separate groups: (R - 1)(2P + R) / 2 = 2 x 7 / 2 = 7 each
    assert decode_kv_reads([2, 2], [3, 3]) == 14
    assert decode_kv_reads([5], [0]) == 0


def test_phase_floors():
    f = phase_floors(["generate", "old_logprobs", "critic", "train", "weight_sync", "sleep_wake", "reward", "idle"],
                     COUNTS, SHAPE, CAL)
    # generate: FLOPs 2 x F(T=4, H=3) = 2 x (2304 + 240 + 320) = 5728 -> 5.728 s; bytes: 1 engine x R_max 3 x
    # 656 B of weights + 10 KV reads x 16 B = 1968 + 160 = 2128 -> 2.128 s; compute binds
    assert f["generate"].flops == 5728 and f["generate"].bytes == 2128
    assert f["generate"].seconds == pytest.approx(5.728, abs=1e-9) and f["generate"].bound == "compute"
    # old log-probs: 2 x F(5) = 2 x (2880 + 400 + 480) = 7520 -> 7.52 s (weights once: 0.656 s)
    assert f["old_logprobs"].seconds == pytest.approx(7.52, abs=1e-9)
    # critic: value head d x 1: F(5) = 2880 + 40 + 480 = 3400, two sequences -> 6.8 s
    assert f["critic"].seconds == pytest.approx(6.8, abs=1e-9)
    # train: 3 x 7520 FLOPs -> 22.56 s, plus AdamW 28 B x 388 params -> 10.864 s
    assert f["train"].seconds == pytest.approx(33.424, abs=1e-9)
    # weight sync: 776 B through a same-host copy (1000 B/s read + write: 500 B/s copied)
    assert f["weight_sync"].seconds == pytest.approx(1.552, abs=1e-9)
    # sleep: the engine's 388 params x 2 B to the host at 1000 B/s
    assert f["sleep_wake"].seconds == pytest.approx(0.776, abs=1e-9)
    assert f["reward"].seconds == 0 and f["idle"].seconds == 0  # reward functions and idle: no floor
    # a reward model (score head d x 1, same backbone): one forward of each sequence, as the critic's
    rm = phase_floors(["reward", "reward_model"], COUNTS, SHAPE, CAL, reward_model=SHAPE.with_head(1))
    assert rm["reward_model"].seconds == pytest.approx(6.8, abs=1e-9) and rm["reward"].seconds == 0


def test_floors_scale_with_devices_and_links():
    counts = StepCounts([2, 2], [3, 3], [0, 0], weight_sync_bytes=776.0, sync_link="device_to_device",
                        devices={"generate": 2, "train": 4})
    f = phase_floors(["generate", "train", "weight_sync"], counts, SHAPE, CAL)
    assert f["generate"].seconds == pytest.approx(5.728 / 2, abs=1e-9)
    assert f["train"].seconds == pytest.approx(33.424 / 4, abs=1e-9)
    # no second GPU measured: host<->device rate, 1000 B/s
    assert f["weight_sync"].seconds == pytest.approx(0.776, abs=1e-9)
    # hybrid: + engine weights waking (776 B) + learner state offloaded (1000 B), each at 1000 B/s
    hybrid = StepCounts([2, 2], [3, 3], [0, 0], weight_sync_bytes=776.0, hybrid=True, learner_offload_bytes=1000.0)
    assert phase_floors(["weight_sync"], hybrid, SHAPE, CAL)["weight_sync"].seconds == pytest.approx(
        1.552 + 0.776 + 1.0, abs=1e-9)


def test_efficiency_metrics():
    timings = {"timing/generate_s": 10.0, "timing/reward_s": 1.0, "timing/old_logprobs_s": 2.0,
               "timing/train_s": 40.0, "timing/weight_sync_s": 3.0, "timing/step_s": 60.0, "rollout/x": 5.0}
    m = efficiency_metrics(timings, COUNTS, SHAPE, CAL.to_dict())
    # idle: 60 - (10 + 40 + 3) - max(reward 1, old_logprobs 2) = 5 (the scoring phases overlap)
    assert m["efficiency/idle_s"] == pytest.approx(5.0)
    # run one after the other instead: 60 - (10 + 40 + 3) - 1 - 2 = 4
    serial = efficiency_metrics(timings, COUNTS, SHAPE, CAL, concurrent=())
    assert serial["efficiency/idle_s"] == pytest.approx(4.0)
    assert m["efficiency/generate_vs_floor"] == pytest.approx(10 / 5.728)
    assert m["efficiency/train_vs_floor"] == pytest.approx(40 / 33.424)
    assert "efficiency/reward_vs_floor" not in m and m["efficiency/reward_floor_s"] == 0
    # summed floors: 5.728 + 7.52 + 33.424 + 1.552
    assert m["efficiency/step_floor_s"] == pytest.approx(48.224)
    assert m["efficiency/step_vs_floor"] == pytest.approx(60 / 48.224)
    # MFU against the measured rate (no datasheet peak for "test"): 22560 FLOPs / (40 s x 1000 FLOP/s)
    assert m["efficiency/mfu"] == pytest.approx(0.564)
    assert m["efficiency/tokens_per_s_per_device"] == pytest.approx(10 / 60)
    assert m["efficiency/generate_floor_tokens_per_s"] == pytest.approx(6 / 5.728)
    assert m["efficiency/weight_sync_floor_gb_per_s"] == pytest.approx(5e-7)


def test_offline_counts_and_idle():
    counts = StepCounts.offline([5, 5])
    m = efficiency_metrics({"timing/train_s": 40.0, "timing/step_s": 41.0}, counts, SHAPE, CAL)
    assert m["efficiency/train_floor_s"] == pytest.approx(33.424) and m["efficiency/idle_s"] == pytest.approx(1.0)
    assert idle_seconds({"timing/train_s": 5.0, "timing/step_s": 4.0}) == 0.0  # clamped


def test_datasheet_peaks():
    assert datasheet_peak_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert datasheet_peak_tflops("NVIDIA H200", "bfloat16") == 989.4
    assert datasheet_peak_tflops("NVIDIA H200", "float32") is None
    assert datasheet_peak_tflops("AMD EPYC", "float32") is None


def test_calibration_measures_positive_rates_and_round_trips():
    cal = Calibration.measure("cpu", matmul_size=128, copy_mb=8, repeats=2)
    assert cal.device == "cpu" and cal.dtype == "float32" and cal.matmul_size == 128
    assert cal.matmul_tflops > 0 and cal.mem_gbps > 0 and cal.h2d_gbps > 0 and cal.d2h_gbps > 0
    assert Calibration.from_dict(cal.to_dict()) == cal


def test_phase_devices_from_config():
    from rlhf_ray.config import load_config, resolve

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples/grpo_7b_8gpu.yaml")
    assert phase_devices(resolve(cfg).plan, on_gpu=False) == {}
    d = phase_devices(resolve(cfg).plan, on_gpu=True)
    assert d["generate"] == 8 and d["train"] == 8 and d["old_logprobs"] == 8


def test_rl_step_counts_from_a_rollout_batch():
    """Counts from the loop's own batch type: prompt lengths = real tokens - generated ones, groups kept."""
    from rlhf_ray.config import load_config, resolve
    from rlhf_ray.efficiency import learner_state_bytes, rl_step_counts
    from rlhf_ray.types import RolloutBatch

    examples = Path(__file__).resolve().parents[2] / "examples"
    batch = RolloutBatch.from_generations([[1, 2], [1, 2], [3, 4, 5]], [[7, 8, 9], [7], [6, 6]],
                                          [[0.0] * 3, [0.0], [0.0] * 2], [0, 0, 1], pad_id=0)
    cpu = rl_step_counts(batch, resolve(load_config(examples / "grpo_tiny_cpu.yaml"), "cpu"), 100.0, SHAPE)
    assert list(cpu.prompt_lengths) == [2, 2, 3] and list(cpu.response_lengths) == [3, 1, 2]
    assert list(cpu.group_index) == [0, 0, 1] and cpu.devices == {} and cpu.sync_link == "copy"
    assert not cpu.hybrid and cpu.weight_sync_bytes == 100.0

    gpu = rl_step_counts(batch, resolve(load_config(examples / "grpo_7b_8gpu.yaml"), "cuda"), 100.0, SHAPE)
    # hybrid on 8 GPUs: the engines share the learners' GPUs; bf16 policy state offloaded: 388 x (2 x 2 + 12) B
    assert gpu.hybrid and gpu.sync_link == "copy" and gpu.total_devices == 8 and gpu.engines == 8
    assert gpu.learner_offload_bytes == learner_state_bytes(388, True, 2) == 388 * 16
    assert gpu.optimizer_steps == 4  # algo.mini_batches 4 x ppo_epochs 1


def test_offline_step_counts_from_micro_batches():
    import torch

    from rlhf_ray.config import load_config, resolve
    from rlhf_ray.efficiency import offline_step_counts

    cfg = load_config(Path(__file__).resolve().parents[2] / "examples" / "sft_tiny_cpu.yaml")
    ranks = [[{"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])}], [{"attention_mask": torch.ones(1, 2)}]]
    counts = offline_step_counts(ranks, resolve(cfg).plan, on_gpu=False)
    assert counts.sequence_lengths == [3, 4, 2] and counts.devices == {}
