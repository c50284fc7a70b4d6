#!/usr/bin/env bash
# N cooperating JAX processes on this machine, on the CPU (a rehearsal of a multi-host run).
# Each process gets DEVICES forced CPU devices; jax.distributed joins them into one set of N*DEVICES devices.
#   launch/local_multiprocess.sh 2 2 --config=configs/default.py --workdir=/tmp/mp --config.stage=train
set -euo pipefail
N=${1:?usage: local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [main.py flags...]}
DEVICES=${2:?usage: local_multiprocess.sh NUM_PROCESSES DEVICES_PER_PROCESS [main.py flags...]}
shift 2
PORT=${PORT:-$((20000 + RANDOM % 20000))}
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES}"
PYTHON=${PYTHON:-python}
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < N; i++)); do
  "$PYTHON" -m alignrec_jax.main --coordinator_address="localhost:${PORT}" --num_processes="$N" --process_id="$i" "$@" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
trap - EXIT
exit $status
