"""What every job's loop shares: the schedule, the epoch order over its data, checkpoints, metrics, ``run``.

``TrainLoop.run`` is the whole life of a run: resume -> before_run -> evaluation before training (logged at step 0)
-> for each step: ``step`` -> evaluate when due (and after the last step) -> log -> checkpoint when due -> final
checkpoint and ``final/``. Each evaluation may replace ``best/`` (``train.keep_best``). The subclasses say
what one step is: ``RLLoop`` (rollouts, PPO / GRPO / REINFORCE family), ``OnlineDPOLoop`` and ``OfflineLoop``
(SFT, reward model, DPO, KTO).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from rlhf_ray.checkpoint import BestModel, CheckpointDir, data_fingerprint, publish_final
from rlhf_ray.config import ConfigError, save_config, to_dict
from rlhf_ray.config.schema import RL_JOBS
from rlhf_ray.controller.recovery import Recoveries
from rlhf_ray.data.batching import iter_epoch_batches
from rlhf_ray.metrics import MetricsLogger

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import Resolved
    from rlhf_ray.controller.launch import Roles
    from rlhf_ray.controller.roles import LearnerRole

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Schedule:
    """How a run walks its data: items (prompts or examples) per step, steps per epoch and in all."""

    items_per_step: int
    steps_per_epoch: int
    total_steps: int
    optimizer_steps: int
    """What the learners' LR schedule spans (RL: total_steps x optimizer steps per step)."""


