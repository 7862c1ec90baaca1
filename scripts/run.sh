#!/usr/bin/env bash
# Run any natix-miner command in the project's .venv, creating and installing it first if needed.
#   scripts/run.sh local --images ../shared/data/gtsdb-dashcam-dev
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/natix-miner "$@"
