"""Benchmark of the search's hot loop: supernet vs fixed-network steps, controller, loop.

  python -m nar_jax.bench                         # default cases, JSON line per case
  python -m nar_jax.bench --cases=r18_w64 --batch=128 --dtype=bfloat16 --out=bench.jsonl

Each case prints one JSON object with:

* ``supernet_step_s``: median time of a supernet train step, a fresh controller-sampled
  architecture every step (after a warm-up step);
* ``fixed_step_s``: median time of the plain network's train step, over the same
  random architectures that ``paired_supernet_step_s`` times in the supernet;
* ``ratio``: ``paired_supernet_step_s / fixed_step_s`` (same architectures, same batch);
* ``compile_s``: the supernet train step's first call (trace + compile + run);
* ``ratio_cpu``, ``compile_cpu_s``: the same from process CPU time (all threads), which
  a machine shared with other jobs inflates far less than wall time;
* ``controller_update_s``: one controller update (sample ``num_aggregate``
  architectures, reward each on a validation minibatch, policy-gradient step);
* ``search_loop_overhead``: time per child step inside the pipeline's training loop
  (``pipeline.train_epoch``: host batching, sharding, metrics) / the bare supernet
  step; ``loop`` says which loop: ``scan`` (``config.scan_epoch``, the epoch as one
  ``lax.scan`` over device-resident batches, timed on its second, compiled call) or
  ``step`` (one jitted call per minibatch, first step excluded);
* ``peak_rss_mb`` and, on accelerators, ``peak_device_mb``.

Figures are measured on whatever machine runs this; compare ratios from one run.
"""

from __future__ import annotations

import json
import resource
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app
from absl import flags

from nar_jax import config as config_lib
from nar_jax import controller, data, ops, pipeline, train
from nar_jax.models.resnet import ResNet
from nar_jax.space import resnet_space

_CASES = flags.DEFINE_list('cases', ['r18_w16', 'r18_w64'],
                           'Cases: r18_w<base width>, e.g. r18_w16 (ResNet-18-16 with 16 stem channels).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Global batch size.')
_IMAGE = flags.DEFINE_integer('image', 32, 'Image height and width.')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per measurement (after one warm-up).')
_ARCHS = flags.DEFINE_integer('archs', 2, 'Random architectures timed as fixed networks.')
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_OUT = flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.')
_LOOP = flags.DEFINE_enum('loop', 'scan', ['scan', 'step'],
                          'Search loop timed for search_loop_overhead: one lax.scan per epoch '
                          '(config.scan_epoch) or one jitted call per step.')
_NOTE = flags.DEFINE_string('note', None, 'Free text stored in each JSON line as "note".')


def _timed(fn, steps: int, cpu: dict | None = None, name: str = '') -> tuple[float, float]:
  """``(first call s, median of steps timed calls s)``; ``fn`` must block.

  With ``cpu``, also stores the process CPU time (all threads) of the first call and
  the median of the timed calls under ``cpu[name]``: on a machine shared with other
  jobs it grows far less than wall time does.
  """
  tick, cpu_tick = time.perf_counter(), time.process_time()
  fn()
  first, cpu_first = time.perf_counter() - tick, time.process_time() - cpu_tick
  times, cpu_times = [], []
  for _ in range(steps):
    tick, cpu_tick = time.perf_counter(), time.process_time()
    fn()
    times.append(time.perf_counter() - tick)
    cpu_times.append(time.process_time() - cpu_tick)
  if cpu is not None:
    cpu[name] = (cpu_first, statistics.median(cpu_times))
  return first, statistics.median(times)


