"""Laying an offline job's examples out as micro-batches for lockstep calls on a learner group.

ZeRO-3 forwards are collective, so every rank of a group must run the same number of micro-batches per call,
also over data sets that do not split evenly (evaluation sets, the reference pass over the whole data).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from rlhf_ray.data.batching import shard_for_rank
from rlhf_ray.objectives.preference import REF_KEY

if TYPE_CHECKING:
    from rlhf_ray.controller.roles import LearnerRole
    from rlhf_ray.objectives.common import BatchTotals, Forward, Objective

Collate = Callable[[list[Any]], dict]


def collate_with_reference(collate: Collate, examples: Sequence[Any]) -> dict:
    """``collate(examples)`` plus the precomputed reference values when the examples carry them."""
    mb = collate(list(examples))
    if isinstance(examples[0], dict) and REF_KEY in examples[0]:
        mb[REF_KEY] = torch.tensor([ex[REF_KEY] for ex in examples], dtype=torch.float32)
    return mb


@dataclass
class LockstepCall:
    """One fan-out call over a data set that does not split evenly: each rank's micro-batches of indices.

    ``counted[r]`` is False where rank r only repeats another micro-batch to keep in step and its results
    are to be dropped.
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

    def __init__(self, collate: Collate, examples: Sequence[Any], calls: list[LockstepCall]):
        self.calls = calls
        self.tensors = [[[collate_with_reference(collate, [examples[i] for i in mb]) for mb in rank]
                         for rank in c.per_rank] for c in calls]
        self.referenced = False

    @classmethod
    def step(cls, collate: Collate, examples: Sequence[Any], batch: list[int], world: int, micro: int) -> "Batches":
        """One global batch of indices: it splits evenly, so one call with every rank counted."""
        return cls(collate, examples, [LockstepCall(shard_for_rank(batch, world, micro), [True] * world)])

    def infer(self, role: "LearnerRole", forward: "Forward") -> list[torch.Tensor]:
        """The counted outputs of ``role``'s no-grad ``forward``, one tensor per micro-batch."""
        out = []
        for call, tensors in zip(self.calls, self.tensors):
            results = role.infer(tensors, forward)
            out += [y for ok, rank_out in zip(call.counted, results) if ok for y in rank_out]
        return out

    def attach_reference(self, reference: "LearnerRole", forward: "Forward") -> None:
        """Put the reference group's outputs into each micro-batch as ``ref_logps`` (once)."""
        if self.referenced:
            return
        self.referenced = True
        for tensors in self.tensors:
            results = reference.infer(tensors, forward)
            for rank_mbs, rank_out in zip(tensors, results):
                for mb, y in zip(rank_mbs, rank_out):
                    mb[REF_KEY] = y

    def evaluate(self, role: "LearnerRole", objective: "Objective", totals: "BatchTotals") -> list[dict]:
        """Per-rank metric sums of ``objective`` (counted ranks only)."""
        sums = []
        for call, tensors in zip(self.calls, self.tensors):
            results = role.evaluate(tensors, objective, totals)
            sums += [r for ok, r in zip(call.counted, results) if ok]
        return sums


def precompute_reference(role: "LearnerRole", collate: Collate, forward: "Forward", examples: Sequence[Any],
                         micro: int, chunk: int = 2048) -> list[Any]:
    """Copies of ``examples`` carrying ``ref_logps`` from ``role``'s ``forward``.

    Run on the policy group before its first update, i.e. with the reference (initial) weights. The
    data goes through in chunks of ``chunk`` examples so no single call ships the whole data set.
    """
    out = list(examples)
    for start in range(0, len(examples), chunk):
        idx = list(range(start, min(start + chunk, len(examples))))
        batches = Batches(collate, examples, lockstep_calls(idx, role.world, micro))
        values = batches.infer(role, forward)
        counted = [mb for c in batches.calls for ok, rank in zip(c.counted, c.per_rank) if ok for mb in rank]
        for mb, y in zip(counted, values):
            for i, row in zip(mb, y.tolist()):
                out[i] = {**examples[i], REF_KEY: row}
    return out
