#!/usr/bin/env bash
# Run one experiment on a single GPU host, data-parallel over all of its GPUs.
#
#   launch/gpu.sh CONFIG WORKDIR [--config.field=value ...]
#   e.g. launch/gpu.sh configs/cifar_resnet18.py runs/cifar_resnet18 \
#          --config.dataset.data_dir=$HOME/tensorflow_datasets
#
# Sets up a virtual environment with the CUDA build of JAX on first use
# (NAR_VENV, default .venv-gpu). Re-running the same command resumes the run.
# NAR_COMMAND_BUFFERS=1 adds the command-buffer flags of launch/command_buffers.sh to
# XLA_FLAGS (CUDA-graph conditionals for model.choice=switch; README, "Performance").
set -euo pipefail
if [ $# -lt 2 ]; then
  sed -n '2,11p' "$0"; exit 2
fi
config=$1; workdir=$2; shift 2
cd "$(dirname "$0")/.."
venv=${NAR_VENV:-.venv-gpu}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --upgrade pip
  "$venv/bin/pip" install --quiet -r requirements.txt
  "$venv/bin/pip" install --quiet "jax[cuda12]==$(grep -E '^jax==' requirements.txt | cut -d= -f3)"
fi
"$venv/bin/python" -c "import jax; print('devices:', jax.devices())"
if [[ "${NAR_COMMAND_BUFFERS:-0}" == 1 ]]; then
  source launch/command_buffers.sh
  export XLA_FLAGS="${XLA_FLAGS:-} $COMMAND_BUFFER_XLA_FLAGS"
  echo "XLA_FLAGS=$XLA_FLAGS"
fi
# Let XLA take most of the GPU memory up front, as JAX does by default.
exec "$venv/bin/python" -m nar_jax.main --config="$config" --workdir="$workdir" "$@"
