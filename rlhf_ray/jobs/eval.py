"""Evaluate a model on a prompt set with the training rewards: mean reward, pass@k, maj@k, response length.

The model (``model.path``: a hub name, a local directory, or a run's ``final/``) is loaded into
``rollout.num_engines`` vLLM engines (Ray actors, ``rollout.tensor_parallel_size`` GPUs each; no learner is
started). Each prompt gets ``rollout.n_samples`` samples at ``rollout.temperature`` (``eval.n_samples`` and
``eval.temperature`` override them; ``Resolved.evaluation`` holds what was resolved), and with ``eval.greedy`` one
greedy response too, scored by the ``reward`` section exactly as a training run scores its rollouts (functions,
HTTP endpoints, a reward model). The prompt set is the config's held-out prompts when it has them
(``data.eval_path`` or ``data.eval_fraction``: what a training run with the config evaluates on), else every prompt
of ``data.path``; prompts go to the engines ``algo.prompts_per_step`` at a time.

Writes to ``train.output_dir``: ``eval.json`` (settings and numbers; ``rlhf_ray.evaluation.summary``),
``eval_samples.jsonl`` (every sample, its reward, correctness and vote) and one ``metrics.jsonl`` row (step 0,
``eval/`` keys); ``rlhf-ray eval`` prints the table. pass@k is the unbiased estimator of Chen et al. (2021) and
maj@k the majority vote over k samples (``rlhf_ray.evaluation.metrics``).

Launch:
    rlhf-ray eval examples/eval_tiny_cpu.yaml
    rlhf-ray eval examples/eval_tiny_cpu.yaml model.path=runs/grpo-tiny/final train.output_dir=runs/grpo-tiny-eval
    rlhf-ray eval examples/grpo_tiny_cpu.yaml model.path=runs/grpo-tiny/final train.output_dir=runs/grpo-tiny-eval \
        rollout.n_samples=4 eval.ks=[1,4]        # any config: its model, prompts and rewards, as job eval
    ray job submit --working-dir . -- python -m rlhf_ray eval examples/eval_tiny_cpu.yaml
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from rlhf_ray.config import Config
from rlhf_ray.jobs import rl
from rlhf_ray.jobs.front import Job, JobContext, run_job

log = logging.getLogger(__name__)

EVAL_FILE = "eval.json"
SAMPLES_FILE = "eval_samples.jsonl"


def prepare_data(cfg: Config, tokenizer) -> tuple[Any, Any, dict]:
    """The prompt set (see the module docstring), checked: ``builtin:math`` needs every row's reference answer."""
    from rlhf_ray.data.errors import DataError

    train, evaluation, counts = rl.prepare_data(cfg, tokenizer)
    prompts = evaluation if evaluation is not None else train
    if "builtin:math" in [f.strip() for f in cfg.reward.functions]:
        missing = next((p for p in prompts if p.fields.get("answer") is None), None)
        if missing is not None:  # caught here, before an engine starts, not as a reward error mid-run
            raise DataError(f"{missing.location}: has no '{cfg.data.answer_field}' field (data.answer_field), the "
                            "reference answer builtin:math grades against; set data.answer_field to the field "
                            "that holds it")
    return prompts, None, {**counts, "eval_prompts": len(prompts)}


def sample_and_score(ctx: JobContext, scorer: Any, spec: Any):
    """Every prompt of the set sampled ``spec.n`` times and scored; returns (``SampleSet``, generate s, reward s)."""
    from rlhf_ray.controller.reward_scoring import attach_prompts, score_batch
    from rlhf_ray.evaluation.summary import SampleSet

    prompts, chunk = ctx.train, ctx.resolved.config.algo.prompts_per_step
    samples, generate_s, reward_s = SampleSet(), 0.0, 0.0
    for start in range(0, len(prompts), chunk):
        part = [prompts[i] for i in range(start, min(start + chunk, len(prompts)))]
        t0 = time.perf_counter()
        batch, _ = ctx.roles.rollout.generate([p.prompt_ids for p in part], spec, ctx.tokenizer.pad_token_id)
        t1 = time.perf_counter()
        metrics = score_batch(scorer, batch, attach_prompts(batch, part))
        reward_s += time.perf_counter() - t1
        generate_s += t1 - t0
        samples.add_batch(batch, metrics, offset=start)
    return samples, generate_s, reward_s


