"""The step loop shared by the offline jobs (SFT, reward model, DPO, KTO): one learner group, fixed data.

Read top to bottom: plan placement → start learners → (resume) → for each step: take the global
batch, split it into each rank's micro-batches, one optimizer step, log → evaluate / checkpoint →
export the final model. What differs between jobs is a ``SupervisedTask``: how examples become
micro-batch tensors, which learner objective runs, and how rank metrics reduce to step metrics.

Preference jobs add a frozen reference model (``SupervisedTask.reference_forward``): either one pass
of the still-untrained policy group over train and eval data before the first step, storing each
example's reference log-probs with it (``precompute``: no second model in memory), or a frozen
reference learner group that runs each step's micro-batches (``group``). Either way the objective
finds them as ``micro_batch["ref_logps"]``. ``SupervisedTask.pre_step`` runs a no-grad policy pass
over the step's batch first (KTO's reference point is a statistic of the whole global batch).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal, Optional, Sequence

import torch

from rlhf_ray.checkpoint import CheckpointDir, publish_final
from rlhf_ray.config import Config, ConfigError, to_dict
from rlhf_ray.controller.cluster import init_ray, node_resources
from rlhf_ray.controller.groups import launch_learner_group
from rlhf_ray.controller.placement import (PlacementPlan, RoleRequest, check_plan, create_pools, plan_placement,
                                           remove_pools)
from rlhf_ray.data.batching import iter_epoch_batches, shard_for_rank
from rlhf_ray.efficiency import ModelShape, efficiency_metrics, offline_step_counts
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
    reference_forward: Optional[str] = None
    """Name in ``rlhf_ray.engines.objectives.FORWARDS`` giving each example's reference values, (B, k) per
    micro-batch, which the objective reads as ``micro_batch["ref_logps"]``; None: no reference model."""
    reference_mode: Literal["precompute", "group"] = "precompute"
    """precompute: one pass of the untrained policy group before training, stored with the examples;
    group: a frozen reference learner group (same model, learner settings) runs every step's micro-batches."""
    pre_step: Optional[Callable[[Callable[[str], list[torch.Tensor]]], dict[str, Any]]] = None
    """``pre_step(infer) -> extra objective kwargs`` before each update and each evaluation, where
    ``infer(forward_name)`` runs that no-grad forward of the policy on the batch's micro-batches and
    returns the outputs (e.g. KTO's reference point over the global batch)."""
    eval_before_training: bool = False
    """Also evaluate the untrained model (logged at step 0): a before / after comparison."""


REF_KEY = "ref_logps"
"""Micro-batch key of the reference values, (B, k) float32."""


def _collate(task: SupervisedTask, examples: Sequence[Any]) -> dict:
    """``task.collate`` plus the precomputed reference values when the examples carry them."""
    mb = task.collate(list(examples))
    if isinstance(examples[0], dict) and REF_KEY in examples[0]:
        mb[REF_KEY] = torch.tensor([ex[REF_KEY] for ex in examples], dtype=torch.float32)
    return mb


@dataclass
class LockstepCall:
    """One fan-out call over a data set that does not split evenly: each rank's micro-batches of indices.

    Every rank gets the same number of micro-batches (ZeRO-3 forwards are collective, so ranks must run
    in step); ``counted[r]`` is False where rank r only repeats another micro-batch to keep in step and
    its results are to be dropped.
    """

    per_rank: list[list[list[int]]]
    counted: list[bool]


def lockstep_calls(indices: Sequence[int], world: int, micro: int) -> list[LockstepCall]:
    """Cut ``indices`` into micro-batches of ``micro`` (the last one may be smaller) dealt to ``world`` ranks.

    The first call gives each rank the same number of whole rounds (contiguous shares); the remaining
    fewer-than-``world`` micro-batches go one per rank in a second call, the ranks left over repeating
    the first of them (not counted).
    """
    mbs = [list(indices[s:s + micro]) for s in range(0, len(indices), micro)]
    rounds = len(mbs) // world
    calls = []
    if rounds:
        calls.append(LockstepCall([mbs[r * rounds:(r + 1) * rounds] for r in range(world)], [True] * world))
    rest = mbs[rounds * world:]
    if rest:
        calls.append(LockstepCall([[rest[r]] if r < len(rest) else [rest[0]] for r in range(world)],
                                  [r < len(rest) for r in range(world)]))
    return calls