def run_case(case: str, batch: int, image: int, steps: int, num_archs: int, dtype: str,
             loop: str = 'scan') -> dict:
  """Measures one case; see the module docstring for the fields."""
  if not case.startswith('r18_w'):
    raise ValueError(f'unknown case {case!r}; use r18_w<width>, e.g. r18_w64')
  base_width = int(case[len('r18_w'):])
  space = resnet_space('resnet18', 'conv', base_width / 64)
  mesh = train.make_mesh()
  train.check_batch_size(batch, mesh)
  compute_dtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  mask = space.candidate_mask()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8)
  labels = rng.integers(0, 10, (batch,), dtype=np.int32)
  x, y = train.shard(mesh, images), train.shard(mesh, labels)
  stats = dict(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True)
  opt = config_lib.base_config().child.optimizer
  tx = train.child_optimizer(opt, 100)
  key = jax.random.PRNGKey(0)

  def block(out):
    jax.block_until_ready(out)

  supernet = ResNet(space, 10, dtype=compute_dtype, bn_axis_name=train.DATA_AXIS)
  state0 = train.replicate(mesh, train.create_train_state(
      key, supernet, (image, image, 3), tx, jnp.asarray(space.baseline())))
  ctrl = train.replicate(mesh, controller.init(key, len(ops.OP_NAMES)))
  jmask = jnp.asarray(mask)
  sampled_step = train.make_train_step(
      supernet, tx, mesh, **stats,
      sample_arch=lambda k, p: controller.sample(p, k, jmask).arch)
  holder = {'state': state0}

  def sampled():
    holder['state'], m = sampled_step(holder['state'], x, y, key, ctrl)
    block(m)

  cpu = {}
  compile_s, supernet_step_s = _timed(sampled, steps, cpu, 'supernet')

  # Paired: the same random architectures as supernet steps and as fixed networks.
  given_step = train.make_train_step(supernet, tx, mesh, **stats, sample_arch=lambda k, p: p)
  archs = [tuple(int(a) for a in controller.uniform_sample(jax.random.PRNGKey(i), jmask))
           for i in range(num_archs)]
  paired, fixed, paired_cpu, fixed_cpu = [], [], [], []
  for arch in archs:
    def super_run(arch=arch):
      holder['state'], m = given_step(holder['state'], x, y, key, jnp.asarray(arch))
      block(m)
    paired.append(_timed(super_run, steps, cpu, 'paired')[1])
    paired_cpu.append(cpu['paired'][1])
    net = ResNet(space, 10, arch=arch, dtype=compute_dtype, bn_axis_name=train.DATA_AXIS)
    fixed_state = {'s': train.replicate(mesh, train.create_train_state(
        key, net, (image, image, 3), tx, None))}
    fixed_step = train.make_train_step(net, tx, mesh, **stats, sample_arch=None)

    def fixed_run():
      fixed_state['s'], m = fixed_step(fixed_state['s'], x, y, key, None)
      block(m)
    fixed.append(_timed(fixed_run, steps, cpu, 'fixed')[1])
    fixed_cpu.append(cpu['fixed'][1])

  # Controller update: num_aggregate architectures rewarded on validation minibatches.
  c = config_lib.base_config().search.controller
  ctx = train.controller_optimizer(c)
  ctrl_state = train.replicate(mesh, train.create_controller_state(
      key, len(ops.OP_NAMES), c.hidden, c.init_range, ctx))
  update = train.make_controller_update(
      supernet, ctx, mesh, mask=mask, mean=stats['mean'], std=stats['std'],
      tanh_constant=c.tanh_constant, entropy_weight=c.entropy_weight,
      baseline_decay=c.baseline_decay)
  valid_x = train.shard(mesh, np.broadcast_to(images, (c.num_aggregate, *images.shape)).copy(), 1)
  valid_y = train.shard(mesh, np.broadcast_to(labels, (c.num_aggregate, batch)).copy(), 1)
  ctrl_holder = {'s': ctrl_state}

  def controller_run():
    ctrl_holder['s'], m = update(ctrl_holder['s'], holder['state'].variables, valid_x, valid_y, key)
    block(m)

  _, controller_update_s = _timed(controller_run, max(2, steps // 2))

  # The pipeline's own training loop over an in-memory split, per step.
  loop_steps = max(steps, 5)
  split = data.Split(np.concatenate([images] * loop_steps), np.concatenate([labels] * loop_steps))
  cfg = ml_collections.ConfigDict({'log_every_steps': loop_steps, 'seed': 0,
                                   'scan_epoch': loop == 'scan'})
  log = pipeline.Log(workdir='', verbose=False)
  exp = pipeline.Experiment(cfg, '', None, space, mesh, log, key)
  progress = pipeline.Progress(log, 'bench', loop_steps * 2)
  for epoch in range(2 if loop == 'scan' else 1):  # a scan epoch compiles on its first call
    tick = time.perf_counter()
    holder['state'], stats = pipeline.train_epoch(exp, sampled_step, holder['state'], split,
                                                  batch, epoch, key, ctrl, progress)
    loop_total = time.perf_counter() - tick
  if loop == 'scan':
    loop_step_s = loop_total / loop_steps
  else:
    loop_step_s = (loop_total - stats['first_step_s']) / (loop_steps - 1)

  result = {
      'case': case, 'batch': batch, 'width': base_width, 'image': image, 'dtype': dtype,
      'devices': mesh.devices.size, 'platform': jax.devices()[0].platform,
      'supernet_step_s': supernet_step_s,
      'paired_supernet_step_s': statistics.median(paired),
      'fixed_step_s': statistics.median(fixed),
      'ratio': sum(paired) / sum(fixed),
      'ratio_cpu': sum(paired_cpu) / sum(fixed_cpu),
      'images_per_s': batch / supernet_step_s,
      'compile_s': compile_s,
      'compile_cpu_s': cpu['supernet'][0],
      'controller_update_s': controller_update_s,
      'loop': loop,
      'search_loop_overhead': loop_step_s / supernet_step_s,
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }
  memory = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in memory:
    result['peak_device_mb'] = memory['peak_bytes_in_use'] / 2**20
  return result


def main(argv):
  del argv
  for case in _CASES.value:
    result = run_case(case, _BATCH.value, _IMAGE.value, _STEPS.value, _ARCHS.value, _DTYPE.value,
                      _LOOP.value)
    if _NOTE.value:
      result['note'] = _NOTE.value
    line = json.dumps(result)
    print(line, flush=True)
    if _OUT.value:
      with open(_OUT.value, 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
  app.run(main)
