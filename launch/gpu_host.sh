#!/usr/bin/env bash
# One host, all its GPUs, one process: pmap spreads each batch over every visible GPU.
#   launch/gpu_host.sh --config=configs/amazon.py:baby --workdir=/data/runs/baby
# Install the CUDA build of JAX first, at the same version as requirements.txt:
#   pip install -r requirements.txt "jax[cuda12]==$(grep '^jax==' requirements.txt | cut -d= -f3)"
set -euo pipefail
# Let JAX take GPU memory as needed rather than 75% up front (the evaluation's score blocks vary in size).
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
export CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(nvidia-smi --query-gpu=index --format=csv,noheader | paste -sd,)}
exec ${PYTHON:-python} -m alignrec_jax.main "$@"
