"""SFT and DPO throughput through our real offline loop (``rlhf_ray.jobs.<job>.run``, what ``rlhf-ray train``
runs), each step beside its floor (3 forward FLOPs per token / the measured matmul rate, plus the AdamW
step's memory traffic), with the device calibrated before and after the run (the faster reading of each rate).

Fixed shapes: every SFT row is ``prompt_len`` prompt tokens + ``response_len`` response tokens (the last one
EOS); every DPO pair is a prompt with a chosen and a rejected completion of ``response_len`` tokens each,
trained as two sequences. Lengths are checked through the job's own data pipeline. DPO's reference
log-probs are precomputed once before the first step (``dpo.reference: precompute``) and are not in the
step times.

    python benchmarks/bench_offline.py --job sft --tiny       # CPU, minutes: the format and plumbing
    python benchmarks/bench_offline.py --job dpo --tiny
    python benchmarks/bench_offline.py --job sft --gpu        # one GPU: Qwen2.5-0.5B, 64 x (256 + 1024) tokens
    python benchmarks/bench_offline.py --job dpo --gpu learner.micro_batch_size=4
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`: the repository root importable, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (OFFLINE_WORKLOADS, MemorySampler, Workload, best_calibration, default_json_path,
                               environment, pick_workload, prepare_model, random_texts, render_table, run_calibration,
                               setup_logging, summarize, write_jsonl, write_result)

log = logging.getLogger("benchmarks.bench_offline")


def offline_config_values(job: str, w: Workload, model_dir: Path, data: Path, out_dir: Path) -> dict[str, Any]:
    v: dict[str, Any] = {
        "job": job, "model.path": str(model_dir), "data.path": str(data), "data.apply_chat_template": False,
        "data.shuffle": False, "data.max_length": w.prompt_len + w.response_len,
        "data.max_prompt_length": w.prompt_len, "data.overlength": "error",
        "learner.num_workers": 1, "learner.micro_batch_size": w.micro_batch,
        "learner.global_batch_size": w.prompts, "learner.zero_stage": 2,
        "optim.lr": 1e-6, "optim.schedule": "constant", "train.max_steps": w.steps, "train.seed": w.seed,
        "train.output_dir": str(out_dir), "train.overwrite": True, "train.timeout_s": 1800,
        "logging.tensorboard": False, "logging.progress_bar": False,
    }
    if w.on_gpu:
        v.update({"model.dtype": "bfloat16", "learner.gpus_per_worker": 1})
    else:
        v.update({"model.dtype": "float32", "learner.gpus_per_worker": 0, "ray.num_cpus": 4})
    return v


def write_rows(job: str, w: Workload, path: Path) -> Path:
    """Rows whose token lengths are exact: one character per token, the response's last token the EOS the
    pipeline appends (so ``response_len - 1`` characters)."""
    n = w.prompts * w.steps
    prompts = random_texts(n, w.prompt_len, w.seed)
    first = random_texts(n, w.response_len - 1, w.seed + 1)
    if job == "sft":
        return write_jsonl(path, [{"prompt": p, "response": r} for p, r in zip(prompts, first)])
    second = random_texts(n, w.response_len - 1, w.seed + 2)
    return write_jsonl(path, [{"prompt": p, "chosen": a, "rejected": b} for p, a, b in zip(prompts, first, second)])


def sequence_lengths(job: str, cfg) -> list[int]:
    """Token lengths of every training sequence, from the job's own ``prepare_data``."""
    from rlhf_ray.jobs import get_job
    from rlhf_ray.config import resolve
    from rlhf_ray.jobs.common import load_tokenizer

    train, _, _ = get_job(job).prepare_data(cfg, load_tokenizer(resolve(cfg)))
    if job == "sft":
        return [len(ex["input_ids"]) for ex in train]
    return [len(ex[side]["input_ids"]) for ex in train for side in ("chosen", "rejected")]


