"""Throughput benchmarks: each phase's seconds beside its physical floor, measured in the same run.

See benchmarks/README.md: ``python benchmarks/bench_rl.py --job grpo --tiny`` (or ``python -m benchmarks.bench_rl``),
from the repository root. Outputs go to ``runs/`` under the current directory (GPU results to ``benchmarks/results``).
"""
