#!/usr/bin/env bash
# Create .venv/ in the repo root and install sensepack with its test extras.
# torch goes in first, pinned, so that no resolver pulls a multi-GB CUDA build
# on CPU machines (set TORCH_SPEC to choose another build, e.g. on a GPU host).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip 2>/dev/null || true
.venv/bin/python -m pip install --quiet "$TORCH_SPEC"
.venv/bin/python -m pip install --quiet -c requirements-lock.txt -e ".[test]"
echo "sensepack installed in $(pwd)/.venv"
