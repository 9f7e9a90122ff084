"""Placement plans: which role's actors share which GPUs, computed and checked before any actor starts.

A plan is a list of *pools*; each pool is one Ray placement group of identical bundles
(``{"GPU": g, "CPU": c}``). Roles placed in the same pool are colocated: each member of each role
takes a fraction of its bundle, so Ray puts them on the same device. ``check_plan`` compares the
plan with the cluster's resources and raises ``PlacementError`` naming the role that does not fit.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)


class PlacementError(RuntimeError):
    """The requested placement cannot be satisfied by the cluster (or is inconsistent)."""


@dataclass
class RoleRequest:
    """What one role needs: ``num_workers`` actors of ``gpus`` GPUs and ``cpus`` CPUs each."""

    role: str
    num_workers: int
    gpus: float
    cpus: float = 1.0


@dataclass
class Pool:
    """One placement group: ``size`` bundles shared by the roles listed in ``roles``."""

    name: str
    size: int
    gpus_per_bundle: float
    cpus_per_bundle: float
    roles: list[str] = field(default_factory=list)
    strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"

    @property
    def bundles(self) -> list[dict[str, float]]:
        b: dict[str, float] = {"CPU": self.cpus_per_bundle}
        if self.gpus_per_bundle > 0:
            b["GPU"] = self.gpus_per_bundle
        return [dict(b) for _ in range(self.size)]


@dataclass
class PlacementPlan:
    """Pools plus, per role, the pool it lives in and the fraction of a bundle each actor takes."""

    pools: list[Pool]
    role_pool: dict[str, str]
    role_share: dict[str, float]
    requests: dict[str, RoleRequest]

    def describe(self) -> str:
        lines = ["placement plan:"]
        for p in self.pools:
            res = ", ".join(f"{k}={v:g}" for k, v in p.bundles[0].items()) if p.size else "-"
            lines.append(f"  pool {p.name}: {p.size} x {{{res}}} ({p.strategy}) <- {', '.join(p.roles)}")
        return "\n".join(lines)

    def total(self) -> dict[str, float]:
        out = {"CPU": 0.0, "GPU": 0.0}
        for p in self.pools:
            out["CPU"] += p.size * p.cpus_per_bundle
            out["GPU"] += p.size * p.gpus_per_bundle
        return out


def plan_placement(requests: list[RoleRequest], colocate: list[list[str]] | None = None,
                   strategy: str = "PACK") -> PlacementPlan:
    """Group roles into pools: each set in ``colocate`` shares one pool, every other role gets its own.

    Colocated roles must agree on worker count and GPUs per worker (they share devices one to one).
    """
    by_role = {r.role: r for r in requests}
    colocate = [list(g) for g in (colocate or []) if len(g) > 1]
    seen: set[str] = set()
    pools: list[Pool] = []
    role_pool: dict[str, str] = {}
    role_share: dict[str, float] = {}
    for group in colocate:
        present = [r for r in group if r in by_role]
        for r in group:
            if r in seen:
                raise PlacementError(f"role '{r}' is listed in two colocation groups")
        if len(present) < 2:
            continue
        first = by_role[present[0]]
        for r in present[1:]:
            other = by_role[r]
            if (other.num_workers, other.gpus) != (first.num_workers, first.gpus):
                raise PlacementError(
                    f"colocated roles '{first.role}' and '{r}' must have the same workers x GPUs "
                    f"({first.num_workers} x {first.gpus:g} vs {other.num_workers} x {other.gpus:g})")
        name = "+".join(present)
        pools.append(Pool(name, first.num_workers, first.gpus, sum(by_role[r].cpus for r in present),
                          present, strategy))  # type: ignore[arg-type]
        for r in present:
            role_pool[r] = name
            # Each actor asks for a slice of the shared bundle, so all fit on the same device.
            role_share[r] = 1.0 / len(present)
            seen.add(r)
    for req in requests:
        if req.role in seen:
            continue
        if req.num_workers < 1:
            raise PlacementError(f"role '{req.role}' needs at least one worker")
        pools.append(Pool(req.role, req.num_workers, req.gpus, req.cpus, [req.role], strategy))  # type: ignore[arg-type]
        role_pool[req.role] = req.role
        role_share[req.role] = 1.0
        seen.add(req.role)
    return PlacementPlan(pools, role_pool, role_share, by_role)


def check_plan(plan: PlacementPlan, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None) -> None:
    """Raise ``PlacementError`` when the plan needs more than the cluster has, naming the role."""
    need = plan.total()
    for res in ("GPU", "CPU"):
        have = float(cluster.get(res, 0.0))
        if need[res] > have + 1e-9:
            detail = "; ".join(f"{p.name}: {p.size} x {p.bundles[0].get(res, 0):g}" for p in plan.pools)
            raise PlacementError(
                f"placement needs {need[res]:g} {res} but the cluster has {have:g} ({detail}). "
                "Lower num_workers / num_engines, colocate roles, or add nodes.")
    if nodes:
        biggest_gpu = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
        for p in plan.pools:
            if p.gpus_per_bundle > biggest_gpu + 1e-9:
                raise PlacementError(
                    f"pool '{p.name}' needs {p.gpus_per_bundle:g} GPUs in one bundle but no node has more than "
                    f"{biggest_gpu:g}")


def create_pools(plan: PlacementPlan, timeout_s: float) -> dict[str, object]:
    """Create one Ray placement group per pool and wait (bounded) until each is scheduled."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {}
    for p in plan.pools:
        pg = placement_group(p.bundles, strategy=p.strategy, name=f"rlhf_ray-{p.name}")
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            raise PlacementError(
                f"placement group for {p.name} ({p.size} x {p.bundles[0]}) was not scheduled within "
                f"{timeout_s:.0f} s; cluster resources: {ray.available_resources()}")
        groups[p.name] = pg
    return groups


def remove_pools(pools: dict[str, object]) -> None:
    """Release the placement groups of a finished (or failed) job."""
    from ray.util.placement_group import remove_placement_group

    for pg in pools.values():
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - best effort at teardown; the original error matters more
            log.debug("could not remove placement group %s", pg, exc_info=True)