class Batches:
    """A set of collated micro-batches laid out for lockstep calls on a group (and its reference group)."""

    def __init__(self, task: SupervisedTask, examples: Sequence[Any], calls: list[LockstepCall]):
        self.calls = calls
        self.tensors = [[[_collate(task, [examples[i] for i in mb]) for mb in rank] for rank in c.per_rank]
                        for c in calls]
        self.referenced = False

    @classmethod
    def step(cls, task: SupervisedTask, examples: Sequence[Any], batch: list[int], world: int,
             micro: int) -> "Batches":
        """One global batch of indices: it splits evenly, so one call with every rank counted."""
        return cls(task, examples, [LockstepCall(shard_for_rank(batch, world, micro), [True] * world)])

    def infer(self, group, forward: str) -> list[torch.Tensor]:
        """The counted outputs of ``group``'s no-grad ``forward``, one tensor per micro-batch."""
        out = []
        for call, tensors in zip(self.calls, self.tensors):
            results = group.call_split("infer", tensors, forward)
            out += [y for ok, rank_out in zip(call.counted, results) if ok for y in rank_out]
        return out

    def attach_reference(self, ref_group, forward: str) -> None:
        """Put the reference group's outputs into each micro-batch as ``ref_logps`` (once)."""
        if self.referenced:
            return
        self.referenced = True
        for tensors in self.tensors:
            results = ref_group.call_split("infer", tensors, forward)
            for rank_mbs, rank_out in zip(tensors, results):
                for mb, y in zip(rank_mbs, rank_out):
                    mb[REF_KEY] = y

    def evaluate(self, group, objective: str, kwargs: dict) -> list[dict]:
        """Per-rank metric sums of ``objective`` (counted ranks only)."""
        sums = []
        for call, tensors in zip(self.calls, self.tensors):
            results = group.call_split("evaluate", tensors, objective, kwargs)
            sums += [r for ok, r in zip(call.counted, results) if ok]
        return sums


def precompute_reference(group, task: SupervisedTask, examples: Sequence[Any], world: int, micro: int,
                         chunk: int = 2048) -> list[Any]:
    """Copies of ``examples`` carrying ``ref_logps`` from ``group``'s ``task.reference_forward``.

    Run on the policy group before its first update, i.e. with the reference (initial) weights. The
    data goes through in chunks of ``chunk`` examples so no single call ships the whole data set.
    """
    out = list(examples)
    for start in range(0, len(examples), chunk):
        idx = list(range(start, min(start + chunk, len(examples))))
        batches = Batches(task, examples, lockstep_calls(idx, world, micro))
        values = batches.infer(group, task.reference_forward)
        counted = [mb for c in batches.calls for ok, rank in zip(c.counted, c.per_rank) if ok for mb in rank]
        for mb, y in zip(counted, values):
            for i, row in zip(mb, y.tolist()):
                out[i] = {**examples[i], REF_KEY: row}
    return out


def run_offline_job(cfg: Config, prepare_data: Callable[[Config, Any], tuple[list, list, dict]],
                    make_task: Callable[[Config, int], SupervisedTask]) -> dict[str, Any]:
    """An offline job end to end: check paths, tokenize the data, prepare the run directory, train.

    ``prepare_data(cfg, tokenizer) -> (train, evaluation, counts)`` is the job's data step;
    ``make_task(cfg, pad_id)`` its ``SupervisedTask``. Returns ``run_supervised``'s result plus ``data``
    (the row counts), so every job reports its data the same way.
    """
    from rlhf_ray.jobs.common import check_paths, load_tokenizer, prepare_output_dir

    check_paths(cfg)
    tokenizer = load_tokenizer(cfg)
    train, evaluation, counts = prepare_data(cfg, tokenizer)
    output_dir = prepare_output_dir(cfg)
    task = make_task(cfg, tokenizer.pad_token_id)
    result = run_supervised(cfg, task, train, evaluation, cfg.model.tokenizer or cfg.model.path, output_dir)
    result["data"] = counts
    return result


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
    roles = [RoleRequest("learner", lc.num_workers, lc.gpus_per_worker, lc.cpus_per_worker)]
    if task.reference_forward and task.reference_mode == "group":
        roles.append(RoleRequest("reference", lc.num_workers, lc.gpus_per_worker, lc.cpus_per_worker))
    colocate = [["learner", "reference"]] if cfg.placement.mode in ("shared", "hybrid") else []
    plan = plan_placement(roles, colocate, cfg.placement.strategy, cfg.placement.node_selector,
                          cfg.placement.role_strategy)
    resources = init_ray(cfg.ray)
    check_plan(plan, resources, node_resources())
    log.info(plan.describe())
    pools = create_pools(plan, tc.timeout_s)
    try:
        return _train(cfg, task, train, evaluation, tokenizer_path, output_dir, plan, pools, total_steps,
                      steps_per_epoch)
    finally:
        remove_pools(pools)


