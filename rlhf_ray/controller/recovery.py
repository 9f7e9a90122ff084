"""The failure policy: which faults a run recovers from by itself, and how (``train.max_restarts``).

    a rollout engine died or stalled, nothing else  -> replace it in place: a new engine in the same bundle,
                                                       the policy's weights synced into it, the call redone
                                                       (``RolloutLoop.on_engines``; not in hybrid placement,
                                                       where it shares its GPU with the learners)
    any other actor died, or any call timed out     -> remove every role, start them again, resume from the
                                                       latest checkpoint (``jobs.front``)
    anything else                                   -> stop: an exception raised by our code or the user's
                                                       (bad data, a non-finite loss, a reward function's
                                                       error) would happen again

Both kinds share one budget; the fault past it stops the job with its cause. Every recovery is logged, counted
in each later step's metrics (``recovery/*``) and written to ``recoveries.jsonl`` in the run directory.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Optional

from rlhf_ray.controller.worker_group import RemoteCallError, RemoteCallTimeout

log = logging.getLogger(__name__)

ROLLOUT_GROUP = "rollout"


@dataclass(frozen=True)
class Fault:
    """A failure the run can recover from: what to do, and why."""

    action: Literal["replace_engines", "restart"]
    cause: str
    engines: tuple[int, ...] = ()
    """The rollout engines to replace (``replace_engines``)."""


def classify(exc: BaseException) -> Optional[Fault]:
    """The fault ``exc`` is, or None when it is an error to stop on (see the module docstring)."""
    if isinstance(exc, RemoteCallError) and exc.died:
        if exc.culprit.group == ROLLOUT_GROUP:
            return Fault("replace_engines", str(exc), (exc.culprit.rank,))
        return Fault("restart", str(exc))
    if isinstance(exc, RemoteCallTimeout):
        if exc.stalled and all(w.group == ROLLOUT_GROUP for w in exc.stalled):
            return Fault("replace_engines", str(exc), tuple(sorted({w.rank for w in exc.stalled})))
        return Fault("restart", str(exc))
    return None


class RecoveryLimitError(RuntimeError):
    """A fault repeated past ``train.max_restarts``; the message holds the last cause."""


class Recoveries:
    """A run's recovery budget and record, kept by the driver across restarts of the roles."""

    def __init__(self, max_restarts: int, output_dir: Optional[Path] = None):
        self.max_restarts, self.output_dir = max_restarts, output_dir
        self.counts = {"replace_engines": 0, "restart": 0}
        self.step = 0
        """The step in progress (0-based), set by the loop: what a recovery record names."""

    @property
    def used(self) -> int:
        return sum(self.counts.values())

    def admit(self, exc: BaseException, in_place: bool = False) -> Fault:
        """The fault ``exc`` is, recorded against the budget; re-raises ``exc`` when it is no fault, and raises
        ``RecoveryLimitError`` when the budget is spent. ``in_place``: the caller replaces the engines of a
        ``replace_engines`` fault itself; otherwise every fault is recovered by a restart."""
        fault = classify(exc)
        if fault is None:
            raise exc
        if not in_place:
            fault = Fault("restart", fault.cause)
        if self.used >= self.max_restarts:
            raise RecoveryLimitError(
                f"{fault.cause}\n(not recovered: {self.used} recoveries of train.max_restarts={self.max_restarts} "
                "already used; raise it, or fix what keeps failing)") from exc
        self.counts[fault.action] += 1
        how = (f"replacing rollout engine(s) {list(fault.engines)} in place and redoing the call"
               if fault.action == "replace_engines" else "restarting every role and resuming from the latest checkpoint")
        log.warning("recovery %d of %d at step %d: %s\n  -> %s", self.used, self.max_restarts, self.step + 1,
                    fault.cause, how)
        self._record({"step": self.step + 1, "action": fault.action, "engines": list(fault.engines),
                      "cause": fault.cause})
        return fault

    def resumed(self, step: int, checkpoint: Optional[Path]) -> None:
        """After a restart: the run continues after ``step`` from ``checkpoint`` (None: from the start; logged and
        recorded)."""
        if self.counts["restart"]:
            log.warning("recovered: resumed after step %d from %s", step, checkpoint or "the start (no checkpoint yet)")
            self._record({"step": step, "action": "resumed", "checkpoint": str(checkpoint) if checkpoint else None})

    def _record(self, record: dict) -> None:
        if self.output_dir is not None:
            with open(self.output_dir / "recoveries.jsonl", "a") as f:
                f.write(json.dumps({"time": time.time(), **record}) + "\n")

    def metrics(self) -> dict[str, float]:
        """Recoveries so far in this run (logged with every step)."""
        return {"recovery/engine_replacements": float(self.counts["replace_engines"]),
                "recovery/restarts": float(self.counts["restart"])}
