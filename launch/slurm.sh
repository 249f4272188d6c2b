#!/usr/bin/env bash
# Run one experiment on a SLURM cluster: one process per GPU, all of them one
# jax.distributed run (README, "Many hosts").
#
#   sbatch --nodes=2 --ntasks-per-node=8 --gpus-per-node=8 --cpus-per-task=12 \
#     launch/slurm.sh CONFIG WORKDIR [--config.field=value ...]
#
# Submit from the repository root; --ntasks-per-node must equal --gpus-per-node. Each
# process finds the coordinator, its index and the process count in SLURM's environment
# (--distributed), and JAX gives it the GPU of its local rank (SLURM_LOCALID) only, so
# fewer tasks than GPUs would leave GPUs idle. WORKDIR must be on a file system every
# node shares. NAR_VENV (default .venv-gpu, made by launch/gpu.sh) is the environment
# every node runs. Submitting the same command again resumes from the last checkpoint.
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
if [ -z "${SLURM_JOB_ID:-}" ]; then
  echo "error: not inside a SLURM allocation; submit with sbatch (or salloc, then run it)" >&2
  exit 2
fi
config=$1; workdir=$2; shift 2
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
python=${NAR_VENV:-.venv-gpu}/bin/python
if [ ! -x "$python" ]; then
  echo "error: $python not found; run launch/gpu.sh once on a GPU node to make it" >&2
  exit 2
fi
mkdir -p "$workdir"
# srun does not pass sbatch's --cpus-per-task on to the tasks (Slurm >= 22.05): the
# decoding threads of the input pipeline need them.
exec srun --kill-on-bad-exit=1 --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" "$python" -m "${NAR_MODULE:-nar_jax.main}" \
  --config="$config" --workdir="$workdir" --distributed "$@"
