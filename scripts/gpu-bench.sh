#!/usr/bin/env bash
# The GPU check of issue 12, as one prepared command for a lent GPU machine (device tool) or any CUDA host:
# ensemble/base throughput of the embedded engine at GPT-J-6B + backpack-gpt2 shapes (random bf16 weights
# built on the GPU), batch 1, 8, 32, pack tokens present and absent. About 2-4 minutes on an H200.
#
#   bash scripts/gpu-bench.sh            # writes the log to ${OUT:-bench/out}/gpu-bench.log
#
# Uses the host's python3 (torch with CUDA and transformers already installed there); the repo's own
# packages are imported from the checkout, nothing is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  python3 bench/bench_gpu.py --shapes gptj-6b --batches 1 8 32 --prompt-len 128 --new-tokens 64 --rounds 3
} 2>&1 | tee "$out/gpu-bench.log"
