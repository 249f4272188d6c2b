#!/usr/bin/env bash
# On a GPU machine: run the device-relevant tests and the benchmark, write the figures.
#
#   launch/gpu_check.sh [OUT_DIR]        (default: gpu_check/)
#
# Writes OUT_DIR/bench.jsonl (one JSON line per case), OUT_DIR/tests.log and
# OUT_DIR/env.txt. Expects a Python with jax[cuda], flax, optax, chex,
# orbax-checkpoint and ml-collections (PYTHON, default python3). Budget: ~5 minutes.
set -uo pipefail
out=${1:-gpu_check}
py=${PYTHON:-python3}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null
  $py -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__); print(jax.devices())"
} > "$out/env.txt" 2>&1
cat "$out/env.txt"

# Numerics on the accelerator: conv2d vs XLA's convolution, supernet == fixed network,
# mixed precision. (Multi-device equivalence runs on fake CPU devices in CI.)
timeout 150 $py -m pytest -q -x -p no:cacheprovider tests/test_ops.py tests/test_models.py \
  tests/test_precision.py 2>&1 | tee "$out/tests.log" | tail -n 5

# Benchmark: default cases, then bf16 and batch 256 at full width.
rm -f "$out/bench.jsonl"
timeout 120 $py -m nar_jax.bench --cases=r18_w16,r18_w64 --batch=64 --steps=10 --out="$out/bench.jsonl"
timeout 60 $py -m nar_jax.bench --cases=r18_w64 --batch=256 --steps=10 --out="$out/bench.jsonl"
timeout 60 $py -m nar_jax.bench --cases=r18_w64 --batch=256 --steps=10 --dtype=bfloat16 --out="$out/bench.jsonl"
echo "figures: $out/bench.jsonl"
