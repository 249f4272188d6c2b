"""Pure, jitted, data-parallel steps: child training, evaluation, controller update.

Every step is :func:`jit` (``jax.jit`` with the project's XLA options) around a
``jax.shard_map`` over the 1-D mesh axis ``data``
(README, "Design notes": data parallelism): the per-device program sees its slice
of the global batch, averages gradients with ``pmean`` and keeps replicated state.
BatchNorm statistics are synchronised over ``data`` in training, so ``n`` devices
compute exactly what one device computes on the same global batch.

The architecture of a supernet step is sampled *inside* the step (from the
controller, or uniformly during pretraining) from a traced key, so there is no host
round trip per minibatch and one trace serves every architecture.

Several architectures per step (``archs_per_step = k > 1``). The ``n`` devices are
viewed as a 2-D mesh ``(arch, data)`` of ``k`` groups of ``n / k`` consecutive
devices (:func:`arch_group_mesh`); group ``g`` samples its own architecture and
trains it on its ``1 / k`` of the global batch. The loss is the global-batch mean,
so a branch used by several groups gets the sum of their gradient shares; the
branches no group used stay frozen with their optimizer state. Every BatchNorm
normalises with its group's statistics (synchronised over ``data`` only), and a
branch's running averages become the mean of the updates of the groups that used it
(:func:`average_group_stats`). The parameters are cast to vary over ``arch`` before
the network runs: otherwise the transpose of that cast, a ``psum`` over every device,
sits inside each ``lax.switch`` branch and devices taking different branches sum
unrelated values (README, "Design notes": several architectures per step).

Unselected branches. A child step updates only what the sampled architecture used:
parameters *and* optimizer state (momentum) of unselected branches are left exactly
as they were, so momentum and weight decay never move weights that received no
gradient (README, "Design notes": unselected branches stay put). An operator that is
rarely sampled is therefore not shrunk by weight decay while it sits idle.
"""

from __future__ import annotations

import functools
import math
import os
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from nar_jax import controller, distributed, reinforce, verification
from nar_jax import policy as policy_lib
from nar_jax.data.augment import augment, normalize
from nar_jax.models import nodes

DATA_AXIS = 'data'
ARCH_AXIS = 'arch'


def jit(fn: Callable, *, runs_once: bool = False) -> Callable:
  """``jax.jit(fn)`` with this project's XLA options for the default backend.

  XLA:CPU optimises the host code it generates with LLVM at -O3. For the supernet
  train step -O2 gives the same step time for ~25% less compile time
  (``benchmarks/compile_probe.py``), so every training, evaluation and controller
  program compiles at -O2; a program that ``runs_once`` (parameter initialisation,
  a few milliseconds of work) compiles at -O0, ~60% faster. Other backends keep
  XLA's defaults. See also :func:`add_cpu_xla_flags`.
  """
  if jax.default_backend() != 'cpu':
    return jax.jit(fn)
  return jax.jit(fn, compiler_options={'xla_backend_optimization_level': 0 if runs_once else 2})


# On 2 CPU cores XLA's concurrency-optimised scheduler made the plain network's train
# step 12-20% and the supernet's 4-13% slower (README, "Performance"). The flag has no
# effect as a per-program compiler option, and none on other platforms.
CPU_XLA_FLAGS = ('--xla_cpu_enable_concurrency_optimized_scheduler=false',)


def add_cpu_xla_flags() -> None:
  """Appends :data:`CPU_XLA_FLAGS` to the ``XLA_FLAGS`` environment variable.

  A flag already named in ``XLA_FLAGS`` keeps its value. XLA reads the variable
  once, when JAX starts its first backend, so the command-line entry points call
  this before anything else; in a notebook, call it before the first JAX computation.
  """
  current = os.environ.get('XLA_FLAGS', '').split()
  named = {flag.split('=')[0] for flag in current}
  added = [flag for flag in CPU_XLA_FLAGS if flag.split('=')[0] not in named]
  if added:
    os.environ['XLA_FLAGS'] = ' '.join(current + added)


# ---------------------------------------------------------------------------------------
# State.
# ---------------------------------------------------------------------------------------


@flax.struct.dataclass
class TrainState:
  """Shared (or fixed-network) weights and their optimizer."""

  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: Any

  @property
  def variables(self) -> dict[str, Any]:
    return {'params': self.params, 'batch_stats': self.batch_stats}


@flax.struct.dataclass
class ControllerState:
  """Controller parameters, their Adam state and the EMA reward baseline."""

  params: Any
  opt_state: Any
  baseline: jax.Array


