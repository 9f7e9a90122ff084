"""Start or join Ray, and describe what the cluster has."""

from __future__ import annotations

import logging
import os

from rlhf_ray.config.schema import RayConfig

log = logging.getLogger(__name__)


def init_ray(cfg: RayConfig) -> dict[str, float]:
    """Join ``cfg.address`` (or ``RAY_ADDRESS``, as under ``ray job submit``) or start a local instance.

    Returns the cluster's total resources. Logical GPUs (``num_gpus``) may be declared on a CPU
    machine for placement tests; actors then run on CPU but are placed as if on GPUs.
    """
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:
            ray.init(num_cpus=cfg.num_cpus, num_gpus=cfg.num_gpus, include_dashboard=False,
                     log_to_driver=True)
    return dict(ray.cluster_resources())


def node_resources() -> list[dict[str, float]]:
    """Resources of each alive node (for placement checks)."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]
