"""GRPO and PPO throughput through our real RL path (``rlhf_ray.jobs.rl.run``, what ``rlhf-ray train`` runs),
each phase beside its physical floor measured in the same run, optionally beside TRL's GRPOTrainer.

Steps: calibrate the device (subprocess) -> write the workload's model (random init, real shape) and prompts
(exact token lengths, checked through the job's own data pipeline) -> run the job with a loop that records
each step's token counts -> calibrate again, keep each rate's faster reading -> every step's phases beside
their floors (``rlhf_ray.efficiency.efficiency_metrics``) -> (``--with-trl``) the same workload, same weights
and prompts, through TRL, against the same calibration -> table on stdout, JSON file.

    python benchmarks/bench_rl.py --job grpo --tiny              # CPU, a few minutes: the format and plumbing
    python benchmarks/bench_rl.py --job ppo --tiny
    python benchmarks/bench_rl.py --job grpo --gpu --with-trl    # one GPU: Qwen2.5-0.5B, 256 x 8, 256 + 1024
    python benchmarks/bench_rl.py --job grpo --gpu               # ours only; then, in the same session:
    python benchmarks/bench_trl.py --from runs/bench/grpo-gpu    # TRL on the same inputs, put beside ours
    python benchmarks/bench_rl.py --job grpo --gpu --long-tail   # lengths with a long tail instead of ignore_eos
    python benchmarks/bench_rl.py --job grpo --gpu rollout.max_num_seqs=512 learner.micro_batch_size=16  # tuning
    python benchmarks/bench_rl.py --job grpo --tiny --mode sync,one_step_off,async --reward-delay-s 1 --long-tail \
        rollout.max_staleness=1 rollout.partial=true             # rollout modes side by side: what overlap hides

Trailing ``key=value`` arguments are config overrides (as for ``rlhf-ray train``), for tuning runs.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`: the repository root importable, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (GPU_ENGINE, REPO, REWARD_SPEC, WORKLOADS, MemorySampler, Workload, attach_peer,
                               best_calibration, default_json_path, environment, evaluate_targets, overlap_summary,
                               pick_workload, prepare_model, random_texts, render_modes, render_table, run_calibration,
                               setup_logging, summarize, write_jsonl, write_result)
from benchmarks.reward import DELAY_ENV

MODES = ("sync", "one_step_off", "async")
SLOW_REWARD_SPEC = REWARD_SPEC.replace(":digit_fraction", ":slow_digit_fraction")

log = logging.getLogger("benchmarks.bench_rl")


def rl_config_values(job: str, w: Workload, model_dir: Path, data_path: Path, out_dir: Path,
                     rm_dir: Optional[Path]) -> dict[str, Any]:
    """The run's config (dotted keys): the workload's shapes on one GPU (hybrid placement) or on the CPU."""
    v: dict[str, Any] = {
        "job": job, "model.path": str(model_dir),
        "data.path": str(data_path), "data.apply_chat_template": False, "data.shuffle": False,
        "data.max_prompt_length": w.prompt_len, "data.overlength": "error",
        "learner.num_workers": 1, "learner.micro_batch_size": w.micro_batch,
        "rollout.num_engines": 1, "rollout.n_samples": w.samples, "rollout.max_new_tokens": w.response_len,
        "rollout.ignore_eos": not w.long_tail, "rollout.temperature": 1.0,
        "rollout.max_model_len": w.prompt_len + w.response_len,
        "reward.functions": [REWARD_SPEC], "reward.num_workers": 1,
        "algo.prompts_per_step": w.prompts, "algo.total_steps": w.steps, "algo.mini_batches": 1,
        "optim.lr": 1e-6, "optim.schedule": "constant",
        "train.output_dir": str(out_dir), "train.overwrite": True, "train.seed": w.seed, "train.timeout_s": 1800,
        "logging.tensorboard": False, "logging.progress_bar": False,
    }
    if job == "grpo":
        v.update({"algo.advantage": "grpo", "algo.kl_coef": 0.0})
    else:  # PPO: critic (GAE), reference (KL in the reward), reward model + function
        v.update({"algo.advantage": "gae", "algo.kl_coef": 0.05, "algo.kl_in": "reward", "algo.kl_estimator": "k1",
                  "critic.num_workers": 1})
        if rm_dir is not None:
            v["reward.model"] = str(rm_dir)
    if w.on_gpu:
        v.update({"model.dtype": "bfloat16", "learner.gpus_per_worker": 1, "learner.zero_stage": 2,
                  "reward.gpus_per_worker": 1, "placement.mode": "hybrid", **GPU_ENGINE})
    else:
        v.update({"model.dtype": "float32", "learner.gpus_per_worker": 0, "reward.gpus_per_worker": 0,
                  "learner.zero_stage": 2, "rollout.enforce_eager": True, "ray.num_cpus": 8})
    return v


def bench_loop_class(sink: list, policy, critic, reward_model):
    """``RLLoop`` that appends each step's ``StepCounts`` (from its ``RolloutBatch`` and resolved config) to ``sink``.

    The floors are computed after the run, with the calibration taken before and after it (the faster reading
    of each rate: on a shared machine a slower one is interference). This is also the wiring proposed for
    ``RLLoop`` itself: ``efficiency_metrics(metrics, rl_step_counts(batch, ...), ...)`` at the end of a step.
    """
    from rlhf_ray.controller.rl_loop import RLLoop
    from rlhf_ray.efficiency import rl_step_counts

    class BenchLoop(RLLoop):
        def rollout_batch(self, step, timer):
            out = super().rollout_batch(step, timer)
            self.bench_batch = out[0]
            return out

        def step(self, step: int) -> dict[str, float]:
            metrics = super().step(step)
            sink.append(rl_step_counts(self.bench_batch, self.resolved, metrics["weight_sync/bytes"],
                                       policy, critic, reward_model))
            return metrics

    return BenchLoop


def prepare(job: str, w: Workload, work: Path, cache: Path) -> tuple[Path, Path, Optional[Path]]:
    """Model(s) and the prompt file; every prompt is checked to be exactly ``prompt_len`` tokens."""
    model_dir = prepare_model(w, cache)
    rm_dir = prepare_model(w, cache, reward_model=True) if job == "ppo" else None
    texts = random_texts(w.prompts * max(1, w.steps), w.prompt_len, w.seed)
    data = write_jsonl(work / "prompts.jsonl", [{"prompt": t} for t in texts])
    return model_dir, data, rm_dir


def check_prompt_lengths(cfg, w: Workload) -> None:
    from rlhf_ray.config import resolve
    from rlhf_ray.jobs.common import load_tokenizer
    from rlhf_ray.jobs.rl import prepare_data

    prompts, _, _ = prepare_data(cfg, load_tokenizer(resolve(cfg)))
    lengths = {len(p.prompt_ids) for p in prompts}
    if lengths != {w.prompt_len}:
        raise RuntimeError(f"benchmark prompts must be {w.prompt_len} tokens each; the pipeline gave {sorted(lengths)}")


def run_ours(job: str, w: Workload, model_dir: Path, data: Path, rm_dir: Optional[Path], out_dir: Path,
             overrides: list[str]) -> tuple[list[dict], list, dict, dict]:
    """Our job on the workload: its metrics rows, each step's ``StepCounts``, the shapes and the resolved config."""
    from rlhf_ray.config import load_config, to_dict
    from rlhf_ray.efficiency import ModelShape
    from rlhf_ray.jobs import rl
    from rlhf_ray.metrics import read_metrics

    cfg = load_config(values=rl_config_values(job, w, model_dir, data, out_dir, rm_dir), overrides=overrides)
    check_prompt_lengths(cfg, w)
    shapes = {"policy": ModelShape.from_hf_config(model_dir)}
    shapes["critic"] = shapes["policy"].with_head(1) if job == "ppo" else None
    shapes["reward_model"] = ModelShape.from_hf_config(rm_dir, head="sequence_score") if rm_dir is not None else None
    counts: list = []
    rl.run(cfg, bench_loop_class(counts, shapes["policy"], shapes["critic"], shapes["reward_model"]))
    return read_metrics(out_dir / "metrics.jsonl"), counts, shapes, to_dict(cfg)


