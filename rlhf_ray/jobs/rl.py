"""What the RL jobs (ppo, grpo) share: prompts from the data set, placement, starting the roles, the loop.

Thin on purpose: parse -> place -> start -> ``RLLoop.run()`` -> clean up. The algorithm itself reads
top to bottom in ``rlhf_ray.controller.rl_loop.RLLoop.step``.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from rlhf_ray.config import Config

log = logging.getLogger(__name__)


def prepare_data(cfg: Config, tokenizer) -> tuple[Any, Any, dict]:
    """Training and evaluation prompts (token ids + row fields for the rewards), and the reward functions
    loaded once, so that bad data or a bad reward spec fails before any GPU is reserved."""
    from rlhf_ray.controller.reward_scoring import build_function_reward
    from rlhf_ray.data.prompts import tokenize_prompts
    from rlhf_ray.data.sources import load_rows, split_eval

    build_function_reward(cfg.reward)

    rows = load_rows(cfg.data)
    train_rows, eval_rows = split_eval(rows, cfg.data, seed=cfg.train.seed)
    train = tokenize_prompts(train_rows, tokenizer, cfg.data)
    evaluation = tokenize_prompts(eval_rows, tokenizer, cfg.data) if eval_rows is not None and len(eval_rows) else None
    counts = {"rows": len(rows), **train.counts()}
    if evaluation is not None:
        counts["eval_prompts"] = len(evaluation)
    return train, evaluation, counts


def sync_mode(cfg: Config, on_gpu: bool) -> str:
    """The weight-sync transport ``rollout.weight_sync_backend: auto`` resolves to, given where the roles run."""
    if cfg.rollout.weight_sync_backend != "auto":
        if cfg.rollout.weight_sync_backend in ("nccl", "ipc") and not on_gpu:
            from rlhf_ray.config import ConfigError

            raise ConfigError(f"rollout.weight_sync_backend: {cfg.rollout.weight_sync_backend} needs CUDA learners; "
                              "these run on CPU (use auto or gloo)")
        return cfg.rollout.weight_sync_backend
    if not on_gpu:
        return "gloo"
    return "ipc" if cfg.placement.mode == "hybrid" else "nccl"


def run(cfg: Config, loop_cls: Optional[type] = None) -> dict[str, Any]:
    """Run the RL job ``cfg`` describes with ``loop_cls`` (default ``RLLoop``); returns paths and last metrics."""
    from rlhf_ray.controller.cluster import init_ray, node_resources
    from rlhf_ray.controller.placement import check_plan, remove_pools
    from rlhf_ray.controller.rl_loop import RLLoop, batch_shape
    from rlhf_ray.controller.rl_roles import make_plan, start_rl_roles
    from rlhf_ray.jobs.common import check_paths, load_tokenizer, prepare_output_dir

    check_paths(cfg)
    tokenizer = load_tokenizer(cfg)
    prompts, eval_prompts, counts = prepare_data(cfg, tokenizer)
    output_dir = prepare_output_dir(cfg)

    plan = make_plan(cfg)
    resources = init_ray(cfg.ray)
    check_plan(plan, resources, node_resources())
    log.info(plan.describe())
    _, _, updates = batch_shape(cfg)
    roles = None
    try:
        roles = start_rl_roles(cfg, plan, cfg.algo.total_steps * updates, output_dir)
        roles.rollout.init_sync(roles.actor, sync_mode(cfg, roles.on_gpu), roles.rollout.group.facts[0]["dtype"],
                                cfg.rollout.weight_sync_bucket_mb, cfg.rollout.tensor_parallel_size)
        result = (loop_cls or RLLoop)(cfg, roles, prompts, eval_prompts, tokenizer, output_dir).run()
    finally:
        if roles is not None:
            roles.kill()
            remove_pools(roles.pools)
    result["data"] = counts
    return result
