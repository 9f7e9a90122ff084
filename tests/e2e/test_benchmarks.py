"""The benchmarks end to end on CPU: the README's commands (``--tiny``), their table and their JSON.

``python benchmarks/bench_rl.py --job grpo --tiny`` runs the real GRPO job (vLLM CPU engine, DeepSpeed learner)
on this session's Ray cluster; every phase must come back with its seconds, its floor and their ratio, beside
a positive calibration. TRL's GRPOTrainer then runs the same workload from that run's inputs. The GPU
workloads cannot run here; their configs are checked to pass load-time validation.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RL_PHASES = ("generate", "reward", "train", "weight_sync", "idle")
"""GRPO's phases here: one optimizer step per batch and no reference, so pi_old comes from the update's own
forward pass (``algo.old_logprobs: auto`` -> update) and no ``old_logprobs`` phase runs."""
FLOORED = ("generate", "train", "weight_sync")
"""Phases with a physical floor in this workload (reward functions and idle have none)."""


GRPO_TINY = "python benchmarks/bench_rl.py --job grpo --tiny"
TRL_BESIDE = "python benchmarks/bench_trl.py --from runs/bench/grpo-tiny"
CALIBRATE = "python benchmarks/calibrate.py"
MODES_TINY = "python benchmarks/bench_rl.py --job grpo --tiny --mode sync,one_step_off,async --reward-delay-s 1 --long-tail"
"""The README's benchmark commands, run verbatim below in a scratch directory laid out like a clone."""


def _run(command: str, cwd: Path, timeout: int, env: dict | None = None) -> subprocess.CompletedProcess:
    argv = [sys.executable, *shlex.split(command)[1:]]
    proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert proc.returncode == 0, (command, proc.stdout[-3000:], proc.stderr[-5000:])
    return proc


@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    """A directory laid out like a clone (benchmarks/ and rlhf_ray/ visible); the benchmarks write runs/ here."""
    d = tmp_path_factory.mktemp("bench")
    for name in ("benchmarks", "rlhf_ray"):
        (d / name).symlink_to(REPO / name)
    return d


@pytest.fixture(scope="module")
def grpo_tiny(ray_cluster, scratch):
    """(work dir, stdout, result) of the README's GRPO --tiny command, joining the session's Ray cluster."""
    address = ray_cluster.get_runtime_context().gcs_address
    proc = _run(GRPO_TINY, scratch, timeout=600, env={"RAY_ADDRESS": address})
    work = scratch / "runs" / "bench" / "grpo-tiny"
    return work, proc.stdout, json.loads((work / "result.json").read_text())


def test_grpo_tiny_prints_the_table_and_writes_the_json(grpo_tiny):
    work, stdout, result = grpo_tiny
    table = stdout[stdout.index("== GRPO benchmark"):]
    assert "NOT a GPU or performance result" in table and "phase" in table and "x floor" in table
    for phase in RL_PHASES + ("step",):
        assert any(line.split()[:1] == [phase] for line in table.splitlines()), (phase, table)

    cal = result["calibration"]
    assert cal["device"] == "cpu" and cal["dtype"] == "float32"
    for key in ("matmul_tflops", "mem_gbps", "h2d_gbps", "d2h_gbps"):
        assert cal[key] > 0 and all(run[key] > 0 for run in cal["runs"]), key
    assert len(cal["runs"]) == 2  # calibrated before and after the run

    phases = result["phases"]
    assert set(RL_PHASES) <= set(phases) and "old_logprobs" not in phases, sorted(phases)
    for name in RL_PHASES:
        assert phases[name]["seconds"] is not None and phases[name]["seconds"] >= 0, name
        assert phases[name]["floor_s"] is not None and phases[name]["floor_s"] >= 0, name
    for name in FLOORED + ("step",):
        p = phases[name]
        assert p["seconds"] > 0 and p["floor_s"] > 0, name
        assert p["vs_floor"] == pytest.approx(p["seconds"] / p["floor_s"]), name
    # The step's floor is the sum of its phases' floors.
    assert phases["step"]["floor_s"] == pytest.approx(sum(phases[n]["floor_s"] for n in RL_PHASES), rel=1e-6)

    t = result["throughput"]
    for key in ("tokens_per_s_per_device", "generate_tokens_per_s", "generate_floor_tokens_per_s", "mfu",
                "weight_sync_gb_per_s"):
        assert t[key] > 0, key
    # ignore_eos: every response is exactly the workload's length
    assert t["response_length_mean"] == t["response_length_max"] == result["workload"]["response_len"]
    assert result["measured_steps"] == result["workload"]["steps"] - result["workload"]["warmup"]
    assert len(result["steps"]) == result["workload"]["steps"]
    assert all("efficiency/step_vs_floor" in row for row in result["steps"])
    env = result["environment"]
    assert env["date"] and env["versions"]["torch"] and env["versions"]["vllm"]
    assert result["memory"]["peak_gb"] > 0
    assert (work / "bench_inputs.json").is_file()