def evaluate(ctx: JobContext) -> dict[str, Any]:
    """The job's body: sample, score, count; writes eval.json, eval_samples.jsonl and the metrics row."""
    from rlhf_ray.config import to_dict
    from rlhf_ray.controller.reward_scoring import RewardScorer
    from rlhf_ray.engines.rollout_engine import SamplingSpec
    from rlhf_ray.evaluation.summary import eval_document, sample_rows, summarize
    from rlhf_ray.metrics import MetricsLogger

    cfg, out = ctx.resolved.config, ctx.output_dir
    settings = ctx.resolved.evaluation
    assert settings is not None
    scorer = RewardScorer.from_resolved(ctx.resolved, ctx.roles.reward_model, ctx.tokenizer,
                                        ctx.roles.get("judge"))
    spec = SamplingSpec.from_config(cfg.rollout, n=settings.n, temperature=settings.temperature)
    sampled, generate_s, reward_s = sample_and_score(ctx, scorer, spec)
    sampled_numbers = summarize(sampled, settings, settings.ks)
    greedy, greedy_numbers = None, None
    if settings.greedy:
        greedy, g_gen, g_rew = sample_and_score(ctx, scorer, dataclasses.replace(spec, n=1, temperature=0.0))
        greedy_numbers = summarize(greedy, settings, ())
        generate_s, reward_s = generate_s + g_gen, reward_s + g_rew
    seconds = {"generate": generate_s, "reward": reward_s}
    reward = {"functions": list(cfg.reward.functions), "weights": list(cfg.reward.weights),
              "model": ctx.resolved.paths.reward_model}
    doc = eval_document(ctx.resolved.paths.model, cfg.data.path, len(ctx.train), settings, reward, sampled_numbers,
                        greedy_numbers, seconds)

    texts = [p.prompt_text for p in ctx.train]
    rows = sample_rows(sampled, settings, texts, False) + (sample_rows(greedy, settings, texts, True) if greedy else [])
    _write_atomic(out / SAMPLES_FILE, "".join(json.dumps(r) + "\n" for r in rows))
    _write_atomic(out / EVAL_FILE, json.dumps(doc, indent=2) + "\n")
    flat = {f"eval/{k}": v for k, v in sampled_numbers.items()}
    flat.update({f"eval/greedy/{k}": v for k, v in (greedy_numbers or {}).items()})
    flat.update({"timing/generate_s": generate_s, "timing/reward_s": reward_s})
    logger = MetricsLogger(cfg.logging, out, 1, {**to_dict(cfg), "resolved": ctx.resolved.to_dict()}, job=cfg.job)
    logger.log(0, flat)  # step 0: the model as given, before any optimizer step
    logger.close()
    log.info("eval of %d prompts x %d samples written to %s: reward %.4f, %s", len(ctx.train), settings.n,
             out / EVAL_FILE, sampled_numbers["reward_mean"],
             ", ".join(f"pass@{k} {sampled_numbers[f'pass@{k}']:.4f}" for k in settings.ks))
    return {"output_dir": str(out), "eval_path": str(out / EVAL_FILE), "eval": doc, "metrics": flat}


def _write_atomic(path: Path, text: str) -> None:
    """Write beside and rename: a crash never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


JOB = Job(prepare_data, evaluate, trains=False)


def run(cfg: Config) -> dict[str, Any]:
    """Evaluate the model ``cfg`` names; returns the output paths, the ``eval.json`` document and the metrics."""
    return run_job(cfg, JOB)