def with_efficiency(rows: list[dict], lengths_per_step: list[int], policy, calibration: dict, on_gpu: bool,
                    cfg) -> list[dict]:
    """Each step's floor: the whole step is the learners' train phase (the offline loop logs ``timing/step_s``)."""
    from rlhf_ray.efficiency import StepCounts, efficiency_metrics

    lc = cfg.learner
    devices = {"train": lc.num_workers * lc.gpus_per_worker} if on_gpu else {}
    out = []
    for r in rows:
        if "timing/step_s" not in r:  # the step-0 evaluation row
            continue
        timings = {"timing/train_s": r["timing/step_s"], "timing/step_s": r["timing/step_s"]}
        counts = StepCounts.offline(lengths_per_step, devices=devices)
        out.append({**r, **timings, **efficiency_metrics(timings, counts, policy, calibration)})
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--job", choices=["sft", "dpo"], default="sft")
    size = p.add_mutually_exclusive_group(required=True)
    size.add_argument("--tiny", action="store_true")
    size.add_argument("--gpu", action="store_true")
    p.add_argument("--shape", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--work-dir", type=Path, default=None)
    p.add_argument("--model-cache", type=Path, default=Path("runs") / "bench-models")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = p.parse_args(argv)
    setup_logging()

    from rlhf_ray.config import load_config, to_dict
    from rlhf_ray.efficiency import ModelShape
    from rlhf_ray.jobs import get_job
    from rlhf_ray.metrics import read_metrics

    w = pick_workload(OFFLINE_WORKLOADS, "gpu" if args.gpu else "tiny", args.shape, False, args.steps)
    work = (args.work_dir or Path("runs") / "bench" / f"{args.job}-{w.label}").absolute()
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    device = "cuda" if w.on_gpu else "cpu"
    before = run_calibration(work / "calibration_before.json", device)
    model_dir = prepare_model(w, args.model_cache.absolute())
    data = write_rows(args.job, w, work / "rows.jsonl")
    cfg = load_config(values=offline_config_values(args.job, w, model_dir, data, work / "run"),
                      overrides=args.overrides)
    lengths = sequence_lengths(args.job, cfg)
    expected = w.prompt_len + w.response_len
    if set(lengths) != {expected}:
        raise RuntimeError(f"benchmark sequences must be {expected} tokens; the pipeline gave {sorted(set(lengths))}")
    per_step = [expected] * (cfg.learner.global_batch_size * (2 if args.job == "dpo" else 1))

    with MemorySampler(w.on_gpu) as mem:
        get_job(args.job).run(cfg)
    import ray

    ray.shutdown()
    calibration = best_calibration([before, run_calibration(work / "calibration_after.json", device)])
    rows = with_efficiency(read_metrics(work / "run" / "metrics.jsonl"), per_step, ModelShape.from_hf_config(model_dir),
                           calibration, w.on_gpu, cfg)
    sequences = f"{len(per_step)} sequences ({w.prompts} pairs x 2)" if args.job == "dpo" else f"{len(per_step)} rows"
    result = {
        "job": args.job, "workload": w.__dict__,
        "workload_text": (f"{w.shape} ({w.arch}), {sequences} per step of {w.prompt_len} + {w.response_len} tokens, "
                          f"{w.steps - w.warmup} measured steps after {w.warmup} warm-up"),
        "label": ("GPU result" if w.on_gpu else
                  "CPU --tiny run: checks the format and plumbing; NOT a GPU or performance result"),
        "environment": environment(), "calibration": calibration, **summarize(rows, w.warmup),
        "memory": mem.result(), "config": {"learner": to_dict(cfg.learner)}, "overrides": args.overrides,
        "steps": rows, "wall_s": time.perf_counter() - t0,
    }
    path = write_result(result, args.json or default_json_path(args.job, w, calibration["device_name"]))
    print(render_table(result))
    print(f"result: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