def test_trl_runs_the_same_workload_beside_ours(grpo_tiny):
    """``benchmarks.bench_trl --from <work dir>``: TRL's GRPOTrainer on the same model and prompts, put beside ours."""
    work, _, _ = grpo_tiny
    proc = _run(TRL_BESIDE, work.parents[2], timeout=600)
    assert "TRL s" in proc.stdout and "TRL's speed" in proc.stdout
    result = json.loads((work / "result.json").read_text())
    peer = result["peer"]
    assert peer["name"] == "TRL" and peer["generation"] == "transformers generate"  # TRL's vLLM path: GPU only
    assert peer["speedup"] == pytest.approx(peer["phases"]["step"]["seconds"] / result["phases"]["step"]["seconds"])
    for name in ("generate", "train", "step"):
        assert peer["phases"][name]["seconds"] > 0 and peer["phases"][name]["floor_s"] > 0, name
    # Same work, same floor: the same prompts and response lengths against the same calibration.
    assert peer["phases"]["generate"]["floor_s"] == pytest.approx(result["phases"]["generate"]["floor_s"])
    assert peer["throughput"]["response_length_mean"] == result["workload"]["response_len"]


def test_rollout_modes_side_by_side(ray_cluster, tmp_path):
    """The README's rollout-mode command: each mode's step time beside serial (generate + rest + sync) and ideal
    (max(generate, rest) + sync) seconds. Speed is not asserted here (a noisy 2-core machine); what is: every
    mode ran the workload, one step off trained on samples one update old, async on samples at most one update
    old (its default max_staleness) and scored them off the step's path, and the sums are consistent."""
    for name in ("benchmarks", "rlhf_ray"):  # a clone of its own: its runs/bench/grpo-tiny is not grpo_tiny's
        (tmp_path / name).symlink_to(REPO / name)
    proc = _run(MODES_TINY, tmp_path, timeout=900, env={"RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address})
    work = tmp_path / "runs" / "bench" / "grpo-tiny-longtail"
    assert "== rollout modes" in proc.stdout and "one_step_off" in proc.stdout and "async" in proc.stdout
    result = json.loads((work / "result.json").read_text())
    modes = result["modes"]
    assert list(modes) == ["sync", "one_step_off", "async"] and result["reward_delay_s"] == 1.0
    assert modes["sync"]["staleness_mean"] == 0 and modes["one_step_off"]["staleness_mean"] == 1
    assert modes["async"]["staleness_max"] <= 1
    for name, m in modes.items():
        # The reward's 1 s a step is on every step's path but async's, where groups are scored as they finish.
        assert (m["rest_s"] >= 1.0) == (name != "async") and (m["score_s"] >= 1.0) == (name == "async"), (name, m)
        assert m["serial_s"] == pytest.approx(m["generate_s"] + m["score_s"] + m["rest_s"] + m["weight_sync_s"])
        assert m["ideal_s"] == pytest.approx(max(m["generate_s"], m["score_s"], m["rest_s"]) + m["weight_sync_s"])
    assert (work / "run-one_step_off" / "metrics.jsonl").is_file() and (work / "run-async" / "metrics.jsonl").is_file()


def test_calibrate_command(scratch):
    proc = _run(CALIBRATE, scratch, timeout=300)
    assert re.match(r"cpu .* float32 \(\d+ threads\): matmul [\d.e+-]+ TFLOP/s at n=1024, memory [\d.e+-]+ GB/s",
                    proc.stdout), proc.stdout


@pytest.mark.parametrize("job", ["grpo", "ppo"])
def test_gpu_rl_configs_validate(job, tmp_path):
    """The one-GPU workloads (not runnable here) load and validate: hybrid placement, the fast engine settings."""
    from benchmarks.bench_rl import rl_config_values
    from benchmarks.common import WORKLOADS
    from rlhf_ray.config import load_config

    w = WORKLOADS["gpu"]
    cfg = load_config(values=rl_config_values(job, w, tmp_path / "m", tmp_path / "p.jsonl", tmp_path / "out",
                                              tmp_path / "rm" if job == "ppo" else None))
    assert cfg.placement.mode == "hybrid" and cfg.rollout.max_num_seqs == 1024
    assert cfg.rollout.engine_kwargs == {"compilation_config": {"max_cudagraph_capture_size": 1024}}
    assert cfg.rollout.gpu_memory_utilization == 0.85 and cfg.rollout.max_new_tokens == 1024
    assert cfg.algo.prompts_per_step * cfg.rollout.n_samples == 2048 and cfg.data.max_prompt_length == 256


@pytest.mark.parametrize("job", ["sft", "dpo"])
def test_gpu_offline_configs_validate(job, tmp_path):
    from benchmarks.bench_offline import offline_config_values
    from benchmarks.common import OFFLINE_WORKLOADS
    from rlhf_ray.config import load_config

    cfg = load_config(values=offline_config_values(job, OFFLINE_WORKLOADS["gpu"], tmp_path / "m",
                                                   tmp_path / "rows.jsonl", tmp_path / "out"))
    assert cfg.learner.gpus_per_worker == 1 and cfg.data.max_length == 1280


def test_gpu_targets():
    from benchmarks.common import evaluate_targets

    result = {"phases": {"step": {"vs_floor": 1.5}, "weight_sync": {"seconds": 1.2}},
              "throughput": {"generate_fraction_of_floor_rate": 0.6, "mfu": 0.3}, "peer": {"speedup": 2.0}}
    met = {name: t["met"] for name, t in evaluate_targets(result).items()}
    assert met == {"step within 2x of the summed floors": True, "generation >= 50% of its floor rate": True,
                   "training >= 40% MFU": False, "weight sync < 1 s": False,
                   "faster than TRL (TRL step / ours)": True}
