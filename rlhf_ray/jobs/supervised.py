"""The step loop shared by the offline jobs (SFT, reward model, DPO, KTO): one learner group, fixed data.

Read top to bottom: plan placement → start learners → (resume) → for each step: take the global
batch, split it into each rank's micro-batches, one optimizer step, log → evaluate / checkpoint →
export the final model. What differs between jobs is a ``SupervisedTask``: how examples become
micro-batch tensors, which learner objective runs, and how rank metrics reduce to step metrics.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from rlhf_ray.checkpoint import CheckpointDir
from rlhf_ray.config import Config, ConfigError, to_dict
from rlhf_ray.controller.cluster import init_ray, node_resources
from rlhf_ray.controller.groups import start_learner_group
from rlhf_ray.controller.placement import RoleRequest, check_plan, create_pools, plan_placement, remove_pools
from rlhf_ray.data.batching import iter_epoch_batches, shard_for_rank
from rlhf_ray.metrics import MetricsLogger

log = logging.getLogger(__name__)


@dataclass
class SupervisedTask:
    """What makes SFT, RM, DPO or KTO different inside the shared loop."""

    name: str
    objective: str
    """Name in ``rlhf_ray.engines.objectives.OBJECTIVES``."""
    head: str
    """Model head: causal_lm or sequence_score."""
    collate: Callable[[list[Any]], dict]
    """Examples of one micro-batch -> tensors."""
    objective_kwargs: Callable[[list[Any], Config], dict]
    """The whole global batch -> keyword arguments of the objective (e.g. the global token count)."""
    reduce: Callable[[list[dict]], dict[str, float]]
    """Per-rank metric sums -> step metrics with namespaced keys."""
    eval_prefix: str = "eval"


def _micro_batches(task: SupervisedTask, examples: Sequence[Any], batch: list[int], world: int,
                   micro: int) -> list[list[dict]]:
    """Each rank's list of collated micro-batches for one global batch of indices."""
    shards = shard_for_rank(batch, world, micro)
    return [[task.collate([examples[i] for i in mb]) for mb in rank_mbs] for rank_mbs in shards]


def run_supervised(cfg: Config, task: SupervisedTask, train: Sequence[Any], evaluation: Sequence[Any],
                   tokenizer_path: str, output_dir: Path) -> dict[str, Any]:
    """Train ``task`` on ``train`` with one learner group; returns the final metrics and paths."""
    lc, tc = cfg.learner, cfg.train
    G = lc.global_batch_size
    steps_per_epoch = len(train) // G
    if steps_per_epoch == 0:
        raise ConfigError(f"learner.global_batch_size: {G} is larger than the data set ({len(train)} examples)")
    dropped = len(train) - steps_per_epoch * G
    if dropped:
        log.info("%d examples per epoch do not fill a global batch and are left out of that epoch "
                 "(a different set each epoch when shuffling)", dropped)
    # max_steps overrides epochs (and may run past them; later epochs reshuffle).
    total_steps = tc.max_steps if tc.max_steps is not None else steps_per_epoch * tc.epochs

    # Placement is checked against the cluster before any actor starts.
    plan = plan_placement([RoleRequest("learner", lc.num_workers, lc.gpus_per_worker, lc.cpus_per_worker)])
    resources = init_ray(cfg.ray)
    check_plan(plan, resources, node_resources())
    log.info(plan.describe())
    pools = create_pools(plan, tc.timeout_s)
    try:
        return _train(cfg, task, train, evaluation, tokenizer_path, output_dir, pools, total_steps, steps_per_epoch)
    finally:
        remove_pools(pools)


def _train(cfg: Config, task: SupervisedTask, train: Sequence[Any], evaluation: Sequence[Any],
           tokenizer_path: str, output_dir: Path, pools: dict, total_steps: int,
           steps_per_epoch: int) -> dict[str, Any]:
    lc, tc = cfg.learner, cfg.train
    G = lc.global_batch_size
    group = start_learner_group("learner", cfg.model, cfg.optim, lc, total_steps, task.head, True, tc.seed,
                                tc.timeout_s, pools["learner"], list(range(lc.num_workers)))

    ckpt = CheckpointDir(output_dir, keep=tc.keep_checkpoints)
    start_step = 0
    if tc.resume and (latest := ckpt.latest()) is not None:
        states = group.call_all("load_state", str(latest))
        start_step = int(states[0]["step"])
        log.info("resumed from %s at step %d", latest, start_step)
    logger = MetricsLogger(cfg.logging, output_dir, total_steps, to_dict(cfg), start_step, job=task.name)

    def order(epoch: int) -> list[list[int]]:
        return list(iter_epoch_batches(len(train), G, tc.seed, epoch, cfg.data.shuffle))

    def save(step: int) -> Path:
        staging = ckpt.staging(step)
        group.call_all("save_state", str(staging), {"step": step})
        group.call_all("export_hf", str(staging / "model"), tokenizer_path)
        return ckpt.finalize(step, {"step": step, "epoch": step // steps_per_epoch,
                                    "batch_in_epoch": step % steps_per_epoch, "job": task.name})

    def evaluate() -> dict[str, float]:
        idx = list(range(len(evaluation)))
        # Whole micro-batches per rank; the remainder is evaluated too (uneven split is fine here).
        per_rank = [[task.collate([evaluation[i] for i in idx[s:s + lc.micro_batch_size]])
                     for s in range(r * lc.micro_batch_size, len(idx), lc.num_workers * lc.micro_batch_size)]
                    for r in range(lc.num_workers)]
        sums = group.call_split("evaluate", per_rank, task.objective,
                                task.objective_kwargs(list(evaluation), cfg))
        return {k.replace("train/", f"{task.eval_prefix}/"): v for k, v in task.reduce(sums).items()
                if k.startswith("train/")}

    cached_epoch, epoch_batches = -1, []
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != cached_epoch:
            cached_epoch, epoch_batches = epoch, order(epoch)
        batch = epoch_batches[pos]
        t0 = time.perf_counter()
        per_rank = _micro_batches(task, train, batch, lc.num_workers, lc.micro_batch_size)
        kwargs = task.objective_kwargs([train[i] for i in batch], cfg)
        results = group.call_split("train_step", per_rank, task.objective, kwargs)
        seconds = time.perf_counter() - t0
        metrics = task.reduce(results)
        tokens = sum(r["tokens"] for r in results)
        metrics.update({"train/lr": results[0]["lr"], "train/grad_norm": results[0]["grad_norm"],
                        "train/epoch": epoch + (pos + 1) / steps_per_epoch, "timing/step_s": seconds,
                        "efficiency/tokens_per_s": tokens / seconds,
                        "efficiency/tokens_per_s_per_worker": tokens / seconds / lc.num_workers})
        if evaluation and tc.eval_every and (step + 1) % tc.eval_every == 0:
            metrics.update(evaluate())
        logger.log(step + 1, metrics)
        last = metrics
        if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < total_steps:
            save(step + 1)

    if evaluation:
        last.update(evaluate())
    final_ckpt = save(total_steps) if total_steps > start_step or ckpt.latest() is None else ckpt.latest()
    final = output_dir / "final"
    _publish_final(final_ckpt / "model", final)
    logger.close()
    group.kill()
    return {"output_dir": str(output_dir), "final_model": str(final), "steps": total_steps, "metrics": last}


def _publish_final(model_dir: Path, final: Path) -> None:
    """Copy the last checkpoint's HF model to ``<output_dir>/final`` (atomically, via rename)."""
    import os
    import shutil

    tmp = final.with_name(".final.tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(model_dir, tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
