#!/usr/bin/env bash
# One-command check of the GPU path with tiny models built from configs (no internet, no vLLM,
# Ultralytics or bittensor needed): every transformers tier on the card, the engine with all of
# them resident, measured memory against the planner's booking, latency p50/p99 at batch 1 and
# at max batch, and a two-device placement simulated on the one card. Prints one table and
# writes runs/gpu_check.json. Under 8 minutes on one H100/H200 (the models are tiny).
#   scripts/gpu_check.sh                         # cuda:0
#   scripts/gpu_check.sh --device cpu --repeats 3   # the CPU dry run (what CI exercises)
#   scripts/gpu_check.sh --vendor                # on a machine with PyPI: put the small pure-Python
#                                                # deps the check needs beyond torch/transformers/
#                                                # accelerate into .gpu-deps/ to carry along
# Extra arguments go to scripts/gpu_check.py (see --help). Exit 1 if a tier or the engine failed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
DEPS=(loguru prometheus-client pyyaml)
if [ "${1:-}" = "--vendor" ]; then
  "$PY" -m pip install --quiet --no-deps --target .gpu-deps "${DEPS[@]}"
  echo "vendored ${DEPS[*]} into .gpu-deps/ (carry it with the tree; gpu_check.sh adds it to PYTHONPATH)"
  exit 0
fi
[ -d .gpu-deps ] && export PYTHONPATH="$PWD/.gpu-deps${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'PY'
import importlib.util
need = ["torch", "transformers", "accelerate", "PIL", "numpy", "loguru", "prometheus_client", "yaml"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
PY
)
if [ -n "$missing" ]; then
  echo "error: missing Python modules: $missing (run scripts/gpu_check.sh --vendor where PyPI is reachable)" >&2
  exit 2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
if command -v nvidia-smi >/dev/null 2>&1; then
  nvidia-smi --query-gpu=index,name,memory.used,memory.total,driver_version --format=csv
fi
exec "$PY" scripts/gpu_check.py "$@"
