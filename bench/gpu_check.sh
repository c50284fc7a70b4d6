#!/usr/bin/env bash
# One short GPU check (under 8 minutes): install the CUDA build of the pinned JAX, then run the stage-2 bench on
# the Baby-scale data, the propagation bench (which sparse backend is faster here) and the stage-1 bench at `base`
# size in float32 and in bfloat16 (each step and extraction against its GEMM floor), printing epoch time, evaluation
# time and memory, and a few steps plus one full evaluation at Amazon Electronics' shape (192k users, 63k items:
# does it fit one GPU?).
# Run from the repository root on a GPU machine with ../shared/data beside the repository:
#   bash bench/gpu_check.sh            (writes bench JSON lines to ${OUT:-/tmp}/gpu_check.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
JAX_VERSION=$(grep '^jax==' requirements.txt | cut -d= -f3)
PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c "import jax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
  "$PYTHON" -m pip install -q -r requirements.txt "jax[cuda12]==${JAX_VERSION}"
fi
export XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PYTHON" -c "import jax; print('jax', jax.__version__, jax.devices())"
{
  timeout 300 "$PYTHON" bench/stage2.py --feature_dim=4096 2>&1 | tail -n 3
  timeout 120 "$PYTHON" bench/stage2.py --feature_dim=768 2>&1 | tail -n 3
  timeout 240 "$PYTHON" bench/stage2.py --scale=elec --feature_dim=768 --max_steps=20 --epochs=1 --evals=1 2>&1 | tail -n 1
  timeout 60 "$PYTHON" bench/propagation.py 2>&1 | tail -n 1  # gather vs segment_sum on this GPU (model.propagation)
  for dtype in float32 bfloat16; do  # pretrain.compute_dtype; the GEMM floor in the same dtype
    timeout 240 "$PYTHON" bench/stage1.py --size=base --batch=32 --extract_batch=64 --steps=5 --torch=false \
      --compute_dtype="$dtype" --gemm_size=8192 2>&1 | tail -n 3
  done
} | tee "$OUT/gpu_check.jsonl"