def create_train_state(key: jax.Array, model: nn.Module, image_shape: tuple[int, int, int],
                       tx: optax.GradientTransformation, op_indices: jax.Array | None) -> TrainState:
  """Initialises ``model`` on a dummy batch (every supernet branch is created)."""
  images = jnp.zeros((1, *image_shape), jnp.float32)
  variables = jit(functools.partial(model.init, train=False), runs_once=True)(key, images,
                                                                          op_indices)
  return train_state(variables, tx)


def train_state(variables: Any, tx: optax.GradientTransformation) -> TrainState:
  """Step 0 with ``variables``' parameters and batch statistics and fresh ``tx`` state."""
  params = variables['params']
  return TrainState(jnp.zeros((), jnp.int32), params, variables.get('batch_stats', {}),
                    tx.init(params))


def create_controller_state(key: jax.Array, num_ops: int, hidden: int, init_range: float,
                            tx: optax.GradientTransformation) -> ControllerState:
  """An operator-only controller (:func:`nar_jax.controller.init`) with zero baseline."""
  return controller_state(controller.init(key, num_ops, hidden, init_range), tx)


def controller_state(params: Any, tx: optax.GradientTransformation) -> ControllerState:
  """Any controller's ``params`` (e.g. ``policy.init(key)``) with fresh Adam state and
  a zero baseline."""
  return ControllerState(params, tx.init(params), jnp.zeros((), jnp.float32))


# ---------------------------------------------------------------------------------------
# Optimizers.
# ---------------------------------------------------------------------------------------


def sgdr_schedule(lr_max: float, lr_min: float, first_period: int, period_mul: float) -> optax.Schedule:
  """Cosine annealing with warm restarts (SGDR); periods ``T0, T0*mul, T0*mul^2, ...`` steps.

  ``period_mul == 1`` restarts every ``first_period`` steps; a ``first_period`` as
  long as training gives a plain cosine decay.
  """
  if first_period <= 0:
    raise ValueError(f'SGDR first period must be positive, got {first_period}')

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    if period_mul == 1:
      period = jnp.float32(first_period)
      t = jnp.mod(step, period)
    else:
      n = jnp.floor(jnp.log1p(step * (period_mul - 1) / first_period) / math.log(period_mul))
      start = first_period * (period_mul ** n - 1) / (period_mul - 1)
      period = first_period * period_mul ** n
      t = step - start
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + jnp.cos(jnp.pi * t / period))

  return schedule


def step_schedule(lr: float, boundaries: list[int], factor: float) -> optax.Schedule:
  """``lr`` multiplied by ``factor`` at each step in ``boundaries`` (ArcFace's recipe)."""
  if any(b <= 0 for b in boundaries):
    raise ValueError(f'step-decay boundaries must be positive steps, got {boundaries}')
  return optax.piecewise_constant_schedule(lr, {b: factor for b in boundaries})


def linear_warmup(schedule: optax.Schedule, warmup_steps: int) -> optax.Schedule:
  """``schedule(step) * min(1, (step + 1) / warmup_steps)``: the learning rate ramps up
  linearly over the first ``warmup_steps`` steps (step 0 at ``1 / warmup_steps`` of the
  schedule's value, step ``warmup_steps - 1`` at all of it), then is the schedule's own;
  the schedule's step boundaries are not shifted (Goyal et al., 2017). 0 steps: no ramp."""
  if warmup_steps < 0:
    raise ValueError(f'warm-up steps must be >= 0, got {warmup_steps}')
  if not warmup_steps:
    return schedule

  def warmed(step):
    ramp = jnp.minimum(1.0, (jnp.asarray(step, jnp.float32) + 1.0) / warmup_steps)
    return schedule(step) * ramp

  return warmed


