"""Best-of-N / rejection sampling: vLLM samples ``rollout.n_samples`` responses per prompt, a reward scores them,
and the best (``best_of_n.select: best``) or every response at or above ``best_of_n.threshold`` is written as an
SFT data set (JSONL rows ``prompt`` / ``response``, or ``messages`` for conversational prompts, plus ``reward``
and the row's other fields), ready for ``job: sft`` (``data.path`` = the written file).

Score statistics go to ``metrics.jsonl`` (one row): the mean reward of all samples (plain sampling), of the
selected ones, the best-of-n per prompt, and how many rows were written. Uses the RL jobs' rollout engines
and reward scoring; no learner is started. The output file is written to a temporary name and renamed.

Launch:
    rlhf-ray train examples/best_of_n_tiny_cpu.yaml
    rlhf-ray train examples/sft_tiny_cpu.yaml data.path=runs/best-of-n/best_of_n.jsonl   # then SFT on it
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

from rlhf_ray.config import Config
from rlhf_ray.jobs import rl
from rlhf_ray.jobs.front import Job, JobContext, run_job

log = logging.getLogger(__name__)

prepare_data = rl.prepare_data


def select(rewards: torch.Tensor, group_index: torch.Tensor, mode: str, threshold: float) -> list[int]:
    """Indices kept: per prompt the first highest-reward sample (best), or every sample >= threshold."""
    if mode == "threshold":
        return (rewards >= threshold).nonzero().flatten().tolist()
    kept = []
    for g in torch.unique(group_index, sorted=True).tolist():
        idx = (group_index == g).nonzero().flatten()
        kept.append(int(idx[int(torch.argmax(rewards[idx]))]))
    return kept


def output_row(prompt, response: str, reward: float, cfg: Config) -> dict[str, Any]:
    """One SFT row in the shape the data pipeline reads (prompt/response or messages), with the reward."""
    d = cfg.data
    if isinstance(prompt.prompt, list):
        row = {d.messages_field: list(prompt.prompt) + [{"role": "assistant", "content": response}]}
    else:
        row = {d.prompt_field: prompt.prompt, d.response_field: response}
    return {**prompt.fields, **row, "reward": reward}


def sample_and_select(ctx: JobContext) -> dict[str, Any]:
    """The job's body: sample every prompt, score, select, write the rows; returns paths and statistics."""
    from rlhf_ray.config import to_dict
    from rlhf_ray.controller.reward_scoring import RewardScorer, attach_prompts, score_batch
    from rlhf_ray.engines.rollout_engine import SamplingSpec
    from rlhf_ray.metrics import MetricsLogger

    cfg, prompts, roles, output_dir = ctx.resolved.config, ctx.train, ctx.roles, ctx.output_dir
    out_path = Path(cfg.best_of_n.output_path)
    out_path = out_path if out_path.is_absolute() else output_dir / out_path
    scorer = RewardScorer.from_resolved(ctx.resolved, roles.reward_model, ctx.tokenizer, roles.get("judge"))
    spec = SamplingSpec.from_config(cfg.rollout)
    chunk = cfg.algo.prompts_per_step
    all_rewards, best_rewards, kept_rewards, rows = [], [], [], []
    for start in range(0, len(prompts), chunk):
        part = [prompts[i] for i in range(start, min(start + chunk, len(prompts)))]
        batch, _ = roles.rollout.generate([p.prompt_ids for p in part], spec, ctx.tokenizer.pad_token_id)
        seq_prompts = attach_prompts(batch, part)
        score_batch(scorer, batch, seq_prompts)
        all_rewards.append(batch.rewards)
        best_rewards.append(batch.rewards[select(batch.rewards, batch.group_index, "best", 0.0)])
        kept = select(batch.rewards, batch.group_index, cfg.best_of_n.select, cfg.best_of_n.threshold)
        kept_rewards.append(batch.rewards[kept])
        rows += [output_row(seq_prompts[i], batch.responses[i], float(batch.rewards[i]), cfg) for i in kept]

    tmp = out_path.with_name(f".{out_path.name}.tmp")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row, default=str) + "\n")
    os.replace(tmp, out_path)
    sampled, best, kept = torch.cat(all_rewards), torch.cat(best_rewards), torch.cat(kept_rewards)
    stats = {"best_of_n/sampled_reward_mean": float(sampled.mean()),
             "best_of_n/best_reward_mean": float(best.mean()),
             "best_of_n/selected_reward_mean": float(kept.mean()) if len(kept) else float("nan"),
             "best_of_n/prompts": float(len(prompts)), "best_of_n/samples": float(len(sampled)),
             "best_of_n/rows_written": float(len(rows))}
    logger = MetricsLogger(cfg.logging, output_dir, 1, {**to_dict(cfg), "resolved": ctx.resolved.to_dict()},
                           job=cfg.job)
    logger.log(1, stats)
    logger.close()
    log.info("best-of-%d: %d rows -> %s (sampled mean reward %.3f, selected %.3f)", spec.n, len(rows), out_path,
             stats["best_of_n/sampled_reward_mean"], stats["best_of_n/selected_reward_mean"])
    return {"output_dir": str(output_dir), "output_path": str(out_path), "metrics": stats}


JOB = Job(prepare_data, sample_and_select, trains=False)


def run(cfg: Config) -> dict[str, Any]:
    """Sample, score, select and write; returns the output path and the score statistics."""
    return run_job(cfg, JOB)
