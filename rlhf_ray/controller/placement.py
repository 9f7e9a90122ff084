"""Placement plans: which role's actors share which GPUs, on which nodes, computed and checked before any actor starts.

A plan is a list of *pools*; each pool is one Ray placement group of identical bundles
(``{"GPU": g, "CPU": c}``). Roles placed in the same pool are colocated: each member of each role
takes a fraction of its bundle, so Ray puts them on the same device. ``check_plan`` compares the
plan with the cluster's resources and raises ``PlacementError`` naming the role that does not fit.

Which nodes a pool may use is a *node selector*: Ray node labels its bundles require
(``placement.node_selector`` in the config, passed to Ray as the placement group's
``bundle_label_selector``). Nodes get labels from ``ray start --labels key=value``, from ``labels:``
of a node type in a cluster-launcher YAML, or from ``labels:`` of a KubeRay head / worker group. A
selector that no alive node satisfies is a ``PlacementError`` before any actor starts.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Literal, Mapping, Optional

from rlhf_ray.config.schema import PLACEMENT_STRATEGIES

log = logging.getLogger(__name__)

Strategy = Literal[PLACEMENT_STRATEGIES]  # type: ignore[valid-type]


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
    """One placement group: ``size`` bundles shared by the roles listed in ``roles``.

    ``node_selector`` (label -> value, Ray selector syntax) restricts every bundle to nodes carrying
    those labels; empty means any node.
    """

    name: str
    size: int
    gpus_per_bundle: float
    cpus_per_bundle: float
    roles: list[str] = field(default_factory=list)
    strategy: Strategy = "PACK"
    node_selector: dict[str, str] = field(default_factory=dict)

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
            where = f" on nodes {format_selector(p.node_selector)}" if p.node_selector else ""
            lines.append(f"  pool {p.name}: {p.size} x {{{res}}} ({p.strategy}){where} <- {', '.join(p.roles)}")
        return "\n".join(lines)

    def total(self) -> dict[str, float]:
        out = {"CPU": 0.0, "GPU": 0.0}
        for p in self.pools:
            out["CPU"] += p.size * p.cpus_per_bundle
            out["GPU"] += p.size * p.gpus_per_bundle
        return out


def format_selector(selector: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in selector.items()) + "}"


def plan_placement(requests: list[RoleRequest], colocate: list[list[str]] | None = None,
                   strategy: str = "PACK", node_selector: Mapping[str, Mapping[str, str]] | None = None,
                   role_strategy: Mapping[str, str] | None = None) -> PlacementPlan:
    """Group roles into pools: each set in ``colocate`` shares one pool, every other role gets its own.

    Colocated roles must agree on worker count and GPUs per worker (they share devices one to one).
    ``node_selector`` maps a role to the node labels its pool requires; ``role_strategy`` overrides
    ``strategy`` for a role's pool. Roles sharing a pool have their selectors merged and must not
    disagree on a label or a strategy; naming a role the job does not have is an error.
    """
    by_role = {r.role: r for r in requests}
    node_selector = {r: dict(s) for r, s in (node_selector or {}).items() if s}
    role_strategy = dict(role_strategy or {})
    for key, mapping in (("placement.node_selector", node_selector), ("placement.role_strategy", role_strategy)):
        unknown = sorted(set(mapping) - set(by_role))
        if unknown:
            raise PlacementError(f"{key} names role(s) {unknown} but this job's roles are {sorted(by_role)}")
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
        pools.append(Pool(name, first.num_workers, first.gpus, sum(by_role[r].cpus for r in present), present,
                          _pool_strategy(present, strategy, role_strategy),  # type: ignore[arg-type]
                          _merged_selector(present, node_selector)))
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
        pools.append(Pool(req.role, req.num_workers, req.gpus, req.cpus, [req.role],
                          role_strategy.get(req.role, strategy),  # type: ignore[arg-type]
                          dict(node_selector.get(req.role, {}))))
        role_pool[req.role] = req.role
        role_share[req.role] = 1.0
        seen.add(req.role)
    return PlacementPlan(pools, role_pool, role_share, by_role)


def _pool_strategy(roles: list[str], default: str, role_strategy: Mapping[str, str]) -> str:
    chosen = {role_strategy[r] for r in roles if r in role_strategy}
    if len(chosen) > 1:
        raise PlacementError(f"placement.role_strategy: colocated roles {roles} share one placement group "
                             f"but ask for different strategies {sorted(chosen)}")
    return chosen.pop() if chosen else default


def _merged_selector(roles: list[str], node_selector: Mapping[str, Mapping[str, str]]) -> dict[str, str]:
    merged: dict[str, str] = {}
    for r in roles:
        for label, value in node_selector.get(r, {}).items():
            if merged.setdefault(label, value) != value:
                raise PlacementError(
                    f"placement.node_selector: colocated roles {roles} share one placement group but ask for "
                    f"{label}={merged[label]} and {label}={value}")
    return merged


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Ray's label-selector semantics: ``v`` equals, ``!v`` differs, ``in(a,b)`` one of, ``!in(a,b)`` none of
    (a node without the label satisfies the negated forms only)."""
    for label, expr in selector.items():
        expr = expr.strip()
        negate = expr.startswith("!")
        body = expr[1:] if negate else expr
        if body.startswith("in(") and body.endswith(")"):
            values = {v.strip() for v in body[3:-1].split(",")}
        else:
            values = {body}
        has = label in labels and labels[label] in values
        if has == negate:
            return False
    return True


