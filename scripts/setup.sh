#!/usr/bin/env bash
# Create .venv/ in the repo root with the locked CPU development environment (requirements-lock.txt:
# every package pinned with its hashes; `make lock` re-resolves it) and sensepack itself, editable.
# torch goes in first, by itself, so that no resolver pulls a multi-GB CUDA build on CPU machines (set
# TORCH_SPEC to choose another build, e.g. on a GPU host); the lock leaves torch out for that reason.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f .venv/.sensepack-lock ] || ! cmp -s requirements-lock.txt .venv/.sensepack-lock; then
  .venv/bin/python -m pip install --quiet --upgrade pip 2>/dev/null || true
  .venv/bin/python -m pip install --quiet "$TORCH_SPEC"
  .venv/bin/python -m pip install --quiet --require-hashes -r requirements-lock.txt
  .venv/bin/python -m pip install --quiet --no-deps -e .
  .venv/bin/python -m pip check || { echo "requirements-lock.txt does not satisfy pyproject.toml: run make lock" >&2; exit 1; }
  cp requirements-lock.txt .venv/.sensepack-lock   # installed: later runs skip the resolver
fi
echo "sensepack installed in $(pwd)/.venv"
