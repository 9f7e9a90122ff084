"""A group of identical Ray actors (one per GPU or CPU process) with timed, named fan-out calls.

Every call waits at most ``timeout_s``; a stall or a crash ends in an error that names the group,
the method and the ranks that did not answer, never a silent hang.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError
from ray.util.placement_group import PlacementGroup
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Who:
    """One rank of one group, as errors name it: ``actor[rank 1] (node 10.0.0.5, pid 4242)``."""

    group: str
    rank: int
    where: str = ""
    """``node N, pid P`` once the rank has reported its setup facts."""

    def __str__(self) -> str:
        return f"{self.group}[rank {self.rank}]" + (f" ({self.where})" if self.where else "")


class RemoteCallError(RuntimeError):
    """A remote method raised or its actor died; the message names group, rank and method."""

    def __init__(self, message: str, culprit: Who, died: bool):
        super().__init__(message)
        self.culprit = culprit
        self.died = died
        """The culprit's process is gone (the actor died, or its vLLM engine core did): a fault of the machine,
        not of the code it ran."""


class RemoteCallTimeout(TimeoutError):
    """A remote method did not return within its timeout; the message names who stalled."""

    def __init__(self, message: str, stalled: list[Who]):
        super().__init__(message)
        self.stalled = stalled


_DEAD_ENGINE_ERRORS = ("EngineDeadError",)
"""vLLM's error when its engine-core process is gone (on GPU it runs apart from the actor): the engine is dead
although its actor lives."""


def _died(exc: Exception, cause: BaseException) -> bool:
    return isinstance(exc, RayActorError) or type(cause).__name__ in _DEAD_ENGINE_ERRORS


FAILURE_GRACE_S = 5.0
"""After the first failure, how long to wait for the others: when a rank dies, its peers fail on closed
connections within moments, and the one that died is the one to name."""


def _failure(ref: ray.ObjectRef) -> Optional[Exception]:
    try:
        ray.get(ref, timeout=0)
    except (RayTaskError, RayActorError) as exc:
        return exc
    return None


def wait_named(refs: Sequence[ray.ObjectRef], names: Sequence[Who], what: str, timeout_s: float) -> list[Any]:
    """``ray.get`` with a deadline, translating stalls and failures into errors that name the culprit.

    The first failure ends the wait (after ``FAILURE_GRACE_S`` for the failures it causes); of the failures
    seen, an actor that died is named first, its peers' errors after it.
    """
    refs = list(refs)
    if not refs:
        return []
    deadline = time.monotonic() + timeout_s
    pending, failed = refs, []
    while pending and not failed:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            break
        failed += [(r, e) for r in ready if (e := _failure(r)) is not None]
    if failed and pending:
        grace = min(FAILURE_GRACE_S, max(0.0, deadline - time.monotonic()))
        ready, pending = ray.wait(pending, num_returns=len(pending), timeout=grace)
        failed += [(r, e) for r in ready if (e := _failure(r)) is not None]
    if failed:
        name_of = dict(zip(refs, names))
        failed.sort(key=lambda f: (not isinstance(f[1], RayActorError), refs.index(f[0])))
        ref, exc = failed[0]
        cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
        also = f" (then also failed: {', '.join(str(name_of[r]) for r, _ in failed[1:])})" if len(failed) > 1 else ""
        raise RemoteCallError(f"{what} failed on {name_of[ref]}: {type(cause).__name__}: {cause}{also}",
                              name_of[ref], _died(exc, cause)) from cause
    if pending:
        stalled = [n for r, n in zip(refs, names) if r in pending]
        raise RemoteCallTimeout(
            f"{what}: no answer from {', '.join(map(str, stalled))} within {timeout_s:.0f} s "
            "(raise train.timeout_s if the step is just slow; see the actor logs in the Ray dashboard otherwise)",
            stalled)
    return [ray.get(ref, timeout=0) for ref in refs]


@dataclass
class GroupSpec:
    """How to create a group: actor class, size and the resources of each member."""

    name: str
    actor_cls: type
    num_workers: int
    num_gpus: float
    num_cpus: float
    env_vars: dict[str, str] | None = None


class WorkerGroup:
    """N actors of one class placed in given placement-group bundles, called with declared fan-out.

    Methods are named by the worker class's function (``group.call_all(LearnerWorker.offload)``), so a
    reader (and an editor's "go to definition") lands on the code that runs.

    - ``call_all``: the same arguments to every rank (broadcast), all results back.
    - ``call_split``: one argument list per rank (data-parallel split).
    - ``call_rank0``: rank 0 only.
    """

    def __init__(self, spec: GroupSpec, placement_group: PlacementGroup, bundle_indices: Sequence[int],
                 timeout_s: float, actor_args: Sequence[Any] = ()):
        if len(bundle_indices) != spec.num_workers:
            raise ValueError(f"{spec.name}: {spec.num_workers} workers but {len(bundle_indices)} bundles")
        self.name, self.timeout_s = spec.name, timeout_s
        self.facts: list[dict[str, Any]] = []
        """Each rank's setup facts (node, pid, device...), filled when the group has started."""
        self._remote_cls = ray.remote(spec.actor_cls)
        self._spec, self._pg, self._bundles, self._actor_args = spec, placement_group, list(bundle_indices), actor_args
        self.actors = [self._create(rank) for rank in range(spec.num_workers)]

    def _create(self, rank: int) -> Any:
        """Rank ``rank``'s actor, in its bundle of the group's placement group."""
        spec = self._spec
        env = {"TOKENIZERS_PARALLELISM": "false", **(spec.env_vars or {})}
        return self._remote_cls.options(
            num_gpus=spec.num_gpus, num_cpus=spec.num_cpus, name=None,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self._pg, placement_group_bundle_index=int(self._bundles[rank]),
                placement_group_capture_child_tasks=True),
            runtime_env={"env_vars": env},
        ).remote(rank, spec.num_workers, *self._actor_args)

    def respawn(self, rank: int) -> None:
        """Kill rank ``rank``'s actor (dead, stalled or alive) and create a fresh one in the same bundle; the
        caller sets it up. Its facts are forgotten until then."""
        ray.kill(self.actors[rank], no_restart=True)
        self.actors[rank] = self._create(rank)
        if rank < len(self.facts):
            self.facts[rank] = {}

    def __len__(self) -> int:
        return len(self.actors)

    def _names(self, ranks: Sequence[int]) -> list[Who]:
        return [self.who(r) for r in ranks]

    def who(self, rank: int) -> Who:
        """Rank ``rank``, with its node and pid once the group has started (what an error names)."""
        if rank < len(self.facts) and self.facts[rank]:
            f = self.facts[rank]
            return Who(self.name, rank, f"node {f.get('node')}, pid {f.get('pid')}")
        return Who(self.name, rank)

    def _remote(self, actor: Any, method: Callable) -> Any:
        return getattr(actor, method.__name__)

    def call_all(self, method: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> list[Any]:
        """Call ``method`` on every rank with the same arguments."""
        refs = [self._remote(a, method).remote(*args, **kwargs) for a in self.actors]
        return self.wait(refs, method.__name__, timeout_s)

    def call_split(self, method: Callable, per_rank: Sequence[Any], *args: Any, timeout_s: float | None = None,
                   **kwargs: Any) -> list[Any]:
        """Call ``method(per_rank[r], *args)`` on rank r (the data-parallel split)."""
        if len(per_rank) != len(self.actors):
            raise ValueError(f"{self.name}.{method.__name__}: {len(per_rank)} shards for {len(self.actors)} ranks")
        refs = [self._remote(a, method).remote(x, *args, **kwargs) for a, x in zip(self.actors, per_rank)]
        return self.wait(refs, method.__name__, timeout_s)

    def call_rank0(self, method: Callable, *args: Any, timeout_s: float | None = None, **kwargs: Any) -> Any:
        """Call ``method`` on rank 0 only."""
        ref = self._remote(self.actors[0], method).remote(*args, **kwargs)
        return self.wait([ref], method.__name__, timeout_s)[0]

    def async_all(self, method: Callable, *args: Any, **kwargs: Any) -> list[ray.ObjectRef]:
        """Start ``method`` on every rank and return the refs (for overlapping with other groups)."""
        return [self._remote(a, method).remote(*args, **kwargs) for a in self.actors]

    def async_split(self, method: Callable, per_rank: Sequence[Any], *args: Any) -> list[ray.ObjectRef]:
        """Start ``method(per_rank[r], *args)`` on rank r and return the refs."""
        return [self._remote(a, method).remote(x, *args) for a, x in zip(self.actors, per_rank)]

    def call_ranks(self, method: Callable, ranks: Sequence[int], *args: Any, timeout_s: float | None = None) -> list[Any]:
        """Call ``method`` on the given ranks only (e.g. the setup of replaced ones)."""
        refs = [self._remote(self.actors[r], method).remote(*args) for r in ranks]
        return wait_named(refs, self._names(ranks), f"{self.name}.{method.__name__}", timeout_s or self.timeout_s)

    def wait(self, refs: Sequence[ray.ObjectRef], method: str, timeout_s: float | None = None) -> list[Any]:
        """Wait for refs from ``async_all`` with this group's naming and timeout."""
        return wait_named(refs, self._names(range(len(refs))), f"{self.name}.{method}", timeout_s or self.timeout_s)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
