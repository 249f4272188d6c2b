"""Single-convolution forward + backward on XLA:CPU, in several expressions and flag sets.

  PYTHONPATH=. python benchmarks/conv_cpu_probe.py [--reps=5] [--batch=64] [--channels=64]

One 3x3 SAME convolution, ``batch x 32 x 32 x channels`` -> ``channels``, the gradient of
``sum(sin(conv(x, w)))`` with respect to ``x`` and ``w`` (what a training step computes per
conv). Expressions, each jitted, in one process:

* ``nhwc``: ``lax.conv_general_dilated`` in NHWC / HWIO, autodiff's VJP;
* ``nchw``: the same in NCHW / OIHW (PyTorch's layout);
* ``ops_conv2d``: :func:`nar_jax.ops.conv2d` (the project's canonical-layout VJP);
* ``im2col``: 9 shifted slices concatenated, one matmul.

Every XLA flag set runs in its own process (XLA reads ``XLA_FLAGS`` once). Prints one
JSON line per (flags, expression): median wall and process-CPU milliseconds, and
``cpu/wall`` (about the number of cores busy). Compare within one run: the machine may
be shared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FLAG_SETS = {
    'project': '--xla_cpu_enable_concurrency_optimized_scheduler=false',
    'xla_default': '',
    'single_thread_eigen': ('--xla_cpu_enable_concurrency_optimized_scheduler=false '
                            '--xla_cpu_multi_thread_eigen=false'),
    'onednn': '--xla_cpu_enable_concurrency_optimized_scheduler=false --xla_cpu_use_onednn=true',
    'xnnpack': ('--xla_cpu_enable_concurrency_optimized_scheduler=false '
                '--xla_cpu_use_xnnpack=true'),
    'no_fusion_emitters': ('--xla_cpu_enable_concurrency_optimized_scheduler=false '
                           '--xla_cpu_use_fusion_emitters=false'),
}


def expressions(channels: int):
  """``name -> f(x, w) -> (dx, dw)`` for NHWC ``x`` and HWIO ``w``."""
  import jax
  import jax.numpy as jnp
  from jax import lax

  from nar_jax import ops

  def grad_of(conv):
    return jax.jit(jax.grad(lambda x, w: jnp.sum(jnp.sin(conv(x, w))), argnums=(0, 1)))

  def nchw(x, w):  # x, w arrive in NCHW / OIHW
    return lax.conv_general_dilated(x, w, (1, 1), 'SAME', dimension_numbers=('NCHW', 'OIHW',
                                                                             'NCHW'))

  def im2col(x, w):
    padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    h, wd = x.shape[1], x.shape[2]
    cols = jnp.concatenate([padded[:, i:i + h, j:j + wd] for i in range(3) for j in range(3)], -1)
    return cols @ w.reshape(9 * channels, channels)

  return {
      'nhwc': (grad_of(lambda x, w: lax.conv_general_dilated(
          x, w, (1, 1), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'))), False),
      'nchw': (grad_of(nchw), True),
      'ops_conv2d': (grad_of(ops.conv2d), False),
      'im2col': (grad_of(im2col), False),
  }


def measure(batch: int, channels: int, reps: int, flag_set: str) -> None:
  """Times every expression under the current process's XLA flags; prints JSON lines."""
  import jax
  import numpy as np

  rng = np.random.default_rng(0)
  x = rng.standard_normal((batch, 32, 32, channels)).astype(np.float32)
  w = (rng.standard_normal((3, 3, channels, channels)) * 0.05).astype(np.float32)
  for name, (fn, channels_first) in expressions(channels).items():
    args = ((x.transpose(0, 3, 1, 2), w.transpose(3, 2, 0, 1)) if channels_first else (x, w))
    args = jax.device_put(args)
    jax.block_until_ready(fn(*args))
    wall, cpu = [], []
    for _ in range(reps):
      tick, cpu_tick = time.perf_counter(), time.process_time()
      jax.block_until_ready(fn(*args))
      wall.append(time.perf_counter() - tick)
      cpu.append(time.process_time() - cpu_tick)
    print(json.dumps({'flags': flag_set, 'expression': name, 'batch': batch,
                      'channels': channels, 'wall_ms': 1e3 * statistics.median(wall),
                      'cpu_ms': 1e3 * statistics.median(cpu),
                      'cpu_per_wall': sum(cpu) / sum(wall), 'cores': os.cpu_count()}),
          flush=True)


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--batch', type=int, default=64)
  parser.add_argument('--channels', type=int, default=64)
  parser.add_argument('--flag_sets', default=','.join(FLAG_SETS))
  parser.add_argument('--child', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child is not None:
    measure(args.batch, args.channels, args.reps, args.child)
    return
  for flag_set in args.flag_sets.split(','):
    env = dict(os.environ, XLA_FLAGS=FLAG_SETS[flag_set], JAX_PLATFORMS='cpu')
    subprocess.run([sys.executable, __file__, f'--reps={args.reps}', f'--batch={args.batch}',
                    f'--channels={args.channels}', f'--child={flag_set}'], env=env, check=True)


if __name__ == '__main__':
  main()
