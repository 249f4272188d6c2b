#!/usr/bin/env bash
# On a GPU machine: run the device-relevant tests and the benchmark, write the figures.
#
#   launch/gpu_check.sh [OUT_DIR]        (default: gpu_check/)
#
# Writes OUT_DIR/bench.jsonl (one JSON line per case, appended as each case ends),
# OUT_DIR/bench_<group>.log, OUT_DIR/tests.log and OUT_DIR/env.txt. Expects a Python
# with jax[cuda], flax, optax, chex, orbax-checkpoint and ml-collections (PYTHON,
# default python3). SKIP_TESTS=1 runs the benchmark only. Budget: ~5 minutes.
#
# Benchmark cases, one process each, run concurrently (BENCH_PARALLEL=0: one after
# another, several times longer): they compile in parallel and take turns on the GPU for every
# timed section (nar_jax.bench --lock). Compiles and first calls stay outside the
# lock, and XLA's GPU autotuning runs kernels while compiling, so concurrent figures
# are noisier than sequential ones:
#   * the default accelerator cases: r18_w16, r18_w64 (batch 64, float32) and the
#     IR-50 face supernet ir50 (112x112, batch 64, float32);
#   * the face search's own setting: ir50, batch 256, bfloat16 (one paired architecture);
#   * r18_w64 at batch 256, float32 and bfloat16.
# SWITCH_DIAGNOSIS=1 adds r18_w64 (batch 64, float32) twice more under other XLA_FLAGS, to
# test whether lax.switch's conditionals stall the stream (their branch index read by the
# host) and whether CUDA-graph conditionals remove that: command buffers off, and
# command buffers with CONDITIONAL and WHILE commands added. Each line's "note" names them.
set -uo pipefail
out=$(realpath -m "${1:-gpu_check}")
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_PREALLOCATE=false   # six processes share the GPU's memory
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# Numerics on the accelerator: conv2d vs XLA's convolution, supernet == fixed network,
# mixed precision. (Multi-device equivalence runs on fake CPU devices in CI.)
if [[ "${SKIP_TESTS:-0}" != 1 ]]; then
  timeout 150 $py -m pytest -q -x -p no:cacheprovider tests/test_ops.py tests/test_models.py \
    tests/test_precision.py 2>&1 | tee "$out/tests.log" | tail -n 5
fi

rm -f "$out/bench.jsonl" "$out/bench.lock"
run_bench() {  # run_bench <log name> <bench flags...>
  local name=$1
  shift
  timeout "${BENCH_TIMEOUT:-270}" $py -m nar_jax.bench --lock="$out/bench.lock" \
    --out="$out/bench.jsonl" "$@" > "$out/bench_$name.log" 2>&1
}
bench() {  # in the background unless BENCH_PARALLEL=0
  if [[ "${BENCH_PARALLEL:-1}" == 0 ]]; then run_bench "$@"; else run_bench "$@" & fi
}
bench ir50_b64 --cases=ir50 --batch=64 --steps=10 --archs=2
bench ir50_b256_bf16 --cases=ir50 --batch=256 --steps=5 --archs=1 --dtype=bfloat16
bench r18_w16_b64 --cases=r18_w16 --batch=64 --steps=10 --archs=2
bench r18_w64_b64 --cases=r18_w64 --batch=64 --steps=10 --archs=2
bench r18_w64_b256 --cases=r18_w64 --batch=256 --steps=10 --archs=2
bench r18_w64_b256_bf16 --cases=r18_w64 --batch=256 --steps=10 --archs=2 --dtype=bfloat16
if [[ "${SWITCH_DIAGNOSIS:-0}" == 1 ]]; then
  off=--xla_gpu_enable_command_buffer=
  conditional=--xla_gpu_enable_command_buffer=+CONDITIONAL,+WHILE
  XLA_FLAGS="${XLA_FLAGS:-} $off" bench r18_w64_b64_no_command_buffers --cases=r18_w64 \
    --batch=64 --steps=10 --archs=2 --note="XLA_FLAGS=$off"
  XLA_FLAGS="${XLA_FLAGS:-} $conditional" bench r18_w64_b64_conditional_commands \
    --cases=r18_w64 --batch=64 --steps=10 --archs=2 --note="XLA_FLAGS=$conditional"
fi
wait
tail -n 2 "$out"/bench_*.log
echo "figures: $out/bench.jsonl"
cat "$out/bench.jsonl"