def child_optimizer(cfg, steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD (momentum, optionally Nesterov) with L2 weight decay and a schedule counted in epochs.

  ``cfg`` fields (see :func:`nar_jax.config.sgd_config`): ``lr_max, lr_min, t0_epochs,
  t_mul, momentum, nesterov, weight_decay, schedule, decay_epochs, decay_factor``, and
  optionally ``warmup_epochs`` (:func:`linear_warmup` over that many epochs; absent: 0).
  """
  if cfg.schedule == 'cosine':
    schedule = sgdr_schedule(cfg.lr_max, cfg.lr_min,
                             max(1, int(cfg.t0_epochs * steps_per_epoch)), cfg.t_mul)
  elif cfg.schedule == 'step':
    epochs = [float(e) for e in cfg.decay_epochs.split(',') if e.strip()]
    schedule = step_schedule(cfg.lr_max, [int(round(e * steps_per_epoch)) for e in epochs],
                             cfg.decay_factor)
  else:
    raise ValueError(f"unknown learning-rate schedule {cfg.schedule!r}; use 'cosine' or 'step'")
  schedule = linear_warmup(schedule, int(round(cfg.get('warmup_epochs', 0) * steps_per_epoch)))
  return optax.chain(
      optax.add_decayed_weights(cfg.weight_decay),
      optax.sgd(schedule, momentum=cfg.momentum or None, nesterov=cfg.nesterov))


def controller_optimizer(cfg) -> optax.GradientTransformation:
  """Adam with ENAS's settings (``lr``, ``beta1``, ``eps`` from ``cfg``)."""
  return optax.adam(cfg.lr, b1=cfg.beta1, eps=cfg.eps)


# ---------------------------------------------------------------------------------------
# Mesh and batches.
# ---------------------------------------------------------------------------------------


def make_mesh(num_devices: int = 0) -> Mesh:
  """1-D mesh ``data`` over the first ``num_devices`` devices (0 = all).

  Devices are ordered by process, so each process holds one contiguous share of every
  global batch (:func:`nar_jax.distributed.process_rows`). A multi-process run uses
  every device of every process.
  """
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  if num_devices < 0 or num_devices > len(devices):
    raise ValueError(f'asked for {num_devices} devices but {len(devices)} are available')
  if jax.process_count() > 1 and num_devices not in (0, len(devices)):
    raise ValueError(f'a run of {jax.process_count()} processes uses all {len(devices)} '
                     f'devices; config.num_devices is {num_devices} (use 0)')
  return Mesh(np.asarray(devices[:num_devices or len(devices)]), (DATA_AXIS,))


def check_batch_size(batch_size: int, mesh: Mesh, what: str = 'batch size') -> None:
  """Raises ``ValueError`` unless the global batch divides evenly over the devices."""
  n = mesh.devices.size
  if batch_size <= 0 or batch_size % n:
    raise ValueError(f'{what} {batch_size} is not divisible by the device count {n}; '
                     f'use a multiple of {n}')


def shard(mesh: Mesh, rows: np.ndarray, batch_axis: int = 0) -> jax.Array:
  """The global array, split along ``batch_axis`` over ``data``, of which ``rows`` are
  this process's share (:func:`nar_jax.distributed.process_rows`; with one process,
  the whole batch).

  Every process calls it with its own rows, of the same shape; the global batch is
  ``process_count`` times as long.
  """
  spec = [None] * rows.ndim
  spec[batch_axis] = DATA_AXIS
  global_shape = list(rows.shape)
  global_shape[batch_axis] *= jax.process_count()
  return jax.make_array_from_process_local_data(NamedSharding(mesh, P(*spec)),
                                                np.asarray(rows), tuple(global_shape))


def shard_whole(mesh: Mesh, batch: np.ndarray, batch_axis: int = 0) -> jax.Array:
  """:func:`shard` of a global batch every process holds whole (e.g. a batch of
  verification images): each process contributes its own rows of it."""
  index = [slice(None)] * np.ndim(batch)
  index[batch_axis] = distributed.process_rows(np.shape(batch)[batch_axis])
  return shard(mesh, np.asarray(batch)[tuple(index)], batch_axis)


def replicate(mesh: Mesh, tree: Any) -> Any:
  """Places a pytree on every device of the mesh."""
  return jax.device_put(tree, NamedSharding(mesh, P()))


def check_archs_per_step(archs_per_step: int, mesh: Mesh) -> None:
  """Raises ``ValueError`` unless ``archs_per_step`` is a positive divisor of the
  mesh's device count (each architecture trains on a group of whole devices)."""
  n = mesh.devices.size
  if not isinstance(archs_per_step, (int, np.integer)) or archs_per_step < 1 or n % archs_per_step:
    divisors = [d for d in range(1, n + 1) if n % d == 0]
    raise ValueError(f'archs_per_step must be a positive divisor of the device count {n} '
                     f'(one group of devices per architecture): one of {divisors}, '
                     f'got {archs_per_step!r}')


def arch_group_mesh(mesh: Mesh, archs_per_step: int) -> Mesh:
  """The devices of the 1-D ``data`` mesh as a 2-D mesh ``(arch, data)``:
  ``archs_per_step`` groups (rows) of ``n / archs_per_step`` consecutive devices.

  A batch split over ``data`` on ``mesh`` is split over ``(arch, data)`` on the result
  with every example on the same device: group ``g`` holds examples
  ``[g B / k, (g + 1) B / k)`` of a global batch of ``B``.
  """
  check_archs_per_step(archs_per_step, mesh)
  return Mesh(mesh.devices.reshape(archs_per_step, -1), (ARCH_AXIS, DATA_AXIS))


# ---------------------------------------------------------------------------------------
# Steps.
# ---------------------------------------------------------------------------------------


def tree_where(mask: Any, new: Any, old: Any) -> Any:
  """Per-leaf ``where(mask, new, old)`` with scalar boolean mask leaves."""
  return jax.tree.map(lambda m, n, o: jnp.where(m, n, o), mask, new, old)


def keep_unselected(mask: Any, params_treedef, new_opt_state: Any, old_opt_state: Any) -> Any:
  """Restores the optimizer-state entries of unselected branches.

  Every sub-tree of the optimizer state shaped like the parameters (momentum
  traces, Adam moments) takes ``new`` where ``mask`` is True and ``old`` elsewhere;
  other entries (step counters) take ``new``.
  """
  like_params = lambda t: jax.tree.structure(t) == params_treedef
  return jax.tree.map(lambda n, o: tree_where(mask, n, o) if like_params(n) else n,
                      new_opt_state, old_opt_state, is_leaf=like_params)


ArchSampler = Callable[[jax.Array, Any], jax.Array]
UsedMask = Callable[[Any, jax.Array], Any]


def sample_group_archs(sample_arch: ArchSampler, key: jax.Array, sampler_params: Any,
                       archs_per_step: int) -> jax.Array:
  """``(archs_per_step, N)``: group ``g``'s architecture from the ``g``-th of
  ``archs_per_step`` keys split from ``key`` (``sample_arch`` as in :func:`make_train_step`)."""
  keys = jax.random.split(key, archs_per_step)
  return jax.vmap(lambda k: sample_arch(k, sampler_params))(keys)


def _psum_groups(tree: Any) -> Any:
  """``psum`` over ``arch`` of every leaf of a float32 pytree, as one packed collective
  (inside ``shard_map`` over :func:`arch_group_mesh`)."""
  flat, unravel = jax.flatten_util.ravel_pytree(tree)
  return unravel(jax.lax.psum(flat, ARCH_AXIS))


def count_groups(mask: Any) -> Any:
  """Int32 scalar pytree like the scalar boolean ``mask``: how many groups (over
  ``arch``, inside ``shard_map``) have each leaf True; one packed ``psum``."""
  leaves, treedef = jax.tree.flatten(mask)
  counts = jax.lax.psum(jnp.stack([jnp.asarray(m, jnp.int32) for m in leaves]), ARCH_AXIS)
  return jax.tree.unflatten(treedef, list(counts))


def average_group_stats(new: Any, old: Any, used: Any) -> Any:
  """BatchNorm running averages combined over the groups of ``arch`` (inside ``shard_map``).

  ``new``: this group's updated statistics, ``old``: the step's input (replicated),
  ``used``: this group's scalar boolean mask (``used_mask(batch_stats, arch)``). A leaf
  some group used becomes the mean of those groups' ``new``; a leaf no group used
  becomes ``old`` plus the mean over all groups of ``new - old``: exactly ``old`` for an
  unselected branch (no group changed it), the mean update for a layer every group
  ran without using its output (the joint space's unread reductions, as one group
  would update it). Returns replicated statistics like ``old``.
  """
  counts = count_groups(used)
  users_sum = _psum_groups(jax.tree.map(lambda n, u: jnp.where(u, n, 0.0), new, used))
  drift_sum = _psum_groups(jax.tree.map(lambda n, o: n - o, new, old))
  groups = jax.lax.axis_size(ARCH_AXIS)
  return jax.tree.map(
      lambda c, s, d, o: jnp.where(c > 0, s / jnp.maximum(c, 1).astype(s.dtype), o + d / groups),
      counts, users_sum, drift_sum, old)


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                    mean, std, crop_padding: int, flip: bool,
                    sample_arch: ArchSampler | None, used_mask: UsedMask = nodes.branch_mask,
                    archs_per_step: int = 1):
  """Builds ``step(state, images, labels, key, sampler_params) -> (state, metrics)``.

  Args:
    model: a supernet (``arch=None``) when ``sample_arch`` is given, else a fixed net;
      built with ``bn_axis_name='data'``.
    tx: the child optimizer.
    mesh: the data mesh.
    mean, std: per-channel normalisation.
    crop_padding, flip: on-device augmentation.
    sample_arch: ``(key, sampler_params) -> op_indices (num_nodes,)``, or ``None``.
    used_mask: ``(params, arch) -> bool pytree like params``: which leaves the sampled
      architecture uses (the rest, and their optimizer state, are frozen). Default
      :func:`nar_jax.models.nodes.branch_mask` (one op index per node); the joint
      space needs :func:`nar_jax.models.macro.branch_mask` with its space bound.
      With ``archs_per_step > 1`` it is also applied to the batch statistics.
    archs_per_step: ``k``, architectures trained per step, a divisor of the mesh's
      device count (:func:`check_archs_per_step`; ``k > 1`` needs ``sample_arch``).
      ``1``: one architecture sampled from the step's arch key trains on every
      device. ``k > 1``: ``k`` architectures from ``k`` keys split from it
      (:func:`sample_group_archs`), group ``g`` of :func:`arch_group_mesh` trains the
      ``g``-th on its consecutive ``B / k`` examples; the loss is the mean over the
      global batch, each example under its group's architecture; a leaf is updated
      (with its optimizer state) when any group's architecture uses it; BatchNorm
      normalises with the group's statistics and running averages are combined by
      :func:`average_group_stats` (module docstring).

  The returned function takes uint8 ``images (B, H, W, C)`` and int32 ``labels (B,)``
  sharded over ``data``, and ``sampler_params`` (controller parameters, or ``None``).
  ``metrics`` holds ``loss``, ``accuracy`` (over the global batch), ``grad_norm``,
  ``finite`` (whether the loss and the gradient norm were finite: if not, the step was
  not applied) and the sampled ``arch``: ``(num_nodes,)`` for ``k = 1``, ``(k,
  num_nodes)`` (row ``g``: group ``g``'s) for ``k > 1``.
  """
  check_archs_per_step(archs_per_step, mesh)
  grouped = archs_per_step > 1
  if grouped and sample_arch is None:
    raise ValueError(f'archs_per_step={archs_per_step} trains several sampled architectures '
                     f'per step: it needs a supernet and sample_arch (a fixed network has one)')
  # The axes of the whole batch: every device's examples enter the loss and metrics.
  batch_axes = (ARCH_AXIS, DATA_AXIS) if grouped else DATA_AXIS

  def device_step(state: TrainState, images, labels, op_indices, dropout_key):
    # Each device drops out different units of its own examples.
    dropout_key = jax.random.fold_in(dropout_key, jax.lax.axis_index(batch_axes))
    if grouped:
      op_indices = op_indices[0]  # this group's architecture, (num_nodes,)

    def loss_fn(params):
      batch_stats = state.batch_stats
      if grouped:
        # Vary over 'arch' before any lax.switch: the cast's transpose (the gradient's
        # sum over groups) then runs outside the conditionals, which devices of
        # different groups take differently; inside them only 'data' is summed. The
        # statistics too: every branch's (taken or not) leaves a switch varying.
        params, batch_stats = jax.lax.pcast((params, batch_stats), (ARCH_AXIS,), to='varying')
      # ``labels``: a margin head (faces) adds its margin to each target logit.
      logits, updated = model.apply({'params': params, 'batch_stats': batch_stats},
                                    images, op_indices, train=True, labels=labels,
                                    rngs={'dropout': dropout_key}, mutable=['batch_stats'])
      # The global-batch mean: its gradient w.r.t. the replicated parameters is the
      # global gradient (the implicit replicated->varying casts sum over devices).
      loss = jax.lax.pmean(
          optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), batch_axes)
      return loss, (logits, updated['batch_stats'])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if op_indices is not None:
      used = used_mask(state.params, op_indices)
      if grouped:  # used by any group's architecture
        used = jax.tree.map(lambda count: count > 0, count_groups(used))
        batch_stats = average_group_stats(batch_stats, state.batch_stats,
                                          used_mask(state.batch_stats, op_indices))
      params = tree_where(used, params, state.params)
      opt_state = keep_unselected(used, jax.tree.structure(state.params), opt_state,
                                  state.opt_state)
    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & jnp.isfinite(optax.tree.norm(updates)))
    # A step with a non-finite loss, gradient or update is not applied (as
    # optax.apply_if_finite): the state stays the last finite one, and the loop stops.
    params, batch_stats, opt_state = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, batch_stats, opt_state),
        (state.params, state.batch_stats, state.opt_state))
    metrics = {
        'loss': loss,
        'accuracy': jax.lax.pmean(jnp.mean(jnp.argmax(logits, -1) == labels), batch_axes),
        'grad_norm': grad_norm,
        'finite': finite,
    }
    return TrainState(state.step + 1, params, batch_stats, opt_state), metrics

  if grouped:
    sharded = jax.shard_map(device_step, mesh=arch_group_mesh(mesh, archs_per_step),
                            in_specs=(P(), P(batch_axes), P(batch_axes), P(ARCH_AXIS), P()),
                            out_specs=(P(), P()))
  else:
    sharded = jax.shard_map(device_step, mesh=mesh,
                            in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(), P()),
                            out_specs=(P(), P()))

  @jit
  def step(state: TrainState, images, labels, key, sampler_params):
    key = jax.random.fold_in(key, state.step)
    augment_key, arch_key = jax.random.split(key)
    dropout_key = jax.random.fold_in(key, 2)
    x = normalize(images, mean, std)
    x = augment(augment_key, x, crop_padding=crop_padding, flip=flip)
    if sample_arch is None:
      op_indices = None
    elif grouped:
      op_indices = sample_group_archs(sample_arch, arch_key, sampler_params, archs_per_step)
    else:
      op_indices = sample_arch(arch_key, sampler_params)
    state, metrics = sharded(state, x, labels, op_indices, dropout_key)
    if op_indices is not None:
      metrics['arch'] = op_indices
    if grouped:  # replicated on the data mesh, as the inputs: the next step reuses this program
      state, metrics = jax.lax.with_sharding_constraint(
          (state, metrics), NamedSharding(mesh, P()))
    return state, metrics

  return step