def run_trl(work: Path) -> dict:
    """TRL's GRPOTrainer on the same workload (``benchmarks.bench_trl``), in its own process, after our Ray
    cluster is gone; returns its result (the ``peer`` section)."""
    subprocess.run([sys.executable, "-m", "benchmarks.bench_trl", "--from", str(work), "--no-merge"], cwd=REPO,
                   check=True)
    return json.loads((work / "trl.json").read_text())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=["grpo", "ppo"], default="grpo")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true", help="tiny model on CPU, minutes (format and plumbing check)")
    size.add_argument("--gpu", action="store_true", help="the GPU workload (Qwen2.5-0.5B, 256 x 8, 256 + 1024)")
    p.add_argument("--shape", default=None, help="model shape instead of the workload's: qwen2.5-1.5b, qwen2.5-7b")
    p.add_argument("--long-tail", action="store_true", help="responses stop at EOS with a long-tailed length")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--with-trl", action="store_true", help="also run TRL's GRPOTrainer on the same workload")
    p.add_argument("--work-dir", type=Path, default=None, help="run directory (default runs/bench/<job>-<workload>)")
    p.add_argument("--model-cache", type=Path, default=Path("runs") / "bench-models")
    p.add_argument("--json", type=Path, default=None, help="result file (GPU default: benchmarks/results/...)")
    p.add_argument("--mode", default="sync",
                   help=f"rollout modes to run side by side, comma-separated ({', '.join(MODES)}); the first is the "
                        "main result")
    p.add_argument("--reward-delay-s", type=float, default=0.0,
                   help="a reward that waits this long per step's batch (a remote verifier; spread over its samples, "
                        "so scoring group by group costs the same): what overlap can hide on CPU")
    p.add_argument("overrides", nargs="*", help="config overrides key=value, e.g. rollout.max_num_seqs=512")
    args = p.parse_args(argv)
    setup_logging()
    if args.with_trl and args.job != "grpo":
        p.error("--with-trl compares GRPO (TRL's GRPOTrainer)")
    modes = args.mode.split(",")
    if any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        p.error(f"--mode: a comma-separated list of distinct modes from {', '.join(MODES)}; got {args.mode!r}")
    if args.gpu and modes != ["sync"]:
        p.error("--mode: the GPU workload runs on one GPU in hybrid placement, where generation and training "
                "time-share it; overlapping modes need the engines on their own GPUs")
    overrides = list(args.overrides)
    w = pick_workload(WORKLOADS, "gpu" if args.gpu else "tiny", args.shape, args.long_tail, args.steps)
    if args.reward_delay_s > 0:
        os.environ[DELAY_ENV] = str(args.reward_delay_s / w.sequences)
        overrides.append(f"reward.functions=[{SLOW_REWARD_SPEC}]")
    work = (args.work_dir or Path("runs") / "bench" / f"{args.job}-{w.label}").absolute()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = "cuda" if w.on_gpu else "cpu"
    before = run_calibration(work / "calibration_before.json", device)
    model_dir, data, rm_dir = prepare(args.job, w, work, args.model_cache.absolute())

    with MemorySampler(w.on_gpu) as mem:
        rows, counts, shapes, config = run_ours(args.job, w, model_dir, data, rm_dir, work / "run",
                                                overrides + [f"rollout.mode={modes[0]}"])
    mode_summaries = {modes[0]: overlap_summary(rows, w.warmup)}
    for mode in modes[1:]:
        other, _, _, _ = run_ours(args.job, w, model_dir, data, rm_dir, work / f"run-{mode}",
                                  overrides + [f"rollout.mode={mode}"])
        mode_summaries[mode] = overlap_summary(other, w.warmup)
    import ray

    ray.shutdown()
    calibration = best_calibration([before, run_calibration(work / "calibration_after.json", device)])
    cal_json = work / "calibration.json"
    cal_json.write_text(json.dumps(calibration, indent=2) + "\n")
    if len(rows) != len(counts):
        raise RuntimeError(f"{len(rows)} metrics rows but {len(counts)} steps counted")
    from rlhf_ray.efficiency import efficiency_metrics

    for row, c in zip(rows, counts):
        row.update(efficiency_metrics(row, c, shapes["policy"], calibration, shapes["critic"], shapes["reward_model"]))
    summary = summarize(rows, w.warmup)
    result = {
        "job": args.job, "workload": w.__dict__, "workload_text": w.describe(),
        "label": ("GPU result" if w.on_gpu else
                  "CPU --tiny run: checks the format and plumbing; NOT a GPU or performance result"),
        "environment": environment(), "calibration": calibration, **summary, "memory": mem.result(),
        "engine_settings": {k: v for k, v in config["rollout"].items()
                            if k in ("max_num_seqs", "enforce_eager", "enable_prefix_caching", "enable_chunked_prefill",
                                     "gpu_memory_utilization", "engine_kwargs", "weight_sync_bucket_mb")},
        "overrides": overrides, "modes": mode_summaries, "reward_delay_s": args.reward_delay_s, "steps": rows,
    }
    if w.on_gpu:
        result["targets"] = evaluate_targets(result)
    path = args.json or default_json_path(args.job, w, calibration["device_name"])
    # What `python benchmarks/bench_trl.py --from <work dir>` needs to run TRL on this workload later.
    (work / "bench_inputs.json").write_text(json.dumps(
        {"job": args.job, "workload": w.__dict__, "model_dir": str(model_dir), "data": str(data),
         "calibration": str(cal_json), "result": str(path)}, indent=2) + "\n")
    if args.with_trl:
        attach_peer(result, run_trl(work))
    result["wall_s"] = time.perf_counter() - t0
    write_result(result, path)
    print(render_table(result))
    print(render_modes(mode_summaries))
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
