#!/usr/bin/env bash
# Create .venv if missing and install the miner (editable) with the test extras.
# Every install goes through constraints.txt so torch stays the CPU 2.13.0 build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
  echo "[bootstrap] creating .venv with $($PY --version)"
  "$PY" -m venv .venv
fi
stamp=.venv/.natix-installed
want=$(cat setup.py requirements.txt constraints.txt | sha256sum | cut -c1-16)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[bootstrap] installing into .venv (first run takes a few minutes; pip lists each package)"
  start=$(date +%s)
  .venv/bin/python -m pip install -q --upgrade pip wheel setuptools
  # No -q: pip prints each package it collects and installs (a progress bar on a terminal).
  .venv/bin/python -m pip install --progress-bar on -c constraints.txt -e ".[test]"
  echo "$want" > "$stamp"
  echo "[bootstrap] installed in $(( $(date +%s) - start )) s"
fi