@functools.cache
def scan_epoch(step_fn: Callable) -> Callable:
  """Runs many steps of ``step_fn`` (from :func:`make_train_step`) as one ``lax.scan``.

  Returns jitted ``epoch(state, images (S, B, H, W, C), labels (S, B), key,
  sampler_params) -> (state, metrics)``: step ``i`` trains on ``images[i]``,
  ``labels[i]`` (device-resident uint8 / int32, batch axis sharded over ``data``),
  with exactly the keys, augmentation and sampled architectures of ``S`` calls of
  ``step_fn``; ``metrics`` leaves are stacked along a leading ``S`` axis. One
  compiled program per ``(step_fn, S)``: there is no host round trip between steps.
  """

  # The step's Python function: a nested jit may not carry compiler options (:func:`jit`).
  step = getattr(step_fn, '__wrapped__', step_fn)

  @jit
  def epoch(state: TrainState, images, labels, key, sampler_params):
    if images.shape[:2] != labels.shape:
      raise ValueError(f'images {images.shape} and labels {labels.shape} must share the '
                       f'leading (steps, batch) axes')

    def body(state, batch):
      return step(state, batch[0], batch[1], key, sampler_params)

    return jax.lax.scan(body, state, (images, labels))

  return epoch


def predict(model: nn.Module, variables: Any, images: jax.Array, op_indices: jax.Array | None,
            batch_statistics: bool, embed: bool = False) -> jax.Array:
  """Logits (or, with ``embed``, a face model's embeddings) of an evaluation pass
  (no parameter or statistics update).

  ``batch_statistics=False`` normalises with BatchNorm's running averages, as a
  trained network is used. ``True`` normalises with the statistics of the batch
  itself (synchronised over ``data``); that is how supernet architectures are
  scored: a branch's running averages mix inputs from every architecture sampled
  upstream of it, and scoring with them puts most architectures near chance.
  """
  method = {'method': 'embed'} if embed else {}
  if not batch_statistics:
    return model.apply(variables, images, op_indices, train=False, **method)
  logits, _ = model.apply(variables, images, op_indices, train=True, mutable=['batch_stats'],
                          **method)
  return logits


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
  """float32 ``(B,)``: 1 where ``labels (B,)`` is among the ``k`` largest of ``logits (B, C)``
  (all ``C`` when ``k > C``), else 0. Ties at the k-th value are broken by ``lax.top_k``
  (the lower class index first)."""
  top = jax.lax.top_k(logits, min(k, logits.shape[-1]))[1]
  return jnp.any(top == labels[:, None], axis=-1).astype(jnp.float32)


