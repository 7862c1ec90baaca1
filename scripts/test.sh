#!/usr/bin/env bash
# The whole test suite, offline, on a fresh machine: creates .venv if missing, installs, runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec .venv/bin/python -m pytest -q "$@"
