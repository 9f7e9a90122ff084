"""Starting a job's roles from ``Resolved.roles`` and removing them again, as one object.

``Roles.start`` creates the placement groups of ``Resolved.plan`` and starts every role at once (one loop over
the role specs); actors and placement groups are registered as they are created, so ``Roles.teardown`` (the
job front calls it in a ``finally``) removes whatever exists, including after a start-up that failed halfway.

Placement modes (``placement.mode``): separate (every role its own GPUs), shared (actor + reference and
critic + reward model share GPUs), hybrid (every role on the learners' GPUs, one bundle per GPU: rank i of
each learner group and engine i share GPU i; vLLM sleeps while the learners train).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Union

from rlhf_ray.config.resolve import LearnerRoleSpec, RolloutRoleSpec
from rlhf_ray.controller.roles import LearnerRole, RolloutRole
from rlhf_ray.controller.worker_group import GroupSpec, WorkerGroup

if TYPE_CHECKING:
    from rlhf_ray.config.resolve import Resolved, RoleSpec
    from rlhf_ray.controller.placement import PlacementPlan

log = logging.getLogger(__name__)

Role = Union[LearnerRole, RolloutRole]


def _env(gpus: float, learner: bool) -> dict[str, str]:
    """Actors without GPUs must not probe for CUDA (DeepSpeed would pick its CUDA accelerator)."""
    if gpus > 0:
        return {}
    return {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""} if learner else {"CUDA_VISIBLE_DEVICES": ""}


@dataclass
class PendingRole:
    """A role whose workers are still setting up."""

    spec: "RoleSpec"
    group: WorkerGroup
    refs: list

    def ready(self, timeout_s: float, start_timeout_s: float) -> Role:
        """Wait (at most ``start_timeout_s``) for every worker's setup; a failing rank is named."""
        facts = self.group.wait(self.refs, "setup", start_timeout_s)
        self.group.facts = facts
        f0 = facts[0]
        if isinstance(self.spec, LearnerRoleSpec):
            log.info("%s: %d ranks on %s (%s), %.2fM params (%.2fM trainable)", self.group.name, len(facts),
                     sorted({f["node"] for f in facts}), f0["backend"], f0["params"] / 1e6,
                     f0["trainable_params"] / 1e6)
            return LearnerRole(self.spec.name, self.group, self.spec.learner.micro_batch_size)
        log.info("%s: %d engines on %s, started in %.1f s", self.group.name, len(facts),
                 sorted({f["node"] for f in facts}), max(f["start_s"] for f in facts))
        return RolloutRole(self.group, timeout_s)