def make_eval_step(model: nn.Module, mesh: Mesh, *, mean, std, batch_statistics: bool = False):
  """Builds ``eval(variables, images, labels, weights, op_indices) -> sums``.

  ``weights (B,)`` is 1 for real and 0 for padding examples. Returns a dict of
  global sums ``correct`` (top-1), ``correct5`` (:func:`top_k_correct`, k = 5),
  ``loss`` and ``count``. See :func:`predict` for ``batch_statistics``.
  """

  def device_eval(variables, images, labels, weights, op_indices):
    logits = predict(model, variables, normalize(images, mean, std), op_indices,
                     batch_statistics)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    sums = {'correct': jnp.sum((jnp.argmax(logits, -1) == labels) * weights),
            'correct5': jnp.sum(top_k_correct(logits, labels, 5) * weights),
            'loss': jnp.sum(loss * weights), 'count': jnp.sum(weights)}
    return jax.lax.psum(sums, DATA_AXIS)

  return jit(jax.shard_map(
      device_eval, mesh=mesh, in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS), P()),
      out_specs=P()))


def make_embed_step(model: nn.Module, mesh: Mesh, *, mean, std):
  """Builds ``embed(variables, images) -> (B, D)`` for a fixed face network.

  ``images`` are uint8 ``(B, H, W, C)`` sharded over ``data``; the embeddings come
  back replicated (gathered from every device), so every process can read them all
  (BatchNorm with running averages, no dropout).
  """

  def device_embed(variables, images):
    e = model.apply(variables, normalize(images, mean, std), train=False, method='embed')
    return jax.lax.all_gather(e, DATA_AXIS, tiled=True)

  # The replication checker cannot see through all_gather, hence check_vma=False.
  return jit(jax.shard_map(device_embed, mesh=mesh, in_specs=(P(), P(DATA_AXIS)),
                           out_specs=P(), check_vma=False))


