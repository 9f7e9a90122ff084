#!/usr/bin/env bash
# Quickstart 1: install the CPU stack if needed, then a tiny pipeline on CPU: SFT -> GRPO (vLLM rollouts,
# DeepSpeed learners, weight sync) -> eval with a gate (rlhf_ray/configs/demo_pipeline.yaml). ~3 min on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_cpu.sh
exec rlhf-ray demo "$@"
