#!/usr/bin/env bash
# Quickstart 2 (and CI): install the CPU stack if needed, then run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/install_cpu.sh
exec ${PYTHON:-python3} -m pytest tests -q --durations=15 "$@"