def _accuracy_reward(model, mesh, mean, std, batch_statistics):
  """``(variables, archs (M, N), images (M, B, ...), labels (M, B)) -> (M,)`` accuracies."""

  def device_accuracy(variables, archs, images, labels):
    def one(args):
      arch, x, y = args
      logits = predict(model, variables, normalize(x, mean, std), arch, batch_statistics)
      return jnp.sum(jnp.argmax(logits, -1) == y)

    correct = jax.lax.psum(jax.lax.map(one, (archs, images, labels)), DATA_AXIS)
    return correct / jax.lax.psum(labels.shape[1], DATA_AXIS)

  return jax.shard_map(device_accuracy, mesh=mesh,
                       in_specs=(P(), P(), P(None, DATA_AXIS), P(None, DATA_AXIS)),
                       out_specs=P())


def _verification_reward(model, mesh, mean, std, batch_statistics):
  """``(variables, archs (M, N), images (M, 2P, ...), issame (M, P)) -> (M,)``: each
  architecture's 10-fold verification accuracy on its own pairs (flip-sum,
  L2-normalised embeddings, :func:`nar_jax.verification.fold_accuracy`)."""

  def device_verification(variables, archs, images, issame):
    def one(args):
      arch, x, same = args
      x = normalize(x, mean, std)
      e = sum(predict(model, variables, v, arch, batch_statistics, embed=True)
              for v in (x, x[:, :, ::-1]))
      e = jax.lax.all_gather(e, DATA_AXIS, tiled=True)  # (2P, D): every pair, every device
      e = e / jnp.linalg.norm(e, axis=-1, keepdims=True).clip(1e-12)
      return verification.fold_accuracy(jnp.sum(jnp.square(e[0::2] - e[1::2]), -1), same)

    return jax.lax.map(one, (archs, images, issame))

  # Every device computes the same rewards from the gathered embeddings; the
  # replication checker cannot see through all_gather, hence check_vma=False.
  return jax.shard_map(device_verification, mesh=mesh,
                       in_specs=(P(), P(), P(None, DATA_AXIS), P()), out_specs=P(),
                       check_vma=False)


