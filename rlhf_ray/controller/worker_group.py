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


class RemoteCallError(RuntimeError):
    """A remote method raised or its actor died; the message names group, rank and method."""


class RemoteCallTimeout(TimeoutError):
    """A remote method did not return within its timeout; the message names who stalled."""


FAILURE_GRACE_S = 5.0
"""After the first failure, how long to wait for the others: when a rank dies, its peers fail on closed
connections within moments, and the one that died is the one to name."""


def _failure(ref: ray.ObjectRef) -> Optional[Exception]:
    try:
        ray.get(ref, timeout=0)
    except (RayTaskError, RayActorError) as exc:
        return exc
    return None


def wait_named(refs: Sequence[ray.ObjectRef], names: Sequence[str], what: str, timeout_s: float) -> list[Any]:
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
        also = f" (then also failed: {', '.join(name_of[r] for r, _ in failed[1:])})" if len(failed) > 1 else ""
        raise RemoteCallError(f"{what} failed on {name_of[ref]}: {type(cause).__name__}: {cause}{also}") from cause
    if pending:
        stalled = [n for r, n in zip(refs, names) if r in pending]
        raise RemoteCallTimeout(
            f"{what}: no answer from {', '.join(stalled)} within {timeout_s:.0f} s "
            "(raise train.timeout_s if the step is just slow; see the actor logs in the Ray dashboard otherwise)")
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
        remote_cls = ray.remote(spec.actor_cls)
        env = {"TOKENIZERS_PARALLELISM": "false", **(spec.env_vars or {})}
        self.actors = [
            remote_cls.options(
                num_gpus=spec.num_gpus, num_cpus=spec.num_cpus, name=None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=placement_group, placement_group_bundle_index=int(b),
                    placement_group_capture_child_tasks=True),
                runtime_env={"env_vars": env},
            ).remote(rank, spec.num_workers, *actor_args)
            for rank, b in enumerate(bundle_indices)
        ]

    def __len__(self) -> int:
        return len(self.actors)

    def _names(self, ranks: Sequence[int]) -> list[str]:
        return [self.rank_name(r) for r in ranks]

    def rank_name(self, rank: int) -> str:
        """``name[rank r]``, with its node and pid once the group has started (what an error names)."""
        if rank < len(self.facts):
            f = self.facts[rank]
            return f"{self.name}[rank {rank}] (node {f.get('node')}, pid {f.get('pid')})"
        return f"{self.name}[rank {rank}]"

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

    def wait(self, refs: Sequence[ray.ObjectRef], method: str, timeout_s: float | None = None) -> list[Any]:
        """Wait for refs from ``async_all`` with this group's naming and timeout."""
        return wait_named(refs, self._names(range(len(refs))), f"{self.name}.{method}", timeout_s or self.timeout_s)

    def kill(self) -> None:
        for a in self.actors:
            ray.kill(a, no_restart=True)