def _train(cfg: Config, task: SupervisedTask, train: Sequence[Any], evaluation: Sequence[Any],
           tokenizer_path: str, output_dir: Path, plan: PlacementPlan, pools: dict, total_steps: int,
           steps_per_epoch: int) -> dict[str, Any]:
    lc, tc = cfg.learner, cfg.train
    G, W, M = lc.global_batch_size, lc.num_workers, lc.micro_batch_size
    ranks = list(range(W))
    pending = launch_learner_group("learner", cfg.model, cfg.optim, lc, total_steps, task.head, True, tc.seed,
                                   tc.timeout_s, pools[plan.role_pool["learner"]], ranks,
                                   plan.role_share["learner"])
    ref_group = None
    if "reference" in plan.role_pool:
        ref_group = launch_learner_group("reference", cfg.model, cfg.optim, lc, total_steps, task.head, False,
                                         tc.seed, tc.timeout_s, pools[plan.role_pool["reference"]], ranks,
                                         plan.role_share["reference"]).ready()
    group = pending.ready()
    # The efficiency report (each step beside its FLOP floor on the device measured here), once per run.
    calibration = group.call_rank0("calibrate")
    shape = ModelShape.from_hf_config(cfg.model.path, head=task.head)
    on_gpu = group.facts[0]["device"].startswith("cuda")
    trainable = group.facts[0]["trainable_params"] if cfg.model.lora.enabled else None

    if task.reference_forward and ref_group is None:
        # Before any update (and before loading a checkpoint): the policy's weights are the reference's.
        t0 = time.perf_counter()
        train = precompute_reference(group, task, train, W, M)
        evaluation = precompute_reference(group, task, evaluation, W, M) if evaluation else evaluation
        log.info("reference log-probs of %d examples precomputed in %.1f s", len(train) + len(evaluation or []),
                 time.perf_counter() - t0)

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

    def prepared(batches: Batches, examples: list) -> dict[str, Any]:
        """Reference values attached, then the objective's kwargs (with the pre-step's)."""
        if ref_group is not None:
            batches.attach_reference(ref_group, task.reference_forward)
        kwargs = task.objective_kwargs(examples, cfg)
        if task.pre_step is not None:
            kwargs.update(task.pre_step(lambda forward: batches.infer(group, forward)))
        return kwargs

    eval_batches = Batches(task, evaluation, lockstep_calls(range(len(evaluation)), W, M)) if evaluation else None

    def evaluate() -> dict[str, float]:
        kwargs = prepared(eval_batches, list(evaluation))
        sums = eval_batches.evaluate(group, task.objective, kwargs)
        return {k.replace("train/", f"{task.eval_prefix}/"): v for k, v in task.reduce(sums).items()
                if k.startswith("train/")}

    initial: dict[str, float] = {}
    if evaluation and task.eval_before_training and start_step == 0:
        initial = evaluate()
        logger.log(0, initial)

    cached_epoch, epoch_batches = -1, []
    last: dict[str, float] = {}
    for step in range(start_step, total_steps):
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != cached_epoch:
            cached_epoch, epoch_batches = epoch, order(epoch)
        batch = epoch_batches[pos]
        t0 = time.perf_counter()
        batches = Batches.step(task, train, batch, W, M)
        kwargs = prepared(batches, [train[i] for i in batch])
        results = group.call_split("train_step", batches.tensors[0], task.objective, kwargs)
        seconds = time.perf_counter() - t0
        metrics = task.reduce(results)
        tokens = sum(r["tokens"] for r in results)
        metrics.update({"train/lr": results[0]["lr"], "train/grad_norm": results[0]["grad_norm"],
                        "train/epoch": epoch + (pos + 1) / steps_per_epoch, "timing/step_s": seconds,
                        "efficiency/tokens_per_s": tokens / seconds,
                        "efficiency/tokens_per_s_per_worker": tokens / seconds / W})
        counts = offline_step_counts(batches.tensors[0], cfg, on_gpu, trainable)
        metrics.update(efficiency_metrics({"timing/train_s": seconds, "timing/step_s": seconds}, counts, shape,
                                          calibration))
        if evaluation and tc.eval_every and (step + 1) % tc.eval_every == 0:
            metrics.update(evaluate())
        logger.log(step + 1, metrics)
        last = metrics
        if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < total_steps:
            save(step + 1)

    if evaluation:
        last.update(evaluate())
    final_ckpt = save(total_steps) if total_steps > start_step or ckpt.latest() is None else ckpt.latest()
    final = publish_final(final_ckpt / "model", output_dir)
    logger.close()
    group.kill()
    if ref_group is not None:
        ref_group.kill()
    result = {"output_dir": str(output_dir), "final_model": str(final), "steps": total_steps, "metrics": last}
    if initial:
        result["initial_eval"] = initial
    return result
