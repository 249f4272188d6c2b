#!/usr/bin/env bash
# The paper's Table 1: search NAS-Arch (ENAS's joint operator + skip search), then retrain
# NAS-Arch and ResNet-20 (64/128/256) with one recipe on task A and task B.
#
#   launch/transfer_study.sh WORKDIR [smoke] [--config.field=value ...]
#   e.g. launch/transfer_study.sh runs/table1 --config.tasks.A.data_dir=$HOME/tensorflow_datasets \
#          --config.tasks.B.data_dir=/data/faces_emore
#
# Full version: NAS-Arch searched on CIFAR-10 (configs/cifar_nasarch.py); A = CIFAR-10,
# B = faces_emore trained with ArcFace, verified on LFW / CFP-FP / AgeDB-30. "smoke": NAS-Arch
# searched by configs/cifar_nasarch.py:smoke on mnist5k, A = mnist5k, B = synthetic faces
# verified on synthetic.bin; offline, CPU.
# Extra flags go to the study (nar_jax.transfer). Re-running resumes every step.
# Writes WORKDIR/nasarch/ (the search, arch.json) and WORKDIR/study/transfer.{md,json}.
set -euo pipefail
if [ $# -lt 1 ]; then
  sed -n '2,13p' "$0"; exit 2
fi
workdir=$1; shift
variant=''
if [ "${1:-}" = smoke ]; then variant=':smoke'; shift; fi
cd "$(dirname "$0")/.."
python=${NAR_PYTHON:-python3}
if [ -z "$variant" ]; then
  # The search reads CIFAR-10 from the same TFDS directory as task A.
  for flag in "$@"; do
    case $flag in --config.tasks.A.data_dir=*) search_data=(--config.dataset.data_dir="${flag#*=}");; esac
  done
fi
"$python" -m nar_jax.main --config="configs/cifar_nasarch.py$variant" \
  --workdir="$workdir/nasarch" "${search_data[@]+"${search_data[@]}"}"
exec "$python" -m nar_jax.transfer --config="configs/transfer_study.py$variant" \
  --config.nas_arch="$workdir/nasarch/arch.json" --workdir="$workdir/study" "$@"
