#!/usr/bin/env bash
# Run a job on one machine with several GPUs: start a Ray head for this run (with the dashboard, so
# `ray job list` / http://127.0.0.1:8265 show it while it trains), train, then stop that head.
#   bash launch/single_node.sh CONFIG [key=value ...]
# With RAY_ADDRESS set (e.g. RAY_ADDRESS=auto for the instance already running here) it joins that
# cluster instead and starts nothing. Environment: NUM_GPUS (default: every CUDA device), NUM_CPUS
# (default: all cores), RAY_PORT (6379), RAY_TEMP_DIR (Ray's logs and spill files; default a new
# /tmp/rlhf-ray-* dir), RAY_START_ARGS (more `ray start` flags, e.g. "--dashboard-port=8266").
# Only the head started here is stopped at the end (`ray stop` would stop every Ray instance on the machine).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
# `ray start --head` turns token authentication on when a token exists (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or
# ~/.ray/auth_token) but a connecting driver does not guess: send the local token if there is one.
if [[ -z "${RAY_AUTH_MODE:-}" ]] && { [[ -n "${RAY_AUTH_TOKEN:-}" ]] || [[ -s "${RAY_AUTH_TOKEN_PATH:-$HOME/.ray/auth_token}" ]]; }; then
  export RAY_AUTH_MODE=token
fi
if [[ -n "${RAY_ADDRESS:-}" ]]; then
  exec "$PYTHON" -m rlhf_ray train "$@"
fi

NUM_GPUS=${NUM_GPUS:-$("$PYTHON" -c "import torch; print(torch.cuda.device_count())")}
TEMP_DIR=${RAY_TEMP_DIR:-$(mktemp -d /tmp/rlhf-ray-XXXXXX)}
# shellcheck disable=SC2086  # RAY_START_ARGS is a list of flags
ray start --head --block --port="${RAY_PORT:-6379}" --num-gpus="$NUM_GPUS" ${NUM_CPUS:+--num-cpus="$NUM_CPUS"} \
  --temp-dir="$TEMP_DIR" --disable-usage-stats ${RAY_START_ARGS:-} &
HEAD_PID=$!
stop_head() {
  kill -TERM "$HEAD_PID" 2>/dev/null || return 0
  for _ in $(seq 20); do kill -0 "$HEAD_PID" 2>/dev/null || return 0; sleep 0.5; done
  kill -KILL "$HEAD_PID" 2>/dev/null || true  # its processes die with it (Ray's fate sharing)
}
trap stop_head EXIT
for _ in $(seq 120); do  # the head writes its address once it is up
  [[ -s "$TEMP_DIR/ray_current_cluster" ]] && break
  kill -0 "$HEAD_PID" 2>/dev/null || { echo "single_node.sh: ray start failed (logs in $TEMP_DIR)" >&2; exit 1; }
  sleep 0.5
done
[[ -s "$TEMP_DIR/ray_current_cluster" ]] || { echo "single_node.sh: Ray head not up after 60 s (logs in $TEMP_DIR)" >&2; exit 1; }
RAY_ADDRESS=$(cat "$TEMP_DIR/ray_current_cluster")
echo "single_node.sh: Ray head at $RAY_ADDRESS with $NUM_GPUS GPUs (logs in $TEMP_DIR)"
RAY_ADDRESS="$RAY_ADDRESS" "$PYTHON" -m rlhf_ray train "$@"
