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


def _cuda_devices() -> int:
    """CUDA devices this process sees, through the driver library (no torch import: ~0.1 s, not ~3 s)."""
    import ctypes

    try:
        cuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int(0)
    if cuda.cuInit(0) != 0 or cuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return int(count.value)


def probe_accelerator(gpus_per_worker: float, timeout_s: float = 120.0) -> str:
    """Where roles that ask for GPUs really run: "cuda", or "cpu" when Ray's GPUs are logical only (a CPU
    machine started with ``ray.num_gpus`` for placement tests) or when no GPUs are asked for.

    One short task on a GPU of the cluster asks the CUDA driver; a cluster too busy to answer within
    ``timeout_s`` is taken at its word (CUDA).
    """
    import ray

    if gpus_per_worker <= 0:
        return "cpu"
    probe = ray.remote(num_gpus=min(gpus_per_worker, 1.0), num_cpus=0, max_calls=1)(_cuda_devices)
    ref = probe.remote()
    ready, _ = ray.wait([ref], timeout=timeout_s)
    if not ready:
        ray.cancel(ref, force=True)
        log.warning("no GPU free to probe within %.0f s; assuming the cluster's GPUs are CUDA devices", timeout_s)
        return "cuda"
    return "cuda" if ray.get(ref) > 0 else "cpu"
