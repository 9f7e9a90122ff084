#!/usr/bin/env bash
# Run a job on one machine with several GPUs: start a local Ray head (or join the one already
# running), then train. Usage: bash launch/single_node.sh CONFIG [key=value ...]
set -euo pipefail
cd "$(dirname "$0")/.."
if ! ray status >/dev/null 2>&1; then
  NUM_GPUS=$(python3 -c "import torch; print(torch.cuda.device_count())")
  ray start --head --num-gpus="${NUM_GPUS}" --disable-usage-stats --include-dashboard=true
  trap 'ray stop' EXIT
fi
RAY_ADDRESS=auto rlhf-ray train "$@"