REWARDS = {'accuracy': _accuracy_reward, 'verification': _verification_reward}
"""The controller rewards (:attr:`nar_jax.tasks.RewardData.kind`) and their jitted measures."""


def make_controller_update(model: nn.Module, tx: optax.GradientTransformation, mesh: Mesh, *,
                           policy: policy_lib.Policy, mean, std, entropy_weight: float,
                           baseline_decay: float, batch_statistics: bool = True,
                           reward: str = 'accuracy', cost: reinforce.CostReward | None = None):
  """Builds one jitted controller update (README, "Design notes": ENAS's controller
  and recipe).

  ``update(ctrl_state, child_variables, images (M, B, H, W, C), targets, key, *args)``
  samples ``M`` architectures from ``policy`` (``args``: the policy's extra arguments,
  e.g. the alternating search's incumbent), rewards each on its own validation
  minibatch (no augmentation; BatchNorm as :func:`predict` with ``batch_statistics``)
  plus ``entropy_weight`` times its sampled entropy, updates the EMA baseline sample
  by sample, and takes one Adam step on ``policy.loss``. Returns ``(ctrl_state,
  metrics)``; see :func:`make_policy_update` for the metrics.

  ``policy``: a :class:`nar_jax.policy.Policy`, e.g. NAR's operator-only
  :func:`nar_jax.policy.operator_policy`.

  ``reward='accuracy'``: classification accuracy; ``targets`` = labels ``(M, B)``.
  ``reward='verification'`` (faces): the ``B`` images are ``B / 2`` pairs (``2i``,
  ``2i + 1``), ``targets`` = issame ``(M, B / 2)``, the reward their verification accuracy.
  ``cost``: optional resource-aware reward (:class:`nar_jax.reinforce.CostReward`).
  """
  if reward not in REWARDS:
    raise ValueError(f"unknown reward {reward!r}; use 'accuracy' or 'verification'")
  return make_policy_update(policy, tx, REWARDS[reward](model, mesh, mean, std, batch_statistics),
                            entropy_weight=entropy_weight, baseline_decay=baseline_decay,
                            cost=cost)


