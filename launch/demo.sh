#!/usr/bin/env bash
# Quickstart 1: install the CPU stack if needed, then a tiny end-to-end SFT run on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_cpu.sh
exec rlhf-ray demo "$@"
