"""Supernet train-step compile cost in process CPU time: init, trace + lower, XLA compile, fusions.

  PYTHONPATH=. python benchmarks/compile_probe.py r18_w16   (a ResNet case of nar_jax.bench)

Prints one line: ``create_train_state`` (init), ``step.lower`` (trace + lower) and
``lowered.compile()`` (XLA) CPU seconds of the controller-sampled supernet train step at
batch 64, 32x32, and the number of fusions in the compiled program.
"""

from __future__ import annotations

import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from nar_jax import bench, config as config_lib, controller, ops, train
from nar_jax.models.resnet import ResNet


def main(name: str) -> None:
  case = bench.parse_case(name)
  if case.face:
    raise SystemExit('compile_probe measures ResNet cases (r18_w<C>)')
  space = case.space
  mesh = train.make_mesh()
  model = ResNet(space, 10, bn_axis_name=train.DATA_AXIS)
  tx = train.child_optimizer(config_lib.base_config().child.optimizer, 100)
  key = jax.random.PRNGKey(0)
  t = time.process_time()
  state = train.replicate(mesh, train.create_train_state(key, model, (32, 32, 3), tx,
                                                         jnp.asarray(space.baseline())))
  init_s = time.process_time() - t
  mask = jnp.asarray(space.candidate_mask())
  step = train.make_train_step(model, tx, mesh, **case.stats,
                               sample_arch=lambda k, p: controller.sample(p, k, mask).arch)
  ctrl = controller.init(key, len(ops.OP_NAMES))
  x = train.shard(mesh, np.zeros((64, 32, 32, 3), np.uint8))
  y = train.shard(mesh, np.zeros((64,), np.int32))
  t = time.process_time()
  lowered = step.lower(state, x, y, key, ctrl)
  lower_s = time.process_time() - t
  t = time.process_time()
  compiled = lowered.compile()
  compile_s = time.process_time() - t
  text = compiled.as_text()
  print(f'init {init_s:.1f} trace+lower {lower_s:.1f} compile {compile_s:.1f} CPU-s; '
        f'fusions {text.count(" fusion(") + text.count("= fusion")}', flush=True)


if __name__ == '__main__':
  main(sys.argv[1] if len(sys.argv) > 1 else 'r18_w16')