RewardFn = Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array]


def make_policy_update(policy: policy_lib.Policy, tx: optax.GradientTransformation,
                       reward_fn: RewardFn, *, entropy_weight: float, baseline_decay: float,
                       cost: reinforce.CostReward | None = None):
  """The controller update of :func:`make_controller_update` for any reward.

  ``reward_fn(child_variables, archs (M, ...), images, targets) -> (M,)`` scores the
  sampled architectures (:func:`make_controller_update` measures accuracy with the
  shared weights; a test can plant a reward that is a fixed function of the
  architecture). Returns jitted ``update(ctrl_state, child_variables, images,
  targets, key, *args) -> (ctrl_state, metrics)`` with ``metrics``:

  * ``controller_loss``, ``reward`` (mean over the ``M`` samples, entropy bonus
    included), ``valid_acc`` (mean of ``reward_fn``), ``baseline``, ``entropy`` (mean
    per-architecture sum of the op entropies), ``grad_norm`` (norm of the loss gradient),
    ``finite`` (loss, gradient norm and rewards finite; if not, the update was not
    applied);
  * with ``cost`` (MnasNet's constraint, :func:`nar_jax.reinforce.cost_aware_reward`:
    each sample's accuracy times ``(MACs / target) ** w`` before the entropy bonus),
    ``macs``: the samples' mean MACs;
  * the policy's diagnostics of the same samples, advantages and parameters (before
    the step): ``grad_norm_ops``, ``op_probs``, ``op_entropy``, ``op_rewards`` (eq. 6)
    and, for joint policies, ``grad_norm_skips``, ``skip_probs``, ``skip_entropy``,
    ``skip_rewards`` (eq. 7); see :mod:`nar_jax.reinforce`.
  """

  @jit
  def update(state: ControllerState, child_variables, images, targets, key, *args):
    if len(args) != policy.num_args:
      raise ValueError(f'this {policy.search} policy takes {policy.num_args} extra '
                       f'argument(s), got {len(args)}')
    keys = jax.random.split(key, images.shape[0])
    samples = jax.vmap(lambda k: policy.sample(state.params, k, *args))(keys)
    accuracy = reward_fn(child_variables, samples.arch, images, targets)
    quality = accuracy
    if cost is not None:
      macs = jax.vmap(cost.macs)(samples.arch)
      quality = reinforce.cost_aware_reward(accuracy, macs, cost.target_macs, cost.weight,
                                              cost.weight_below)
    rewards = quality + entropy_weight * samples.sample_entropy
    baseline, advantages = reinforce.ema_advantages(state.baseline, rewards, baseline_decay)

    def loss_fn(params):
      scored = jax.vmap(lambda arch: policy.score(params, arch, *args))(samples.arch)
      return policy.loss(scored, advantages)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.all(jnp.isfinite(rewards))
    # Not applied unless finite (as a child step); the loop stops the run.
    params, opt_state, baseline = jax.tree.map(
        lambda new, old: jnp.where(finite, new, old), (params, opt_state, baseline),
        (state.params, state.opt_state, state.baseline))
    metrics = {
        'finite': finite,
        'controller_loss': loss,
        'reward': jnp.mean(rewards),
        'valid_acc': jnp.mean(accuracy),
        'baseline': baseline,
        'entropy': jnp.mean(jnp.sum(samples.entropy, axis=1)),
        'grad_norm': grad_norm,
        **policy.diagnostics(state.params, samples.arch, rewards, advantages, *args),
    }
    if cost is not None:
      metrics['macs'] = jnp.mean(macs)
    return ControllerState(params, opt_state, baseline), metrics

  return update
