#!/usr/bin/env bash
# A Cloud TPU VM pod slice: the same command on every worker; jax.distributed finds the other workers from the
# TPU VM's metadata. The repository must already be on every worker (e.g. via --worker=all scp or a shared disk),
# and the workdir must be a path every worker mounts (NFS/Filestore); gs:// URLs are not supported (files are
# written with os/open).
#   launch/tpu_pod.sh my-tpu us-central2-b --config=configs/amazon.py:elec --workdir=/mnt/shared/runs/elec
set -euo pipefail
TPU_NAME=${1:?usage: tpu_pod.sh TPU_NAME ZONE [main.py flags...]}
ZONE=${2:?usage: tpu_pod.sh TPU_NAME ZONE [main.py flags...]}
shift 2
REPO_DIR=${REPO_DIR:-\$HOME/alignrec_jax}
ARGS=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" --worker=all --command="\
  cd $REPO_DIR && pip install -q -r requirements.txt 'jax[tpu]==$(grep '^jax==' requirements.txt | cut -d= -f3)' \
  && python -m alignrec_jax.main$ARGS"
