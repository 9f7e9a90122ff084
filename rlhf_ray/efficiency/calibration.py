"""What one device measurably does (matmul rate, memory and copy bandwidths): the floors' denominators.

MFU is taken against the datasheet peak when the device is known (``PEAK_TFLOPS``) and the measured matmul
rate otherwise. torch is imported only inside ``Calibration.measure`` (and ``calibrate_here``).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

from rlhf_ray.config.resolve import auto_dtype
from rlhf_ray.efficiency.shapes import DTYPE_BYTES

PEAK_TFLOPS: dict[str, dict[str, float]] = {
    # Dense (no sparsity) tensor-core peaks from the vendors' datasheets, TFLOP/s per GPU.
    "H200": {"bfloat16": 989.4, "float16": 989.4},
    "H100 PCIe": {"bfloat16": 756.0, "float16": 756.0},
    "H100": {"bfloat16": 989.4, "float16": 989.4},
    "A100": {"bfloat16": 312.0, "float16": 312.0},
    "L40S": {"bfloat16": 362.0, "float16": 362.0},
}
"""Looked up by the first key contained in the device name (so "H100 PCIe" is listed before "H100")."""


@dataclass
class Calibration:
    """What one device measurably does: matmul rate, memory and copy bandwidths (the floors' denominators).

    Rates are the best of a few repeats (the least noisy estimate of what the device can do). On a CPU
    "the device" is the whole machine at ``threads`` threads, and host and device are the same memory,
    so the host<->device rates are plain copy rates.
    """

    device: str
    """``cuda`` or ``cpu``."""
    device_name: str
    dtype: str
    """The dtype of the matmuls (the run's compute dtype) and of the weights in the bytes formulas."""
    matmul_tflops: float
    """Measured dense matmul rate, TFLOP/s, for an n x n x n product in ``dtype``."""
    matmul_size: int
    mem_gbps: float
    """Memory bandwidth, GB/s (1e9 bytes), counting bytes read + written by one large on-device copy."""
    h2d_gbps: float
    """Host -> device copy (pinned host memory on CUDA), GB/s of bytes copied."""
    d2h_gbps: float
    d2d_gbps: Optional[float] = None
    """GPU -> another GPU copy rate, GB/s, when two GPUs were visible; None otherwise."""
    peak_tflops: Optional[float] = None
    """The device's datasheet dense peak in ``dtype`` when known (``PEAK_TFLOPS``); MFU is against it."""
    threads: int = 1
    seconds: float = 0.0
    """How long the calibration took."""

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES.get(self.dtype, 4)

    @property
    def matmul_flops_per_s(self) -> float:
        return self.matmul_tflops * 1e12

    @property
    def mfu_peak_flops_per_s(self) -> float:
        """The MFU denominator: datasheet peak when known, else the measured matmul rate."""
        return (self.peak_tflops or self.matmul_tflops) * 1e12

    @property
    def mem_bytes_per_s(self) -> float:
        return self.mem_gbps * 1e9

    @property
    def copy_bytes_per_s(self) -> float:
        """Bytes copied per second within one device's memory (each byte read and written: ``mem / 2``)."""
        return self.mem_gbps * 1e9 / 2

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Calibration":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    @classmethod
    def measure(cls, device: Optional[str] = None, dtype: str = "auto", matmul_size: Optional[int] = None,
                copy_mb: Optional[int] = None, repeats: int = 5) -> "Calibration":
        """Measure this process's device: ``cuda`` (the current GPU) when available, else ``cpu``.

        ``dtype`` auto is bfloat16 on CUDA and float32 on CPU (as ``model.dtype: auto``; ``auto_dtype``).
        Defaults: an 8192^3 matmul and 2 GiB copies on CUDA, 1024^3 and 256 MiB on CPU (a few seconds).
        """
        import torch

        t_start = time.perf_counter()
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        on_cuda = device.startswith("cuda")
        dtype = auto_dtype(dtype, on_cuda)
        tdtype = getattr(torch, dtype)
        n = matmul_size or (8192 if on_cuda else 1024)
        nbytes = (copy_mb or (2048 if on_cuda else 256)) << 20
        dev = torch.device(device)
        best_seconds = _best_of(torch.cuda.synchronize if on_cuda else (lambda: None), repeats)
        matmul_tflops = _matmul_tflops(dev, tdtype, n, best_seconds)

        src = torch.empty(nbytes, dtype=torch.uint8, device=dev).fill_(1)
        dst = torch.empty_like(src)
        mem_gbps = 2.0 * nbytes / best_seconds(lambda: dst.copy_(src)) / 1e9
        if on_cuda:
            h2d, d2h, d2d = _cuda_copy_gbps(src, dst, dev, nbytes, best_seconds)
            name = torch.cuda.get_device_name(dev)
            threads = 1
        else:
            h2d = d2h = mem_gbps / 2
            d2d = None
            name = cpu_name()
            threads = torch.get_num_threads()
        del src, dst
        return cls(device="cuda" if on_cuda else "cpu", device_name=name, dtype=dtype,
                   matmul_tflops=matmul_tflops, matmul_size=n, mem_gbps=mem_gbps, h2d_gbps=h2d, d2h_gbps=d2h,
                   d2d_gbps=d2d, peak_tflops=datasheet_peak_tflops(name, dtype), threads=threads,
                   seconds=time.perf_counter() - t_start)


def _best_of(sync: Callable[[], Any], repeats: int) -> Callable[[Callable[[], Any]], float]:
    """A timer: the least seconds of ``repeats`` calls of a function (after two warm-up calls), ``sync``ed."""

    def best_seconds(fn: Callable[[], Any]) -> float:
        fn()
        fn()
        sync()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        return max(best, 1e-9)

    return best_seconds


def _matmul_tflops(dev: Any, tdtype: Any, n: int, best_seconds: Callable[[Callable[[], Any]], float]) -> float:
    """TFLOP/s of an n x n x n matmul in ``tdtype`` on ``dev`` (its buffers freed on return)."""
    import torch

    a = torch.randn(n, n, device=dev, dtype=tdtype)
    b = torch.randn(n, n, device=dev, dtype=tdtype)
    out = torch.empty(n, n, device=dev, dtype=tdtype)
    matmul_tflops = 2.0 * n ** 3 / best_seconds(lambda: torch.matmul(a, b, out=out)) / 1e12
    del a, b, out
    return matmul_tflops


def _cuda_copy_gbps(src: Any, dst: Any, dev: Any, nbytes: int, best_seconds: Callable[[Callable[[], Any]], float]
                    ) -> tuple[float, float, Optional[float]]:
    """Host -> device, device -> host (pinned host memory) and, with a second GPU visible, peer copy GB/s."""
    import torch

    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    h2d = nbytes / best_seconds(lambda: dst.copy_(host, non_blocking=True)) / 1e9
    d2h = nbytes / best_seconds(lambda: host.copy_(dst, non_blocking=True)) / 1e9
    d2d = None
    if torch.cuda.device_count() > 1:
        here = dev.index if dev.index is not None else torch.cuda.current_device()
        other_dev = torch.device("cuda", (here + 1) % torch.cuda.device_count())
        other = torch.empty(nbytes, dtype=torch.uint8, device=other_dev)

        def peer() -> None:
            other.copy_(src, non_blocking=True)
            torch.cuda.synchronize(other_dev)

        d2d = nbytes / best_seconds(peer) / 1e9
        del other
    del host
    return h2d, d2h, d2d


def datasheet_peak_tflops(device_name: str, dtype: str) -> Optional[float]:
    """Dense peak TFLOP/s of a known GPU in ``dtype`` (``PEAK_TFLOPS``); None when unknown."""
    for key, peaks in PEAK_TFLOPS.items():
        if key in device_name:
            return peaks.get(dtype)
    return None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return f"{platform.processor() or 'cpu'} ({os.cpu_count()} cores)"


def calibrate_here(dtype: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """Measure the calling process's device and return ``Calibration.to_dict()``.

    Meant for a learner actor at setup (its GPU is the one the phases run on). On a CPU it measures
    with every core (the machine is the device) and restores the thread count afterwards. ``dtype`` auto
    is resolved by ``Calibration.measure`` once the device is known.
    """
    import torch

    threads = torch.get_num_threads()
    try:
        if not torch.cuda.is_available():
            torch.set_num_threads(os.cpu_count() or 1)
        return Calibration.measure(dtype=dtype, **kwargs).to_dict()
    finally:
        torch.set_num_threads(threads)
