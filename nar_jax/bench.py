"""Benchmark of the search's hot loop: supernet vs fixed-network steps, controller, loop.

  python -m nar_jax.bench                         # default cases, JSON line per case
  python -m nar_jax.bench --cases=r18_w64 --batch=128 --dtype=bfloat16 --out=bench.jsonl
  python -m nar_jax.bench --cases=ir50 --batch=64  # the IR-50 face supernet, 112x112

Cases are ``<network>[_w<stem channels>][@<choice>]`` (64 stem channels by default, the
full width; the supernet's operator choice ``switch`` or ``select``, by default the
platform's, :func:`nar_jax.ops.default_choice`; :func:`parse_case`), e.g.
``--cases=r18_w64@switch,r18_w64@select``:

* ``r18_w16``, ``r18_w64``: the ResNet-18-16 supernet (conv granularity, 10 classes)
  on 32x32 inputs (CIFAR's mean/std, pad-4 crops and flips);
* ``ir50``: the LResNet50E-IR face supernet (48 nodes, ArcFace margin head over the
  proxy task's 4,000 identities, dropout) on 112x112 faces (mean 127.5, std 128,
  flips only); ``ir50_w16`` is the same at a quarter of the width, ``ir18`` ... other
  IR depths.

Default cases: ``r18_w16,r18_w64`` on CPU (an IR-50 supernet at 112x112 takes many
minutes to compile and ~1 min per step there), ``r18_w16,r18_w64,ir50`` on
accelerators.

Each case prints one JSON object with ``case``, ``choice`` (the supernet's operator
choice; fixed networks have none), the settings, and:

* ``supernet_step_s``: median time of a supernet train step, a fresh controller-sampled
  architecture every step (after a warm-up step);
* ``fixed_step_s``: median time of the plain network's train step, over the same
  random architectures that ``paired_supernet_step_s`` times in the supernet (the
  supernet step is compiled once: sampled and given architectures are the two
  branches of one ``lax.cond`` inside it);
* ``ratio``: ``paired_supernet_step_s / fixed_step_s`` (same architectures, same batch);
* ``compile_s``: the supernet train step's first call (trace + compile + run);
* ``ratio_cpu``, ``compile_cpu_s``: the same from process CPU time (all threads), which
  a machine shared with other jobs inflates far less than wall time;
* ``controller_update_s``: one controller update (sample ``num_aggregate``
  architectures, reward each on a validation minibatch, policy-gradient step);
* ``search_loop_overhead``: the pipeline's training loop (``phases.loop.train_epoch``:
  host batching, sharding, metrics) replaying the timed supernet steps (the same
  start state and key, so the same architectures) / the sum of those bare steps;
  ``loop`` says which loop: ``scan`` (``config.scan_epoch``, the epoch as one
  ``lax.scan`` over device-resident batches, timed on its second, compiled call) or
  ``step`` (one jitted call per minibatch); default :func:`default_loop`;
* ``archs_per_step`` (``--archs_per_step``: architectures each supernet step trains, one
  per group of devices, :func:`nar_jax.train.make_train_step`), ``images_per_s`` (the
  global batch over ``supernet_step_s``) and ``archs_per_s`` (``archs_per_step`` over
  ``supernet_step_s``: sampled architectures trained per second);
* ``peak_rss_mb`` and, on accelerators, ``peak_device_mb``.

Figures are measured on whatever machine runs this; compare ratios from one run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import re
import resource
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

from nar_jax import config as config_lib
from nar_jax import controller, data, families, ops, policy, train
from nar_jax.models.heads import Head
from nar_jax.models.nodes import select_branches
from nar_jax.phases import loop as epoch_loop
from nar_jax.progress import Log, Progress
from nar_jax.space import SearchSpace, ir_space, resnet_space

_CASES = flags.DEFINE_list('cases', None,
                           'Cases <network>[_w<stem channels>][@switch|@select]: r18_w16, '
                           'r18_w64@select, ir50, ir50_w16, ... (default: r18_w16,r18_w64 on '
                           'CPU, also ir50 on accelerators; the platform\'s operator choice).')
_BATCH = flags.DEFINE_integer('batch', 64, 'Global batch size.')
_IMAGE = flags.DEFINE_integer('image', None, 'Image height and width (default: 32 for r18, '
                              '112 for IR cases).')
_STEPS = flags.DEFINE_integer('steps', 5, 'Timed steps per measurement (after one warm-up).',
                              lower_bound=1)
_ARCHS = flags.DEFINE_integer('archs', 1, 'Random architectures timed as fixed networks.',
                              lower_bound=1)
_DTYPE = flags.DEFINE_enum('dtype', 'float32', ['float32', 'bfloat16'], 'Compute dtype.')
_OUT = flags.DEFINE_string('out', None, 'Also append the JSON lines to this file.')
_ARCHS_PER_STEP = flags.DEFINE_integer(
    'archs_per_step', 1, 'Architectures the supernet step trains (search.archs_per_step): one '
    'per group of devices; must divide the device count.', lower_bound=1)
_LOOP = flags.DEFINE_enum('loop', None, ['scan', 'step'],
                          'Search loop timed for search_loop_overhead: one lax.scan per epoch '
                          '(config.scan_epoch) or one jitted call per step (default: scan for '
                          'r18 on accelerators; step on CPU and for IR cases, whose face data '
                          'the pipeline never scans).')
_NOTE = flags.DEFINE_string('note', None, 'Free text stored in each JSON line as "note".')
_LOCK = flags.DEFINE_string('lock', None,
                            'A file locked (flock) around every timed section, so that several '
                            'bench processes sharing one accelerator compile concurrently but '
                            'time their steps alone; first calls (compiles) stay outside it.')

CPU_CASES = ('r18_w16', 'r18_w64')
ACCELERATOR_CASES = ('r18_w16', 'r18_w64', 'ir50')
FACE_CLASSES = 4000  # the face search's proxy task (config.dataset.proxy.num_identities)


@dataclasses.dataclass(frozen=True)
class Case:
  """A parsed benchmark case: the network, its search space and data conventions."""

  name: str
  choice: str                                   # the supernet's operator choice
  family: families.Family
  head: Head
  scannable: bool                               # the pipeline may scan its epochs
  space: SearchSpace
  num_classes: int
  image: int                                    # default height and width
  stats: dict                                   # normalisation and augmentation


def parse_case(case: str, platform: str = 'cpu') -> Case:
  """``'r18_w<C>[@<choice>]'`` or ``'ir<depth>[_w<C>][@<choice>]'`` (``C`` stem channels,
  64 = full width; ``choice`` one of :data:`nar_jax.ops.CHOICES`, default
  :func:`nar_jax.ops.default_choice` of ``platform``)."""
  match = re.fullmatch(r'(r18|ir(\d+))(?:_w(\d+))?(?:@(\w+))?', case)
  if (match is None or (match.group(3) is not None and int(match.group(3)) <= 0)
      or match.group(4) not in (None,) + ops.CHOICES):
    raise ValueError(f'unknown case {case!r}; use r18_w<stem channels> (e.g. r18_w64) or '
                     f'ir<depth>[_w<stem channels>] (e.g. ir50, ir50_w16), optionally with '
                     f'@<choice> ({", ".join(ops.CHOICES)})')
  width = int(match.group(3) or 64) / 64
  choice = match.group(4) or ops.default_choice(platform)
  if match.group(2) is None:
    return Case(case, choice, families.resnet.FAMILY, Head('softmax'), True,
                resnet_space('resnet18', 'conv', width), 10, 32,
                dict(mean=(0.5,) * 3, std=(0.25,) * 3, crop_padding=4, flip=True))
  return Case(case, choice, families.ir.FAMILY, Head('face'), False,
              ir_space(int(match.group(2)), width), FACE_CLASSES, 112,
              dict(mean=(127.5 / 255,) * 3, std=(128 / 255,) * 3, crop_padding=0, flip=True))


def default_cases(platform: str) -> tuple[str, ...]:
  """The cases run without ``--cases`` on ``platform`` (``jax.devices()[0].platform``)."""
  return CPU_CASES if platform == 'cpu' else ACCELERATOR_CASES


def default_loop(case: Case, platform: str) -> str:
  """The search loop timed without ``--loop``: ``'scan'`` or ``'step'``.

  The scan epoch on accelerators, where it removes the host loop's cost; the step
  loop on CPU, the pipeline's default there (a scan compiles the step a second time,
  ~20 s on 2 cores, and the step loop's overhead is ~1.0 already), and for faces,
  whose lazily decoded data the pipeline never scans.
  """
  return 'scan' if platform != 'cpu' and case.scannable else 'step'


@contextlib.contextmanager
def exclusive(lock_path: str | None):
  """Holds an exclusive ``flock`` on ``lock_path`` (created if missing); no-op for ``None``."""
  if lock_path is None:
    yield
    return
  with open(lock_path, 'a') as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _timed(fn, calls: int, lock: str | None = None) -> tuple[list[float], list[float]]:
  """Wall and process CPU seconds (all threads) of each of ``calls`` calls of ``fn``.

  ``fn`` must block until its work is done. The calls run under
  :func:`exclusive` ``(lock)``. Process CPU time grows far less than wall time on a
  machine shared with other jobs.
  """
  wall, cpu = [], []
  with exclusive(lock):
    for _ in range(calls):
      tick, cpu_tick = time.perf_counter(), time.process_time()
      fn()
      wall.append(time.perf_counter() - tick)
      cpu.append(time.process_time() - cpu_tick)
  return wall, cpu


def run_case(case: str, batch: int, steps: int, num_archs: int, dtype: str,
             image: int | None = None, loop: str | None = None, lock: str | None = None,
             archs_per_step: int = 1) -> dict:
  """Measures one case (:func:`parse_case`); see the module docstring for the fields.

  ``image`` defaults to the case's (32 / 112 pixels), ``loop`` to :func:`default_loop`;
  ``lock``: see :func:`exclusive`; ``archs_per_step``: architectures per supernet step
  (the paired steps give every group the same architecture).
  """
  if steps < 1 or num_archs < 1:
    raise ValueError(f'steps and num_archs must be positive, got {steps} and {num_archs}')
  platform = jax.devices()[0].platform
  c = parse_case(case, platform)
  image = image or c.image
  loop = loop or default_loop(c, platform)
  space, stats = c.space, c.stats
  mesh = train.make_mesh()
  train.check_batch_size(batch, mesh)
  train.check_archs_per_step(archs_per_step, mesh)
  compute_dtype = jnp.bfloat16 if dtype == 'bfloat16' else jnp.float32
  mask = space.candidate_mask()
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8)
  labels = rng.integers(0, c.num_classes, (batch,), dtype=np.int32)
  x, y = train.shard(mesh, images), train.shard(mesh, labels)
  opt = config_lib.base_config().child.optimizer
  tx = train.child_optimizer(opt, 100)
  key = jax.random.PRNGKey(0)

  def block(out):
    jax.block_until_ready(out)

  def network(arch=None):
    return c.family.network(space, arch, families.NetworkArgs(
        c.num_classes, c.head, compute_dtype, c.choice, train.DATA_AXIS))

  supernet = network()
  state0 = train.replicate(mesh, train.create_train_state(
      key, supernet, (image, image, 3), tx, jnp.asarray(space.baseline())))
  ctrl = train.replicate(mesh, controller.init(key, len(ops.OP_NAMES)))
  jmask = jnp.asarray(mask)

  # One compiled supernet step serves the controller-sampled architectures and the
  # given ones (``lax.cond`` runs only the taken branch).
  def sample_or_given(k, p):
    return jax.lax.cond(p['given'], lambda: p['arch'],
                        lambda: controller.sample(p['ctrl'], k, jmask).arch)

  supernet_step = train.make_train_step(supernet, tx, mesh, **stats, sample_arch=sample_or_given,
                                        archs_per_step=archs_per_step)
  sampler = {'ctrl': ctrl, 'arch': jnp.asarray(space.baseline(), jnp.int32),
             'given': jnp.asarray(False)}
  holder = {'state': state0}

  def sampled():
    holder['state'], m = supernet_step(holder['state'], x, y, key, sampler)
    block(m)

  # First calls (compiles) are timed alone and outside the lock.
  (compile_s,), (compile_cpu_s,) = _timed(sampled, 1)
  start = holder['state']  # The search loop below replays the timed steps from here.
  sampled_s, _ = _timed(sampled, steps, lock)

  # Paired: the same random architectures as supernet steps and as fixed networks.
  archs = [tuple(int(a) for a in controller.uniform_sample(jax.random.PRNGKey(i), jmask))
           for i in range(num_archs)]
  paired, fixed, paired_cpu, fixed_cpu = [], [], [], []
  for arch in archs:
    given = dict(sampler, arch=jnp.asarray(arch, jnp.int32), given=jnp.asarray(True))

    def super_run(given=given):
      holder['state'], m = supernet_step(holder['state'], x, y, key, given)
      block(m)
    _timed(super_run, 1)
    wall, cpu = _timed(super_run, steps, lock)
    paired.append(statistics.median(wall))
    paired_cpu.append(statistics.median(cpu))
    # The fixed network starts from the supernet's weights of its architecture.
    fixed_state = {'s': train.replicate(mesh, train.train_state(
        select_branches(state0.variables, arch), tx))}
    fixed_step = train.make_train_step(network(arch), tx, mesh, **stats, sample_arch=None)

    def fixed_run():
      fixed_state['s'], m = fixed_step(fixed_state['s'], x, y, key, None)
      block(m)
    _timed(fixed_run, 1)
    wall, cpu = _timed(fixed_run, steps, lock)
    fixed.append(statistics.median(wall))
    fixed_cpu.append(statistics.median(cpu))

  # Controller update: num_aggregate architectures rewarded on validation minibatches.
  cc = config_lib.base_config().search.controller
  ctx = train.controller_optimizer(cc)
  ctrl_state = train.replicate(mesh, train.create_controller_state(
      key, len(ops.OP_NAMES), cc.hidden, cc.init_range, ctx))
  update = train.make_controller_update(
      supernet, ctx, mesh, policy=policy.operator_policy(mask, cc.tanh_constant),
      mean=stats['mean'], std=stats['std'], entropy_weight=cc.entropy_weight,
      baseline_decay=cc.baseline_decay)
  valid_x = train.shard(mesh, np.broadcast_to(images, (cc.num_aggregate, *images.shape)).copy(), 1)
  valid_y = train.shard(mesh, np.broadcast_to(labels, (cc.num_aggregate, batch)).copy(), 1)
  ctrl_holder = {'s': ctrl_state}

  def controller_run():
    ctrl_holder['s'], m = update(ctrl_holder['s'], holder['state'].variables, valid_x, valid_y, key)
    block(m)
  _timed(controller_run, 1)
  controller_update_s = statistics.median(_timed(controller_run, max(2, steps // 2), lock)[0])

  # The pipeline's own training loop (``phases.loop.train_epoch``: host batching,
  # sharding, metrics) replays the timed supernet steps: the same start state and key, so
  # the same architectures. A scan epoch compiles on its first call, which is not timed.
  split = data.Split(np.concatenate([images] * steps), np.concatenate([labels] * steps))
  progress = Progress(Log(workdir='', verbose=False), 'bench', steps * 2)

  def loop_run():
    holder['state'], _ = epoch_loop.train_epoch(
        supernet_step, start, split, batch, 0, key, sampler, progress, mesh=mesh, seed=0,
        log_every_steps=steps, scan=loop == 'scan')
    block(holder['state'])
  if loop == 'scan':
    _timed(loop_run, 1)
  (loop_s,), _ = _timed(loop_run, 1, lock)

  result = {
      'case': case, 'choice': c.choice, 'batch': batch, 'width': space.stem_channels,
      'image': image, 'dtype': dtype,
      'devices': mesh.devices.size, 'platform': jax.devices()[0].platform,
      'supernet_step_s': statistics.median(sampled_s),
      'paired_supernet_step_s': statistics.median(paired),
      'fixed_step_s': statistics.median(fixed),
      'ratio': sum(paired) / sum(fixed),
      'ratio_cpu': sum(paired_cpu) / sum(fixed_cpu),
      'archs_per_step': archs_per_step,
      'images_per_s': batch / statistics.median(sampled_s),
      'archs_per_s': archs_per_step / statistics.median(sampled_s),
      'compile_s': compile_s,
      'compile_cpu_s': compile_cpu_s,
      'controller_update_s': controller_update_s,
      'loop': loop,
      'search_loop_overhead': loop_s / sum(sampled_s),
      'peak_rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
  }
  memory = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in memory:
    result['peak_device_mb'] = memory['peak_bytes_in_use'] / 2**20
  return result


def main(argv):
  del argv
  train.add_cpu_xla_flags()
  cases = _CASES.value or default_cases(jax.devices()[0].platform)
  for case in cases:
    parse_case(case, jax.devices()[0].platform)  # Fail on a bad name before measuring anything.
  for case in cases:
    result = run_case(case, _BATCH.value, _STEPS.value, _ARCHS.value, _DTYPE.value,
                      _IMAGE.value, _LOOP.value, _LOCK.value, _ARCHS_PER_STEP.value)
    if _NOTE.value:
      result['note'] = _NOTE.value
    line = json.dumps(result)
    print(line, flush=True)
    if _OUT.value:
      with open(_OUT.value, 'a') as f:
        f.write(line + '\n')


if __name__ == '__main__':
  app.run(main)