def make_schedule(resolved: "Resolved", n_items: int) -> Schedule:
    """The run's schedule over ``n_items`` training items, checked before any actor starts."""
    cfg = resolved.config
    if cfg.job in RL_JOBS:  # rollout jobs walk prompts
        per_step = cfg.algo.prompts_per_step
        if n_items < per_step:
            raise ConfigError(f"algo.prompts_per_step: {per_step} is more than the {n_items} prompts")
        total = cfg.algo.total_steps
        return Schedule(per_step, n_items // per_step, total, total * resolved.batch.updates_per_step)
    G = resolved.batch.per_update
    if n_items < G:
        raise ConfigError(f"learner.global_batch_size: {G} is larger than the data set ({n_items} examples)")
    per_epoch = n_items // G
    if n_items % G:
        log.info("%d examples per epoch do not fill a global batch and are left out of that epoch "
                 "(a different set each epoch when shuffling)", n_items % G)
    # max_steps overrides epochs (and may run past them; later epochs reshuffle).
    total = cfg.train.max_steps if cfg.train.max_steps is not None else per_epoch * cfg.train.epochs
    return Schedule(G, per_epoch, total, total)


class EpochOrder:
    """The items of each step: epochs over the data, reshuffled per epoch from (seed, epoch)."""

    def __init__(self, n_items: int, schedule: Schedule, seed: int, shuffle: bool):
        self.n_items, self.schedule, self.seed, self.shuffle = n_items, schedule, seed, shuffle
        self._cache: tuple[int, list[list[int]]] = (-1, [])

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, batch within the epoch) of ``step``."""
        return divmod(step, self.schedule.steps_per_epoch)

    def batch(self, step: int) -> list[int]:
        """Indices of the items of ``step``."""
        epoch, pos = self.position(step)
        if self._cache[0] != epoch:
            self._cache = (epoch, list(iter_epoch_batches(self.n_items, self.schedule.items_per_step, self.seed,
                                                          epoch, self.shuffle)))
        return self._cache[1][pos]


class PromptCursor:
    """The items of a run in ``EpochOrder``, taken as needed: a run that takes ``items_per_step`` a step gets
    exactly ``order.batch(step)`` at step ``step``; one that takes more (``algo.filter_groups`` refills) moves on
    through the same order, across epochs, so every item of an epoch is still taken once."""

    def __init__(self, order: EpochOrder):
        self.order, self.taken = order, 0
        self.returned: list[int] = []
        """Items handed back unused (a streaming rollout's stale groups), taken again before the order goes on."""

    def take(self, n: int) -> list[int]:
        """The next ``n`` items: those handed back first, then the order's."""
        per_step = self.order.schedule.items_per_step
        out, self.returned = self.returned[:n], self.returned[n:]
        while len(out) < n:
            step, offset = divmod(self.taken, per_step)
            k = min(n - len(out), per_step - offset)
            out += self.order.batch(step)[offset:offset + k]
            self.taken += k
        return out

    def give_back(self, items: list[int]) -> None:
        """Items taken but not trained on: the next ``take`` returns them first."""
        self.returned += items


class TrainLoop:
    """A run's shared state (resolved config, roles, schedule, checkpoints) and its life (``run``)."""

    name: str = "train"

    def __init__(self, resolved: "Resolved", roles: "Roles", schedule: Schedule, n_items: int, output_dir: Path,
                 recoveries: Optional[Recoveries] = None):
        cfg = resolved.config
        self.resolved, self.cfg, self.roles, self.schedule = resolved, cfg, roles, schedule
        self.output_dir = output_dir
        self.recoveries = recoveries or Recoveries(0)
        """The run's failure policy and record (``controller.recovery``), kept by the job front across restarts."""
        self.order = EpochOrder(n_items, schedule, cfg.train.seed, cfg.data.shuffle)
        self.ckpt = CheckpointDir(output_dir, keep=cfg.train.keep_checkpoints)
        self.policy: "LearnerRole" = roles.actor or roles.learner  # type: ignore[assignment]
        self.best: Optional[BestModel] = None
        """``best/`` (``train.keep_best``), set up by ``run`` once it knows whether the run resumes."""
        # The efficiency report: every phase beside its floor on the device measured here, once per run.
        self.calibration = self.policy.calibrate()

    # ---- what a subclass says ---------------------------------------------------------------------
    def step(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def has_eval(self) -> bool:
        """Whether the run has held-out data to evaluate on."""
        return False

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out metrics of the policy after ``step`` steps (0: before training)."""
        return {}

    def eval_due(self, step: int) -> bool:
        """Whether to evaluate after ``step`` (0-based) completed: every ``train.eval_every`` steps."""
        every = self.cfg.train.eval_every
        return self.has_eval() and bool(every) and (step + 1) % every == 0

    def final_eval_due(self) -> bool:
        """Whether to evaluate after the last step too (RL: when evaluating at all)."""
        return self.has_eval() and bool(self.cfg.train.eval_every)

    def initial_eval_due(self) -> bool:
        """Whether to evaluate the model as given, before the first step (logged at step 0): RL when evaluating at
        all, a before / after comparison."""
        return self.final_eval_due()

    def evaluated(self, step: int) -> dict[str, float]:
        """``evaluate(step)``, offered to ``best/`` when ``train.keep_best`` is set."""
        metrics = self.evaluate(step)
        if self.best is not None:
            tokenizer = self.resolved.paths.tokenizer
            if self.best.offer(step, metrics, lambda d: self.policy.export_hf(str(d), tokenizer)):
                log.info("best %s so far at step %d: %s -> %s", self.best.metric, step, metrics[self.best.metric],
                         self.best.dir)
        return metrics

    def before_run(self, start: int) -> dict[str, float]:
        """Anything to do (and log at ``start``) before the first step; returns metrics to log, or {}."""
        return {}

    def close(self) -> None:
        """Stop what the loop runs beside the steps (a rollout stream's thread); called when ``run`` ends."""

    def state_roles(self) -> dict[str, "LearnerRole"]:
        """The groups whose training state a checkpoint holds, by sub-directory ("" = the step directory)."""
        return {"": self.policy}

    def extra_state(self) -> dict[str, Any]:
        """Loop state beyond the learners' (e.g. the adaptive KL controller), kept in trainer_state.json."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def save_files(self, directory: Path, step: int) -> None:
        """Loop state too large for trainer_state.json (e.g. samples in flight), written into checkpoint ``step``."""

    def load_files(self, directory: Path, step: int) -> None:
        """Read back what ``save_files`` wrote into the checkpoint of ``step``."""

    # ---- checkpoints --------------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Checkpoint ``step``: every trained group's state, the policy as an HF model, trainer_state.json."""
        staging = self.ckpt.staging(step)
        for sub, role in self.state_roles().items():
            role.save(str(staging / sub), {"step": step})
        self.policy.export_hf(str(staging / "model"), self.resolved.paths.tokenizer)
        self.save_files(staging, step)
        # The config it was trained under, as given and as resolved (what `rlhf-ray train` reloads, like the run's).
        save_config(self.cfg, staging / "config.yaml", self.resolved)
        epoch, pos = self.order.position(step)
        return self.ckpt.finalize(step, {"step": step, "epoch": epoch, "batch_in_epoch": pos, "job": self.cfg.job,
                                         "model": self.resolved.paths.model,
                                         "data": data_fingerprint(self.cfg.data.path, self.order.n_items),
                                         **self.extra_state()})

    def resume(self) -> int:
        """Load the latest checkpoint when ``train.resume``; returns the step to continue from."""
        latest = self.ckpt.latest() if self.cfg.train.resume else None
        if latest is None:
            self.recoveries.resumed(0, None)
            return 0
        for sub, role in self.state_roles().items():
            role.load(str(latest / sub))
        state = CheckpointDir.read_state(latest)
        self.load_extra_state(state)
        self.load_files(latest, int(state["step"]))
        log.info("resumed from %s at step %d", latest, state["step"])
        self.recoveries.resumed(int(state["step"]), latest)
        return int(state["step"])

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Train from the latest checkpoint (or step 0) to ``total_steps``; returns paths and the last metrics."""
        cfg, tc, total = self.cfg, self.cfg.train, self.schedule.total_steps
        start = self.resume()
        if self.resolved.best is not None:
            self.best = BestModel(self.output_dir, self.resolved.best.metric, self.resolved.best.mode, start > 0)
        logged = {**to_dict(cfg), "resolved": self.resolved.to_dict()}
        logger = MetricsLogger(cfg.logging, self.output_dir, total, logged, start, job=self.name)
        last: dict[str, float] = {}
        initial: dict[str, float] = {}
        try:
            initial = self.before_run(start)
            if start == 0 and self.initial_eval_due():
                initial.update(self.evaluated(0))
            if initial:
                logger.log(0, initial)
            for step in range(start, total):
                self.recoveries.step = step
                metrics = self.step(step)
                # After the last step too, once: the final model's numbers are in the last logged row.
                if self.eval_due(step) or (step + 1 == total and self.final_eval_due()):
                    metrics.update(self.evaluated(step + 1))
                if self.recoveries.max_restarts:  # a run that recovers by itself counts it every step
                    metrics.update(self.recoveries.metrics())
                logger.log(step + 1, metrics)
                last = metrics
                if tc.save_every and (step + 1) % tc.save_every == 0 and step + 1 < total:
                    self.save(step + 1)
            latest = self.ckpt.latest()
            final_ckpt = self.save(total) if total > start or latest is None else latest
        finally:
            self.close()
            logger.close()
        final = publish_final(final_ckpt / "model", self.output_dir)
        result = {"output_dir": str(self.output_dir), "final_model": str(final), "steps": total, "metrics": last}
        if initial:
            result["initial_eval"] = initial
        if self.best is not None and self.best.record is not None:
            result["best_model"] = str(self.best.dir)
            result["best"] = self.best.record
        return result
