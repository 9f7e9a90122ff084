"""What the RL jobs (ppo, grpo) share: prompts from the data set and ``RLLoop`` as the body of the job front.

Thin on purpose: ``rlhf_ray.jobs.front.run_job`` does resolve -> place -> start -> run -> teardown; the
algorithm itself reads top to bottom in ``rlhf_ray.controller.rl_loop.RLLoop.step``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from rlhf_ray.config import Config
from rlhf_ray.jobs.front import Job, JobContext, run_job

log = logging.getLogger(__name__)


def prepare_data(cfg: Config, tokenizer) -> tuple[Any, Any, dict]:
    """Training and evaluation prompts (token ids + row fields for the rewards), and the reward functions (and a
    multi-turn run's environment or tools) loaded once, so that bad data or a bad spec fails before any GPU is
    reserved."""
    from rlhf_ray.controller.reward_scoring import build_function_reward
    from rlhf_ray.data.prompts import tokenize_prompts
    from rlhf_ray.data.sources import load_rows, split_eval

    build_function_reward(cfg.reward)
    if cfg.rollout.multi_turn:
        from rlhf_ray.agentic.episodes import build_env
        from rlhf_ray.agentic.turns import ChatTurns

        build_env(cfg.rollout, tokenizer)
        ChatTurns(tokenizer)  # a tokenizer without a usable chat template fails here

    rows = load_rows(cfg.data)
    train_rows, eval_rows = split_eval(rows, cfg.data, seed=cfg.train.seed)
    train = tokenize_prompts(train_rows, tokenizer, cfg.data)
    evaluation = tokenize_prompts(eval_rows, tokenizer, cfg.data) if eval_rows is not None and len(eval_rows) else None
    counts = {"rows": len(rows), **train.counts()}
    if evaluation is not None:
        counts["eval_prompts"] = len(evaluation)
    return train, evaluation, counts


def rl_job(loop_cls: Optional[type] = None) -> Job:
    """The RL job (ppo, grpo) run by ``loop_cls`` (default ``RLLoop``; benchmarks pass a subclass)."""
    def body(ctx: JobContext) -> dict[str, Any]:
        from rlhf_ray.controller.rl_loop import RLLoop

        loop = (loop_cls or RLLoop)(ctx.resolved, ctx.roles, ctx.schedule, ctx.train, ctx.evaluation, ctx.tokenizer,
                                    ctx.output_dir, ctx.recoveries)
        return loop.run()

    return Job(prepare_data, body)


JOB = rl_job()


def run(cfg: Config, loop_cls: Optional[type] = None) -> dict[str, Any]:
    """Run the RL job ``cfg`` describes with ``loop_cls`` (default ``RLLoop``); returns paths and last metrics."""
    return run_job(cfg, rl_job(loop_cls))