@dataclass
class Roles:
    """Every started role of one job, by group name (actor, reference, critic, reward_model, rollout, learner)."""

    plan: "PlacementPlan"
    timeout_s: float
    """Any call of a step (``train.timeout_s``)."""
    start_timeout_s: float
    """Placement groups ready, and each role's setup (``train.start_timeout_s``)."""
    pools: dict[str, Any] = field(default_factory=dict)
    started: dict[str, Role] = field(default_factory=dict)
    specs: dict[str, "RoleSpec"] = field(default_factory=dict)
    groups: list[WorkerGroup] = field(default_factory=list)
    """Every group created, ready or not (what teardown kills)."""

    # ---- start and stop -----------------------------------------------------------------------------
    def start(self, resolved: "Resolved", total_steps: int, output_dir: Optional[Path] = None) -> "Roles":
        """Create the pools and start every role of ``resolved`` concurrently (engines first); returns self."""
        from rlhf_ray.controller.placement import create_pools

        self.pools = create_pools(self.plan, self.start_timeout_s)
        engines_first = sorted(resolved.roles, key=lambda r: not isinstance(r, RolloutRoleSpec))
        pending = []
        for spec in engines_first:
            pending.append(self._launch(spec, total_steps))
            if isinstance(spec, RolloutRoleSpec) and spec.sleep_mode:
                # vLLM sizes its KV cache from the GPU memory free when it starts: let it start alone, then
                # sleep (a no-op on CPU) before the learners load onto the same GPUs. The loop wakes it.
                engines = pending[-1].ready(self.timeout_s, self.start_timeout_s)
                self.started[spec.name] = engines
                engines.sleep()
        for p in pending:
            if p.spec.name not in self.started:
                self.started[p.spec.name] = p.ready(self.timeout_s, self.start_timeout_s)
        if output_dir is not None:
            (output_dir / "placement.json").write_text(json.dumps(
                {"mode": resolved.config.placement.mode, "plan": self.plan.describe(),
                 "roles": self.placement_report()}, indent=2))
        return self

    def _launch(self, spec: "RoleSpec", total_steps: int) -> PendingRole:
        """Create ``spec``'s actors in their pool's bundles (rank i takes bundle i) and start their setup."""
        from rlhf_ray.workers.learner import LearnerWorker
        from rlhf_ray.workers.rollout import RolloutWorker

        plan, learner = self.plan, isinstance(spec, LearnerRoleSpec)
        group = WorkerGroup(
            GroupSpec(name=spec.name, actor_cls=LearnerWorker if learner else RolloutWorker,
                      num_workers=spec.num_workers, num_gpus=spec.gpus * plan.role_share[spec.placement_role],
                      num_cpus=spec.cpus, env_vars=_env(spec.gpus, learner)),
            self.pools[plan.role_pool[spec.placement_role]], list(range(spec.num_workers)), self.timeout_s)
        self.groups.append(group)
        self.specs[spec.name] = spec
        if learner:
            master = group.call_rank0(LearnerWorker.rendezvous, timeout_s=self.start_timeout_s)  # the actor starts
            refs = group.async_all(LearnerWorker.setup, master, spec, total_steps, self.timeout_s)
        else:
            refs = group.async_all(RolloutWorker.setup, spec)
        return PendingRole(spec, group, refs)

    def replace_engines(self, ranks: tuple[int, ...]) -> None:
        """New vLLM engines for ``ranks`` (dead or stalled), each in its predecessor's bundle, set up (bounded by
        ``start_timeout_s``) with the role's spec. They hold ``model.path``'s weights until the caller syncs."""
        from rlhf_ray.workers.rollout import RolloutWorker

        group, spec = self.rollout.group, self.specs["rollout"]
        for r in ranks:
            group.respawn(r)
        for r, facts in zip(ranks, group.call_ranks(RolloutWorker.setup, ranks, spec, timeout_s=self.start_timeout_s)):
            group.facts[r] = facts
            log.info("%s: replaced, started in %.1f s", group.who(r), facts["start_s"])

    def teardown(self) -> None:
        """Kill every actor and remove every placement group this object created (best effort, idempotent)."""
        from rlhf_ray.controller.placement import remove_pools

        for group in self.groups:
            group.kill()
        remove_pools(self.pools)
        self.groups, self.pools, self.started, self.specs = [], {}, {}, {}

    # ---- lookup -------------------------------------------------------------------------------------
    def get(self, name: str) -> Optional[Role]:
        return self.started.get(name)

    @property
    def actor(self) -> Optional[LearnerRole]:
        return self.started.get("actor")  # type: ignore[return-value]

    @property
    def reference(self) -> Optional[LearnerRole]:
        return self.started.get("reference")  # type: ignore[return-value]

    @property
    def critic(self) -> Optional[LearnerRole]:
        return self.started.get("critic")  # type: ignore[return-value]

    @property
    def reward_model(self) -> Optional[LearnerRole]:
        return self.started.get("reward_model")  # type: ignore[return-value]

    @property
    def learner(self) -> Optional[LearnerRole]:
        return self.started.get("learner")  # type: ignore[return-value]

    @property
    def rollout(self) -> RolloutRole:
        return self.started["rollout"]  # type: ignore[return-value]

    def learners(self) -> list[LearnerRole]:
        """Every learner group (what offloads and reloads around generation in hybrid placement)."""
        return [r for r in self.started.values() if isinstance(r, LearnerRole)]

    def placement_report(self) -> dict[str, list[dict[str, Any]]]:
        """Per role, where each rank landed (node, GPU ids, pool, bundle): written to ``placement.json``."""
        out = {}
        for name, role in self.started.items():
            pool = self.plan.role_pool[self.specs[name].placement_role]
            out[name] = [{"rank": i, "node": f.get("node"), "node_id": f.get("node_id"), "gpu_ids": f.get("gpu_ids"),
                          "pid": f.get("pid"), "pool": pool, "bundle": i} for i, f in enumerate(role.group.facts)]
        return out
