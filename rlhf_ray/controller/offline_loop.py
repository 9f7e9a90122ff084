"""The offline jobs' loop (SFT, reward model, DPO, KTO): one learner group, fixed data, read in ``OfflineLoop.step``:

    1. batch       the step's global batch of examples (epochs, reshuffled per epoch), cut into each rank's
                   micro-batches
    2. reference   the frozen reference model's values of those examples, when the loss needs them
    3. pre-step    a no-grad policy pass over the whole batch, when the loss needs a batch statistic (KTO's z0)
    4. update      one optimizer step of the task's loss spec over the global batch

What differs between jobs is a ``SupervisedTask``. The reference model is either one pass of the still-
untrained policy group over train and eval data before the first step, storing each example's reference
log-probs with it (``precompute``: no second model in memory), or a frozen reference learner group that runs
each step's micro-batches (``group``); either way the loss finds them as ``micro_batch["ref_logps"]``.
Epochs, checkpoints, resume and metrics are ``TrainLoop``'s, shared with the RL loops.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

import torch

from rlhf_ray.controller.loop import Schedule, TrainLoop
from rlhf_ray.controller.offline_batches import Batches, lockstep_calls, precompute_reference
from rlhf_ray.efficiency import ModelShape, efficiency_metrics, offline_step_counts
from rlhf_ray.objectives.common import BatchTotals, Forward, Objective

if TYPE_CHECKING:
    from rlhf_ray.controller.recovery import Recoveries
    from rlhf_ray.config.resolve import Resolved
    from rlhf_ray.controller.launch import Roles

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SupervisedTask:
    """What makes SFT, RM, DPO or KTO different inside the shared loop."""

    name: str
    objective: Objective
    """The loss spec (``rlhf_ray.objectives``: SFTLoss, RMLoss, DPOLoss, KTOLoss)."""
    collate: Callable[[list[Any]], dict]
    """Examples of one micro-batch -> tensors."""
    reduce: Callable[[list[dict]], dict[str, float]]
    """Per-rank metric sums -> step metrics with namespaced keys."""
    loss_tokens: Optional[Callable[[list[Any]], int]] = None
    """Loss-carrying tokens of a batch of examples (``BatchTotals.tokens``; a token-mean loss needs them)."""
    reference_forward: Optional[Forward] = None
    """The reference values of each example, (B, k) per micro-batch (``micro_batch["ref_logps"]``); None: no
    reference model. Where they come from is ``Resolved.reference`` (precompute or group)."""
    pre_step: Optional[Callable[[Objective, Callable[[Forward], list[torch.Tensor]]], Objective]] = None
    """``pre_step(objective, infer) -> objective`` before each update and evaluation, where ``infer(forward)``
    runs that no-grad forward of the policy on the batch's micro-batches (e.g. KTO's z0 over the global batch)."""
    eval_before_training: bool = False
    """Also evaluate the untrained model (logged at step 0): a before / after comparison."""
    eval_prefix: str = "eval"


class OfflineLoop(TrainLoop):
    """One offline run: ``task`` on ``train`` (and ``evaluation``) with the policy group (and a reference group)."""

    def __init__(self, resolved: "Resolved", roles: "Roles", schedule: Schedule, task: SupervisedTask,
                 train: Sequence[Any], evaluation: Sequence[Any], output_dir: Path,
                 recoveries: Optional["Recoveries"] = None):
        super().__init__(resolved, roles, schedule, len(train), output_dir, recoveries)
        self.task, self.name = task, task.name
        learner = resolved.policy.learner
        self.W, self.M, self.accum = learner.num_workers, learner.micro_batch_size, learner.grad_accum_steps
        self.shape = ModelShape.from_hf_config(resolved.paths.model, head=resolved.policy.head)
        self.trainable = self.policy.trainable_params if self.cfg.model.lora.enabled else None
        if task.reference_forward is not None and resolved.reference == "precompute":
            # Before any update (and before loading a checkpoint): the policy's weights are the reference's.
            t0 = time.perf_counter()
            train = precompute_reference(self.policy, task.collate, task.reference_forward, train, self.M)
            if evaluation:
                evaluation = precompute_reference(self.policy, task.collate, task.reference_forward, evaluation,
                                                  self.M)
            log.info("reference log-probs of %d examples precomputed in %.1f s", len(train) + len(evaluation or []),
                     time.perf_counter() - t0)
        self.train, self.evaluation = train, evaluation
        self.eval_batches = (Batches(task.collate, evaluation, lockstep_calls(range(len(evaluation)), self.W, self.M))
                             if evaluation else None)

    def prepared(self, batches: Batches, examples: list, grad_scale: float) -> tuple[Objective, BatchTotals]:
        """The step's loss spec and totals, with the reference values attached and the pre-step run."""
        task = self.task
        if self.roles.reference is not None and task.reference_forward is not None:
            batches.attach_reference(self.roles.reference, task.reference_forward)
        totals = BatchTotals(tokens=task.loss_tokens(examples) if task.loss_tokens else 0, sequences=len(examples),
                             grad_scale=grad_scale)
        objective = task.objective
        if task.pre_step is not None:
            objective = task.pre_step(objective, lambda forward: batches.infer(self.policy, forward))
        return objective, totals

    def step(self, step: int) -> dict[str, float]:
        epoch, pos = self.order.position(step)
        batch = self.order.batch(step)
        t0 = time.perf_counter()
        batches = Batches.step(self.task.collate, self.train, batch, self.W, self.M)
        objective, totals = self.prepared(batches, [self.train[i] for i in batch], float(self.accum * self.W))
        results = self.policy.train_step(batches.tensors[0], objective, totals)
        seconds = time.perf_counter() - t0
        metrics = self.task.reduce(results)
        tokens = sum(r["tokens"] for r in results)
        metrics.update({"train/lr": results[0]["lr"], "train/grad_norm": results[0]["grad_norm"],
                        "train/skipped_updates": results[0]["skipped_updates"],
                        "train/epoch": epoch + (pos + 1) / self.schedule.steps_per_epoch, "timing/step_s": seconds,
                        "efficiency/tokens_per_s": tokens / seconds,
                        "efficiency/tokens_per_s_per_worker": tokens / seconds / self.W})
        counts = offline_step_counts(batches.tensors[0], self.resolved.plan, self.resolved.on_gpu, self.trainable)
        metrics.update(efficiency_metrics({"timing/train_s": seconds, "timing/step_s": seconds}, counts, self.shape,
                                          self.calibration))
        return metrics

    # ---- evaluation ---------------------------------------------------------------------------------
    def has_eval(self) -> bool:
        return self.eval_batches is not None

    def final_eval_due(self) -> bool:
        return self.has_eval()

    def initial_eval_due(self) -> bool:
        return self.has_eval() and self.task.eval_before_training

    def evaluate(self, step: int) -> dict[str, float]:
        assert self.eval_batches is not None
        objective, totals = self.prepared(self.eval_batches, list(self.evaluation), float(self.accum * self.W))
        sums = self.eval_batches.evaluate(self.policy, objective, totals)
        prefix = self.task.eval_prefix
        return {k.replace("train/", f"{prefix}/"): v for k, v in self.task.reduce(sums).items()
                if k.startswith("train/")}
