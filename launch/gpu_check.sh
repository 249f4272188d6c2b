#!/usr/bin/env bash
# On a GPU machine: run the device-relevant tests and the benchmark, write the figures.
#
#   launch/gpu_check.sh [OUT_DIR]        (default: gpu_check/)
#
# Writes OUT_DIR/bench.jsonl (one JSON line per case, appended as each case ends),
# OUT_DIR/bench_<name>.log, OUT_DIR/tests.log and OUT_DIR/env.txt. Expects a Python
# with jax[cuda], flax, optax, chex, orbax-checkpoint and ml-collections (PYTHON,
# default python3). SKIP_TESTS=1 runs the benchmark only. DRY_RUN=1 prints the bench
# commands without running anything. Budget: at most 8 minutes on one H200 (tests
# TEST_TIMEOUT=90 s, then every case at once, each within BENCH_TIMEOUT=330 s).
#
# Cases, one process each, run concurrently: they compile in parallel and take turns on
# the GPU for every timed section (nar_jax.bench --lock); compiles and first calls stay
# outside the lock. Three settings, r18_w64 batch 64 float32, r18_w64 batch 256 bfloat16
# and the face search's ir50 batch 256 bfloat16, each with the supernet's two operator
# choices (@switch: one XLA conditional per node; @select: none) and @switch with the
# command-buffer flags of launch/command_buffers.sh (CUDA-graph conditionals). Each
# line's "choice" and "note" say which.
set -uo pipefail
out=$(realpath -m "${1:-gpu_check}")
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
source launch/command_buffers.sh
dry=${DRY_RUN:-0}
if [[ "$dry" != 1 ]]; then
  mkdir -p "$out"
  export PYTHONUNBUFFERED=1
  export XLA_PYTHON_CLIENT_PREALLOCATE=false   # nine processes share the GPU's memory
  {
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
    $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
  } > "$out/env.txt" 2>&1
  cat "$out/env.txt"
  # Numerics on the accelerator: conv2d vs XLA's convolution, select == switch for every
  # op. (Whole networks and multi-device equivalence run on fake CPU devices in CI.)
  if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
    timeout "${TEST_TIMEOUT:-90}" $py -m pytest -q -x -p no:cacheprovider tests/test_ops.py \
      "tests/test_choice.py::test_select_equals_switch_for_every_op" 2>&1 \
      | tee "$out/tests.log" | tail -n 5
  fi
  rm -f "$out/bench.jsonl" "$out/bench.lock"
fi

bench() {  # bench <log name> <extra XLA flags> <bench flags...>, in the background
  local name=$1 flags=$2
  shift 2
  local cmd=(timeout "${BENCH_TIMEOUT:-330}" $py -m nar_jax.bench --lock="$out/bench.lock"
             --out="$out/bench.jsonl" "$@")
  if [[ "$dry" == 1 ]]; then
    echo "XLA_FLAGS='${XLA_FLAGS:-} $flags' ${cmd[*]}"
    return
  fi
  XLA_FLAGS="${XLA_FLAGS:-} $flags" "${cmd[@]}" > "$out/bench_$name.log" 2>&1 &
}
settings=(
  "r18_w64_b64:r18_w64:--batch=64 --steps=10 --archs=2"
  "r18_w64_b256_bf16:r18_w64:--batch=256 --steps=10 --archs=2 --dtype=bfloat16"
  "ir50_b256_bf16:ir50:--batch=256 --steps=5 --archs=1 --dtype=bfloat16"
)
for setting in "${settings[@]}"; do
  IFS=: read -r name case args <<< "$setting"
  for choice in switch select; do
    # shellcheck disable=SC2086  # args holds several flags
    bench "${name}_$choice" "" --cases="$case@$choice" $args
  done
  # shellcheck disable=SC2086
  bench "${name}_switch_command_buffers" "$COMMAND_BUFFER_XLA_FLAGS" --cases="$case@switch" \
    $args --note="XLA_FLAGS+=$COMMAND_BUFFER_XLA_FLAGS"
done
[[ "$dry" == 1 ]] && exit 0
wait
tail -n 2 "$out"/bench_*.log
echo "figures: $out/bench.jsonl"
cat "$out/bench.jsonl"
