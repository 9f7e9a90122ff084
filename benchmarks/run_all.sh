#!/usr/bin/env bash
# Every benchmark of one size, one after the other (each calibrates the device itself, before and after).
#   bash benchmarks/run_all.sh --tiny     # CPU, ~7 min: GRPO (+ TRL beside it), GRPO long tail, PPO, SFT, DPO
#   bash benchmarks/run_all.sh --gpu      # one GPU (see benchmarks/README.md for staging the stack there)
# On a machine that limits one command's time, run the lines one by one instead; GRPO and TRL can be split:
#   python benchmarks/bench_rl.py --job grpo --gpu && python benchmarks/bench_trl.py --from runs/bench/grpo-gpu
set -euo pipefail
cd "$(dirname "$0")/.."
size="${1:---tiny}"
case "$size" in
  --tiny|--gpu) ;;
  *) echo "usage: bash benchmarks/run_all.sh [--tiny | --gpu]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python3}"
trl=()
if "$PY" -c "import trl" 2>/dev/null; then trl=(--with-trl); else echo "trl not installed: GRPO runs without TRL beside it" >&2; fi
"$PY" benchmarks/calibrate.py
"$PY" benchmarks/bench_rl.py --job grpo "$size" "${trl[@]}"
"$PY" benchmarks/bench_rl.py --job grpo "$size" --long-tail
"$PY" benchmarks/bench_rl.py --job ppo "$size"
"$PY" benchmarks/bench_offline.py --job sft "$size"
"$PY" benchmarks/bench_offline.py --job dpo "$size"