def _bundles_fitting(node: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of ``bundle`` fit in a node's total resources."""
    fits = [math.floor(node.get(k, 0.0) / v + 1e-9) for k, v in bundle.items() if v > 0]
    return min(fits) if fits else 0


def check_plan(plan: PlacementPlan, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None,
               labeled_nodes: Optional[list[tuple[dict[str, float], dict[str, str]]]] = None) -> None:
    """Raise ``PlacementError`` when the plan needs more than the cluster has, naming the role.

    ``labeled_nodes`` lists ``(resources, labels)`` of each alive node; when a pool has a node selector
    and it is not given, it is read from the running Ray cluster. A selector no node satisfies, or whose
    nodes cannot hold the pool's bundles (as its strategy requires), is an error naming
    ``placement.node_selector``.
    """
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
    if not any(p.node_selector for p in plan.pools):
        return
    if labeled_nodes is None:
        labeled_nodes = cluster_nodes()
    for p in plan.pools:
        if p.node_selector and p.size:
            _check_pool_nodes(p, labeled_nodes)


def _check_pool_nodes(p: Pool, labeled_nodes: list[tuple[dict[str, float], dict[str, str]]]) -> None:
    key = f"placement.node_selector ({', '.join(p.roles)})"
    matching = [res for res, labels in labeled_nodes if selector_matches(p.node_selector, labels)]
    if not matching:
        seen = sorted({format_selector({k: v for k, v in labels.items() if not k.startswith("ray.io/")})
                       for _, labels in labeled_nodes})
        raise PlacementError(
            f"{key}: no alive node has the labels {format_selector(p.node_selector)} (node labels in this "
            f"cluster: {', '.join(seen) or 'none'}). Label a node group (`ray start --labels k=v`, `labels:` of a "
            "cluster-launcher node type or a KubeRay group) or change the selector.")
    bundle = p.bundles[0]
    per_node = [_bundles_fitting(res, bundle) for res in matching]
    what = f"pool '{p.name}' ({p.size} x {format_selector({k: f'{v:g}' for k, v in bundle.items()})}, {p.strategy})"
    if p.strategy == "STRICT_PACK":
        ok, room = max(per_node) >= p.size, f"at most {max(per_node)} on one node"
    elif p.strategy == "STRICT_SPREAD":
        ok, room = sum(n > 0 for n in per_node) >= p.size, f"{sum(n > 0 for n in per_node)} nodes hold one"
    else:
        ok, room = sum(per_node) >= p.size, f"{sum(per_node)} fit in all of them together"
    if not ok:
        raise PlacementError(
            f"{key}: {what} does not fit on the {len(matching)} node(s) labelled {format_selector(p.node_selector)} "
            f"({room}). Add nodes with those labels, lower num_workers / num_engines, or widen the selector.")


def cluster_nodes() -> list[tuple[dict[str, float], dict[str, str]]]:
    """``(resources, labels)`` of each alive node of the connected Ray cluster."""
    import ray

    return [(dict(n.get("Resources", {})), dict(n.get("Labels", {}))) for n in ray.nodes() if n.get("Alive")]


def create_pools(plan: PlacementPlan, timeout_s: float) -> dict[str, object]:
    """Create one Ray placement group per pool and wait (bounded) until each is scheduled."""
    import ray
    from ray.util.placement_group import placement_group

    groups = {}
    for p in plan.pools:
        selector = [dict(p.node_selector) for _ in range(p.size)] if p.node_selector else None
        pg = placement_group(p.bundles, strategy=p.strategy, name=f"rlhf_ray-{p.name}", bundle_label_selector=selector)
        groups[p.name] = pg
        ready, _ = ray.wait([pg.ready()], timeout=timeout_s)
        if not ready:
            where = f" on nodes {format_selector(p.node_selector)}" if p.node_selector else ""
            remove_pools(groups)
            raise PlacementError(
                f"placement group for {p.name} ({p.size} x {p.bundles[0]}, {p.strategy}{where}) was not scheduled "
                f"within {timeout_s:.0f} s; cluster resources: {ray.available_resources()}")
    return groups


def remove_pools(pools: dict[str, object]) -> None:
    """Release the placement groups of a finished (or failed) job."""
    from ray.util.placement_group import remove_placement_group

    for pg in pools.values():
        try:
            remove_placement_group(pg)
        except Exception:  # noqa: BLE001 - best effort at teardown; the original error matters more
            log.debug("could not remove placement group %s", pg, exc_info=True)
