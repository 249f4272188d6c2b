"""How fast shared weights learn under uniform single-path training, per supernet option.

Trains the quickstart supernet (or any config's) for ``--epochs`` epochs with a
uniformly random architecture per minibatch, then scores ``--archs`` fixed random
architectures and the baseline on the validation split with the shared weights.
Prints one JSON line per setting: per-epoch train loss / accuracy and the final
validation accuracies.

  PYTHONPATH=. python benchmarks/supernet_learning.py --settings=default,lr0.2

``--archs_per_step=1,2,4`` repeats each setting with that many architectures per step
(``search.archs_per_step``: groups of devices, the same global batch and images), e.g.
on four fake CPU devices:

  XLA_FLAGS=--xla_force_host_platform_device_count=4 PYTHONPATH=. \
    python benchmarks/supernet_learning.py --archs_per_step=1,2,4
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from nar_jax import data, pipeline, train
from nar_jax.phases import loop, supernet
from nar_jax.progress import Progress
from nar_jax.config import base_config

_SETTINGS = flags.DEFINE_list('settings', ['default'], 'comma-separated settings')
_EPOCHS = flags.DEFINE_integer('epochs', 4, 'epochs of uniform training')
_ARCHS = flags.DEFINE_integer('archs', 4, 'random architectures scored at the end')
_CONFIG = flags.DEFINE_string('config', 'configs/quickstart.py', 'config file')
_ARCHS_PER_STEP = flags.DEFINE_list('archs_per_step', ['1'],
                                    'architectures per step (each setting runs with each)')
_OUT = flags.DEFINE_string('out', None, 'also append the JSON lines to this file')


def load(path):
  import importlib.util
  spec = importlib.util.spec_from_file_location('cfg', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def apply_setting(c, setting):
  """``setting``: ``key=value`` pairs joined by ``+`` (config fields), or ``default``."""
  if setting == 'default':
    return c
  for part in setting.split(';'):
    name, value = part.split('=')
    section = c
    *parents, leaf = name.split('.')
    for p in parents:
      section = section[p]
    current = section[leaf]
    section[leaf] = type(current)(value) if not isinstance(current, bool) else value == 'True'
  return c


def sampler_fn(name, nets):
  mask = jnp.asarray(nets.space.candidate_mask())
  base = jnp.asarray(nets.space.baseline())
  uniform = nets.policy().uniform
  if name == 'baseline':
    return lambda key: base
  if name == 'uniform':
    return uniform
  if name == 'same':
    common = jnp.all(mask, axis=0)
    return lambda key: jnp.full(mask.shape[0], jax.random.categorical(
        key, jnp.where(common, 0.0, -1e9)), jnp.int32)
  if name.startswith('mutate:'):
    q = float(name.split(':')[1])
    def mutate(key):
      k1, k2 = jax.random.split(key)
      keep = jax.random.uniform(k1, mask.shape[:1]) < q
      return jnp.where(keep, base, uniform(k2))
    return mutate
  raise ValueError(name)


def run_setting(setting, archs_per_step=1):
  sampler = 'uniform'
  if '@' in setting:  # setting@sampler plan
    setting, sampler = setting.split('@')
  c = apply_setting(load(_CONFIG.value), setting)
  c.pretrain.epochs = _EPOCHS.value
  with tempfile.TemporaryDirectory() as workdir:
    ctx, nets = pipeline.setup(c, workdir)
    ctx.log.verbose = False
    # sampler: 'name' for every epoch, or 'name*E>name*E' epoch counts in order.
    plan = []
    for part in sampler.split('>'):
      name, _, count = part.partition('*')
      plan += [name] * int(count or _EPOCHS.value)
    tx = supernet.child_optimizer(ctx, nets)
    state = supernet.initial_state(ctx, nets, tx)
    steps = {name: supernet.child_step(ctx, nets, tx,
                                       lambda key, _, f=sampler_fn(name, nets): f(key),
                                       archs_per_step)
             for name in set(plan)}
    batch = c.child.batch_size
    per_epoch = data.num_batches(nets.splits.train, batch)
    progress = Progress(ctx.log, 'pretrain', len(plan) * per_epoch)
    tick = time.time()
    epochs = []
    for epoch, name in enumerate(plan):
      state, stats = loop.context_epoch(ctx, steps[name], state, nets.splits.train, batch,
                                        epoch, ctx.key('pretrain'), None, progress)
      epochs.append({'train_loss': stats['loss'], 'train_acc': stats['accuracy']})
    seconds = time.time() - tick
  eval_fn = supernet.eval_step(ctx, nets)
  rng = np.random.default_rng(0)
  mask = nets.space.candidate_mask()
  archs = [tuple(int(rng.choice(np.flatnonzero(m))) for m in mask) for _ in range(_ARCHS.value)]
  scores = [supernet.valid_accuracy(ctx, nets, eval_fn, state.variables, a) for a in archs]
  base = supernet.valid_accuracy(ctx, nets, eval_fn, state.variables, nets.space.baseline())
  return {'setting': setting, 'sampler': sampler, 'archs_per_step': archs_per_step,
          'devices': ctx.mesh.devices.size, 'batch': batch,
          'images': len(plan) * per_epoch * batch, 'seconds': round(seconds, 1),
          'train_loss': [round(r['train_loss'], 3) for r in epochs],
          'train_acc': [round(r['train_acc'], 3) for r in epochs],
          'valid_random': [round(s, 3) for s in scores],
          'valid_random_mean': round(float(np.mean(scores)), 4),
          'valid_baseline': round(base, 3)}


def main(argv):
  from absl import logging
  logging.set_verbosity(logging.WARNING)
  del argv
  train.add_cpu_xla_flags()
  for setting in _SETTINGS.value:
    for k in _ARCHS_PER_STEP.value:
      line = json.dumps(run_setting(setting, int(k)))
      print(line, flush=True)
      if _OUT.value:
        with open(_OUT.value, 'a') as f:
          f.write(line + '\n')


if __name__ == '__main__':
  app.run(main)
