"""Measure this machine's device: matmul TFLOP/s in the run's dtype, memory bandwidth (one large on-device
copy), host<->device copy, and GPU peer copy when two GPUs are visible. Every benchmark runs this first and
states its floors with these numbers (``rlhf_ray.efficiency.Calibration``).

    python benchmarks/calibrate.py                       # this machine's GPU, else its CPU
    python benchmarks/calibrate.py --device cpu --json cal.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python benchmarks/<file>.py`: the repository root importable, as with -m
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default="auto", help="auto (bfloat16 on GPU, float32 on CPU), bfloat16, float32")
    p.add_argument("--matmul-size", type=int, default=None)
    p.add_argument("--copy-mb", type=int, default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)

    from rlhf_ray.efficiency import calibrate_here

    cal = calibrate_here(dtype=args.dtype, device=args.device, matmul_size=args.matmul_size, copy_mb=args.copy_mb,
                         repeats=args.repeats)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(cal, indent=2) + "\n")
    if not args.quiet:
        peer = f", GPU->GPU {cal['d2d_gbps']:.4g} GB/s" if cal.get("d2d_gbps") else ""
        peak = f" (datasheet peak {cal['peak_tflops']})" if cal.get("peak_tflops") else ""
        print(f"{cal['device']} {cal['device_name']} {cal['dtype']} ({cal['threads']} threads): "
              f"matmul {cal['matmul_tflops']:.4g} TFLOP/s at n={cal['matmul_size']}{peak}, "
              f"memory {cal['mem_gbps']:.4g} GB/s, host->device {cal['h2d_gbps']:.4g} GB/s, "
              f"device->host {cal['d2h_gbps']:.4g} GB/s{peer}  [{cal['seconds']:.1f} s]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
