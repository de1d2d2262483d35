#!/usr/bin/env bash
# One-GPU benchmark (about 5 minutes): T5-base (seed layout) bf16 with ZeRO-2 and a
# Gemma-2B-layout model with ZeRO-3, ~100 s of timed steps each; prints tokens/s and MFU
# against the peak bf16 matmul rate measured on the same GPU. See bench/gpu.py.
#
#   bench/gpu.sh [OUT_DIR]        # results also in OUT_DIR/gpu.json (default: runs/bench-gpu)
#   SECONDS_PER_MODEL=30 bench/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-runs/bench-gpu}"
mkdir -p "$out"
py=python
[ -x .venv/bin/python ] && py=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$py" -c "import torch, deepspeed, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'deepspeed', deepspeed.__version__, 'transformers', transformers.__version__)"
"$py" -m torch.distributed.run --standalone --nproc-per-node 1 bench/gpu.py \
    --seconds "${SECONDS_PER_MODEL:-100}" --out "$out/gpu.json" 2>&1 | tee "$out/gpu.log"
