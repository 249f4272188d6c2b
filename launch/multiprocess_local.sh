#!/usr/bin/env bash
# Run one experiment as N local processes (CPU devices, gloo collectives): a
# multi-host run on one machine, to try "Many hosts" (README) without a cluster.
#
#   launch/multiprocess_local.sh N CONFIG WORKDIR [--config.field=value ...]
#   e.g. launch/multiprocess_local.sh 2 configs/quickstart.py runs/quickstart_2proc
#
# Each process gets NAR_DEVICES_PER_PROCESS CPU devices (default 1), so the mesh has
# N * NAR_DEVICES_PER_PROCESS devices; process 0 coordinates on localhost:NAR_PORT
# (default 12355) and alone prints progress and writes the workdir's files. The
# other processes' output goes to WORKDIR/process_<i>.log. NAR_MODULE (default
# nar_jax.main) picks the command, e.g. nar_jax.transfer. Re-running the same command
# resumes the run; if one process dies, the others stop, and this script exits non-zero.
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
num_processes=$1; config=$2; workdir=$3; shift 3
python=${NAR_PYTHON:-python}
devices=${NAR_DEVICES_PER_PROCESS:-1}
port=${NAR_PORT:-12355}
module=${NAR_MODULE:-nar_jax.main}
mkdir -p "$workdir"
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
pids=()
# Interrupted: stop every process, wait for them, then exit (as a killed job would).
trap 'kill ${pids[@]+"${pids[@]}"} 2>/dev/null || true; wait; exit 130' INT TERM
for ((i = num_processes - 1; i >= 0; i--)); do
  args=(-m "$module" --config="$config" --workdir="$workdir" "$@"
        --coordinator_address="localhost:$port" --num_processes="$num_processes" --process_id="$i")
  if ((i == 0)); then
    "$python" "${args[@]}" &
  else
    "$python" "${args[@]}" >"$workdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
exit "$status"
