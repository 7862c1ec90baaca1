#!/usr/bin/env bash
# Smoke-test every GPU tier of a config: load, warm up, time a batch, compare memory with the plan.
#   scripts/gpu_smoke.sh                          # configs/gpu-1x.yaml
#   scripts/gpu_smoke.sh configs/h100x2.yaml --batch 16 --repeats 5
#   scripts/gpu_smoke.sh configs/gpu-1x.yaml --device cpu --tiers vit_b16.natix_roadwork
# Extra arguments go to scripts/gpu_smoke.py (see --help). Exit 1 if a tier fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
CONFIG="configs/gpu-1x.yaml"
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then CONFIG="$1"; shift; fi
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv
else
  echo "nvidia-smi not found: no NVIDIA GPU visible (use --device cpu to check CPU-capable tiers)" >&2
fi
status=0
"$PY" scripts/gpu_smoke.py --config "$CONFIG" "$@" || status=$?
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv
fi
exit $status
