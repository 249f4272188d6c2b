"""Tests for nar_jax.train: data-parallel child steps, evaluation, controller update.

The networks are a tiny 4-node ResNet search space (two stages of one basic block,
4 and 8 channels, candidates conv3x3 / max3x3) on the synthetic 16x16x3 dataset, so
that XLA:CPU compiles each step in a few seconds. Four fake CPU devices come from
``tests/conftest.py``.

Parameters are initialised with an ``rbg`` key: the jitted ``model.init`` of a
supernet compiles ~4x faster on CPU than with threefry (what the key is does not
matter to any property tested here).
"""

from __future__ import annotations

import os
import types

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import controller, data, ops, policy, train
from nar_jax.config import sgd_config
from nar_jax.data.augment import normalize
from nar_jax.models.nodes import branch_mask, select_branches
from nar_jax.models.resnet import ResNet
from nar_jax.space import Node, SearchSpace, Stage

CANDIDATES = ('conv3x3', 'max3x3')
CONV, MAX = ops.OP_NAMES.index('conv3x3'), ops.OP_NAMES.index('max3x3')
# Node 0: conv in both. Node 1: max -> conv. Node 2: max in both. Node 3: conv -> max.
ARCH_A = (CONV, MAX, MAX, CONV)
ARCH_B = (CONV, CONV, MAX, MAX)
BATCH = 32
DEVICE_COUNTS = (1, 2, 4)
TOL = dict(atol=1e-5, rtol=1e-5)


def tiny_space() -> SearchSpace:
  nodes = (Node('stage1.block0.conv1', 4, 4, 1, 'conv3x3', CANDIDATES),
           Node('stage1.block0.conv2', 4, 4, 1, 'conv3x3', CANDIDATES),
           Node('stage2.block0.conv1', 4, 8, 2, 'conv3x3', CANDIDATES),
           Node('stage2.block0.conv2', 8, 8, 1, 'conv3x3', CANDIDATES))
  return SearchSpace('tiny', 'conv', 4, (Stage(1, 4, 1), Stage(1, 8, 2)), nodes)


def branch_of(path) -> tuple[int, str] | None:
  """``(node, op)`` for a variable inside ``nodeXX/<op>``, else None (shared layer)."""
  keys = [getattr(k, 'key', None) for k in path]
  for a, b in zip(keys, keys[1:]):
    if isinstance(a, str) and a.startswith('node') and b in ops.OP_NAMES:
      return int(a[4:]), b
  return None


def leaves_by_path(tree) -> dict[str, tuple[tuple[int, str] | None, np.ndarray]]:
  return {jax.tree_util.keystr(p): (branch_of(p), np.asarray(v))
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def param_like(opt_state, params) -> list:
  """The sub-trees of an optimizer state shaped like the parameters (momentum traces)."""
  treedef = jax.tree.structure(params)
  is_like = lambda t: jax.tree.structure(t) == treedef
  found = [t for t in jax.tree.leaves(opt_state, is_leaf=is_like) if is_like(t)]
  return found


def step_counters(opt_state) -> list[int]:
  return [int(x) for x in jax.tree.leaves(opt_state)
          if np.ndim(x) == 0 and jnp.issubdtype(np.asarray(x).dtype, jnp.integer)]


def fixed_arch_sampler(key, arch):
  del key
  return arch


@pytest.fixture(scope='module')
def env():
  splits = data.load_splits('synthetic')
  space = tiny_space()
  supernet = ResNet(space, splits.num_classes, bn_axis_name=train.DATA_AXIS)
  # Momentum, Nesterov, weight decay and an SGDR schedule: the real child optimizer.
  tx = train.child_optimizer(
      sgd_config(lr_max=0.1, lr_min=0.01, t0_epochs=1, t_mul=2, weight_decay=1e-2),
      steps_per_epoch=4)
  state = jax.device_get(train.create_train_state(
      jax.random.key(0, impl='rbg'), supernet, splits.image_shape, tx,
      jnp.asarray(space.baseline())))
  return types.SimpleNamespace(
      splits=splits, space=space, supernet=supernet, tx=tx, state=state,
      images=splits.train.images[:BATCH], labels=splits.train.labels[:BATCH],
      key=jax.random.PRNGKey(7))


def fixed_state(env, arch) -> train.TrainState:
  """The fixed network ``arch`` with the supernet's initial weights of that arch."""
  return train.train_state(select_branches(env.state.variables, arch), env.tx)


@pytest.fixture(scope='module')
def dp_results(env):
  """One supernet step and one fixed-network step of ARCH_A on 1, 2 and 4 devices.

  Augmentation (crop and flip) is on. Returns {n: {'super': (state, metrics),
  'fixed': (state, metrics), 'replicated': bool}} on the host, plus the 1-device
  supernet step function under 'super_step_1'.
  """
  fixed_model = ResNet(env.space, env.splits.num_classes, arch=ARCH_A,
                       bn_axis_name=train.DATA_AXIS)
  kw = dict(mean=env.splits.mean, std=env.splits.std, crop_padding=2, flip=True)
  results = {}
  for n in DEVICE_COUNTS:
    mesh = train.make_mesh(n)
    images, labels = train.shard(mesh, env.images), train.shard(mesh, env.labels)
    super_step = train.make_train_step(env.supernet, env.tx, mesh, sample_arch=fixed_arch_sampler,
                                       **kw)
    super_out = super_step(train.replicate(mesh, env.state), images, labels, env.key,
                           jnp.asarray(ARCH_A, jnp.int32))
    fixed_step = train.make_train_step(fixed_model, env.tx, mesh, sample_arch=None, **kw)
    fixed_out = fixed_step(train.replicate(mesh, fixed_state(env, ARCH_A)), images, labels,
                           env.key, None)
    replicated = all(x.sharding.is_fully_replicated
                     for x in jax.tree.leaves((super_out[0], fixed_out[0])))
    results[n] = {'super': jax.device_get(super_out), 'fixed': jax.device_get(fixed_out),
                  'replicated': replicated}
    if n == 1:
      results['super_step_1'] = super_step
  return results


# ---------------------------------------------------------------------------------------
# Data parallelism.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('kind', ['super', 'fixed'])
def test_train_step_is_the_same_on_1_2_4_devices(env, dp_results, kind):
  state1, metrics1 = dp_results[1][kind]
  assert set(metrics1) >= {'loss', 'accuracy'}
  assert np.isfinite(metrics1['loss'])
  assert int(state1.step) == 1
  # The step did something: parameters and BN statistics moved.
  start = env.state if kind == 'super' else fixed_state(env, ARCH_A)
  assert not np.allclose(state1.params['stem_conv']['kernel'], start.params['stem_conv']['kernel'])
  assert not np.allclose(state1.batch_stats['stem_bn']['mean'],
                         start.batch_stats['stem_bn']['mean'])
  if kind == 'super':
    np.testing.assert_array_equal(metrics1['arch'], ARCH_A)
  for n in DEVICE_COUNTS[1:]:
    state_n, metrics_n = dp_results[n][kind]
    chex.assert_trees_all_equal_structs(state_n, state1)
    chex.assert_trees_all_close(metrics_n, metrics1, **TOL)
    chex.assert_trees_all_close(state_n.params, state1.params, **TOL)
    chex.assert_trees_all_close(state_n.batch_stats, state1.batch_stats, **TOL)
    chex.assert_trees_all_close(state_n.opt_state, state1.opt_state, **TOL)
  for n in DEVICE_COUNTS:
    assert dp_results[n]['replicated'], f'state not replicated after a step on {n} devices'


def test_supernet_step_equals_fixed_network_step(env, dp_results):
  """A supernet step with ARCH_A is a step of the fixed ARCH_A network on the same batch."""
  super_state, super_metrics = dp_results[1]['super']
  fixed, fixed_metrics = dp_results[1]['fixed']
  chex.assert_trees_all_close(super_metrics['loss'], fixed_metrics['loss'], **TOL)
  chex.assert_trees_all_close(super_metrics['accuracy'], fixed_metrics['accuracy'], **TOL)
  chex.assert_trees_all_close(select_branches(super_state.params, ARCH_A), fixed.params, **TOL)
  super_trace, = param_like(super_state.opt_state, super_state.params)
  fixed_trace, = param_like(fixed.opt_state, fixed.params)
  chex.assert_trees_all_close(select_branches(super_trace, ARCH_A), fixed_trace, **TOL)


def test_supernet_step_updates_running_statistics_of_selected_branches(env, dp_results):
  """The selected branches' BN running averages move exactly as the fixed network's do."""
  super_state = dp_results[1]['super'][0]
  fixed = dp_results[1]['fixed'][0]
  for node, op in enumerate(ops.OP_NAMES[i] for i in ARCH_A):
    stats = super_state.batch_stats[f'node{node:02d}'][op]['layer0']['bn']
    start = env.state.batch_stats[f'node{node:02d}'][op]['layer0']['bn']
    assert not np.array_equal(stats['mean'], start['mean']), f'node{node:02d}/{op} BN mean'
    assert not np.array_equal(stats['var'], start['var']), f'node{node:02d}/{op} BN var'
  chex.assert_trees_all_close(select_branches(super_state.batch_stats, ARCH_A),
                              fixed.batch_stats, **TOL)


@pytest.mark.parametrize('n', [4])
def test_gradient_is_the_global_batch_gradient(env, n):
  """With plain SGD (lr 1) the update is minus the gradient of the global-batch mean loss,
  as one device computes it without any sharding (BN over the whole batch)."""
  tx = optax.sgd(1.0)
  state = train.train_state(env.state.variables, tx)
  mesh = train.make_mesh(n)
  step = train.make_train_step(env.supernet, tx, mesh, mean=env.splits.mean, std=env.splits.std,
                               crop_padding=0, flip=False, sample_arch=fixed_arch_sampler)
  arch = jnp.asarray(ARCH_A, jnp.int32)
  new_state, metrics = jax.device_get(step(
      train.replicate(mesh, state), train.shard(mesh, env.images), train.shard(mesh, env.labels),
      env.key, arch))
  got_grads = jax.tree.map(lambda old, new: old - new, env.state.params, new_state.params)

  reference = ResNet(env.space, env.splits.num_classes)  # no bn axis: one device, whole batch

  @jax.jit
  def loss_and_grad(params, batch_stats, images, labels):
    def loss_fn(p):
      logits, _ = reference.apply({'params': p, 'batch_stats': batch_stats}, images, arch,
                                  train=True, mutable=['batch_stats'])
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return jax.value_and_grad(loss_fn)(params)

  loss, grads = jax.device_get(loss_and_grad(
      env.state.params, env.state.batch_stats,
      normalize(env.images, env.splits.mean, env.splits.std), env.labels))
  chex.assert_trees_all_close(metrics['loss'], loss, **TOL)
  chex.assert_trees_all_close(got_grads, grads, atol=2e-5, rtol=1e-4)
  # Not vacuous: the shared layers and the selected branches have non-zero gradients.
  assert np.abs(grads['stem_conv']['kernel']).max() > 1e-4
  assert np.abs(grads['node03']['conv3x3']['layer0']['conv0']['kernel']).max() > 1e-4
  # ... and the unselected ones exactly zero.
  assert np.all(grads['node03']['max3x3']['layer0']['bn']['scale'] == 0)


# ---------------------------------------------------------------------------------------
# Evaluation.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('batch_statistics', [False, True])
def test_eval_step_sums_are_the_same_on_1_2_4_devices(env, dp_results, batch_statistics):
  variables = dp_results[1]['super'][0].variables  # trained one step: non-trivial BN averages
  real = 20
  pad = BATCH - real
  padded_images = np.concatenate([env.images[:real], np.zeros_like(env.images[:pad])])
  padded_labels = np.concatenate([env.labels[:real], np.zeros_like(env.labels[:pad])])
  weights = {'full': np.ones(BATCH, np.float32),
             'padded': np.concatenate([np.ones(real, np.float32), np.zeros(pad, np.float32)])}
  batches = {'full': (env.images, env.labels), 'padded': (padded_images, padded_labels)}

  # Reference: one device, no sharding, the whole batch at once.
  reference = ResNet(env.space, env.splits.num_classes)
  ref_logits = jax.jit(lambda v, x, a: train.predict(reference, v, x, a, batch_statistics))
  expected, per_example = {}, {}
  for name, (images, labels) in batches.items():
    logits = np.asarray(ref_logits(variables, normalize(images, env.splits.mean, env.splits.std),
                                   jnp.asarray(ARCH_A)))
    losses = np.asarray(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
    correct = (logits.argmax(-1) == labels).astype(np.float32)
    correct5 = (np.argsort(-logits, -1)[:, :5] == labels[:, None]).any(-1).astype(np.float32)
    per_example[name] = (correct, correct5, losses)
    w = weights[name]
    expected[name] = {'correct': np.sum(correct * w), 'correct5': np.sum(correct5 * w),
                      'loss': np.sum(losses * w), 'count': np.sum(w)}
  assert expected['padded']['count'] == real

  for n in DEVICE_COUNTS:
    mesh = train.make_mesh(n)
    eval_fn = train.make_eval_step(env.supernet, mesh, mean=env.splits.mean, std=env.splits.std,
                                   batch_statistics=batch_statistics)
    for name, (images, labels) in batches.items():
      sums = jax.device_get(eval_fn(variables, train.shard(mesh, images),
                                    train.shard(mesh, labels), train.shard(mesh, weights[name]),
                                    jnp.asarray(ARCH_A)))
      assert set(sums) == {'correct', 'correct5', 'loss', 'count'}
      chex.assert_trees_all_close(sums, expected[name], atol=1e-4, rtol=1e-5)
    # Another architecture reuses the same compiled evaluation.
    eval_fn(variables, train.shard(mesh, env.images), train.shard(mesh, env.labels),
            train.shard(mesh, weights['full']), jnp.asarray(ARCH_B))
    assert eval_fn._cache_size() == 1

  if not batch_statistics:
    # Running averages: the padding does not change the real examples' results, so the
    # padded batch sums to what the first `real` examples of the full batch sum to.
    correct, correct5, losses = per_example['full']
    chex.assert_trees_all_close(
        expected['padded'],
        {'correct': correct[:real].sum(), 'correct5': correct5[:real].sum(),
         'loss': losses[:real].sum(), 'count': real},
        atol=1e-4, rtol=1e-5)


# ---------------------------------------------------------------------------------------
# Unselected branches.
# ---------------------------------------------------------------------------------------


def test_unselected_branches_are_untouched(env, dp_results):
  before, after = env.state, dp_results[1]['super'][0]
  arch_names = [ops.OP_NAMES[i] for i in ARCH_A]
  mask = leaves_by_path(branch_mask(before.params, jnp.asarray(ARCH_A)))
  old_p, new_p = leaves_by_path(before.params), leaves_by_path(after.params)
  old_m, = [leaves_by_path(t) for t in param_like(before.opt_state, before.params)]
  new_m, = [leaves_by_path(t) for t in param_like(after.opt_state, after.params)]
  old_s, new_s = leaves_by_path(before.batch_stats), leaves_by_path(after.batch_stats)

  counted = {'selected': 0, 'unselected': 0, 'shared': 0}
  for path, (branch, old) in old_p.items():
    new = new_p[path][1]
    selected = branch is None or arch_names[branch[0]] == branch[1]
    assert bool(mask[path][1]) == selected, path
    if branch is None:
      counted['shared'] += 1
    else:
      counted['selected' if selected else 'unselected'] += 1
    if selected:
      assert not np.array_equal(new, old), f'{path} was selected but did not change'
      assert np.any(new_m[path][1] != 0), f'{path} was selected but has no momentum'
    else:
      np.testing.assert_array_equal(new, old, err_msg=f'unselected {path} changed')
      np.testing.assert_array_equal(new_m[path][1], old_m[path][1],
                                    err_msg=f'momentum of unselected {path} changed')
  assert counted['unselected'] > 0 and counted['selected'] > 0 and counted['shared'] > 0
  for path, (branch, old) in old_s.items():
    if branch is not None and arch_names[branch[0]] != branch[1]:
      np.testing.assert_array_equal(new_s[path][1], old, err_msg=f'unselected BN {path} moved')
    elif branch is None and path.endswith("['mean']"):
      assert not np.array_equal(new_s[path][1], old), f'BN {path} of a shared layer did not move'


def test_momentum_of_a_branch_is_frozen_while_it_is_unselected(env, dp_results):
  """Step 1 uses ARCH_A, step 2 ARCH_B: node03/conv3x3 has momentum after step 1 and
  weight decay > 0, so an ordinary optimizer step would move it in step 2; it must not."""
  step = dp_results['super_step_1']
  mesh = train.make_mesh(1)
  state1 = dp_results[1]['super'][0]
  state2, metrics2 = jax.device_get(step(
      train.replicate(mesh, state1), train.shard(mesh, env.images), train.shard(mesh, env.labels),
      env.key, jnp.asarray(ARCH_B, jnp.int32)))
  np.testing.assert_array_equal(metrics2['arch'], ARCH_B)
  assert step._cache_size() == 1  # the second architecture did not recompile

  trace0, = param_like(env.state.opt_state, env.state.params)
  trace1, = param_like(state1.opt_state, state1.params)
  trace2, = param_like(state2.opt_state, state2.params)

  frozen = ('node03', 'conv3x3')   # selected in A, unselected in B
  woken = ('node01', 'conv3x3')    # unselected in A, selected in B
  frozen_max = ('node01', 'max3x3')  # selected in A, unselected in B
  get = lambda tree, branch: tree[branch[0]][branch[1]]

  # Without the freeze, step 2 would move node03/conv3x3: weight decay and momentum
  # give it a non-zero update even with a zero gradient.
  zero_grads = jax.tree.map(jnp.zeros_like, state1.params)
  naive, _ = env.tx.update(zero_grads, state1.opt_state, state1.params)
  assert max(np.abs(x).max() for x in jax.tree.leaves(get(naive, frozen))) > 0
  assert max(np.abs(x).max() for x in jax.tree.leaves(get(trace1, frozen))) > 0

  for branch in (frozen, frozen_max):
    chex.assert_trees_all_equal(get(state2.params, branch), get(state1.params, branch))
    chex.assert_trees_all_equal(get(trace2, branch), get(trace1, branch))
    chex.assert_trees_all_equal(get(state2.batch_stats, branch), get(state1.batch_stats, branch))
  # node01/conv3x3 sat out step 1 untouched, then trained in step 2.
  chex.assert_trees_all_equal(get(state1.params, woken), get(env.state.params, woken))
  chex.assert_trees_all_equal(get(trace1, woken), get(trace0, woken))
  kernel = lambda tree: get(tree, woken)['layer0']['conv0']['kernel']
  assert not np.array_equal(kernel(state2.params), kernel(state1.params))
  assert np.any(kernel(trace2) != 0)
  # Shared layers trained in both steps; the schedule counters advanced for everyone.
  assert not np.array_equal(state2.params['head']['kernel'], state1.params['head']['kernel'])
  assert step_counters(state2.opt_state) and all(c == 2 for c in step_counters(state2.opt_state))
  assert int(state2.step) == 2


# ---------------------------------------------------------------------------------------
# Controller update.
# ---------------------------------------------------------------------------------------


NUM_AGGREGATE, VALID_BATCH = 3, 8


_CONTROLLER_UPDATES = {}


def controller_update(env, n, *, entropy_weight=0.0, baseline_decay=0.9):
  """(mesh, jitted update, initial ControllerState); update functions are cached."""
  key = (n, entropy_weight, baseline_decay)
  if key not in _CONTROLLER_UPDATES:
    _CONTROLLER_UPDATES[key] = _build_controller_update(env, n, entropy_weight, baseline_decay)
  return _CONTROLLER_UPDATES[key]


def _build_controller_update(env, n, entropy_weight, baseline_decay):
  cfg = types.SimpleNamespace(lr=0.05, beta1=0.0, eps=1e-3)
  tx = train.controller_optimizer(cfg)
  mesh = train.make_mesh(n)
  update = train.make_controller_update(
      env.supernet, tx, mesh, policy=policy.operator_policy(env.space.candidate_mask(), 1.5),
      mean=env.splits.mean, std=env.splits.std, entropy_weight=entropy_weight,
      baseline_decay=baseline_decay, batch_statistics=True)
  state = train.create_controller_state(jax.random.PRNGKey(3), len(ops.OP_NAMES), 16, 0.1, tx)
  return mesh, update, state


def valid_batches(env):
  valid = env.splits.valid
  images = valid.images[:NUM_AGGREGATE * VALID_BATCH].reshape(
      NUM_AGGREGATE, VALID_BATCH, *valid.images.shape[1:])
  labels = valid.labels[:NUM_AGGREGATE * VALID_BATCH].reshape(NUM_AGGREGATE, VALID_BATCH)
  return images, labels


def test_controller_update_rewards_and_sequential_baseline(env):
  """A child whose logits ignore the input (head kernel 0, bias favours class 0) makes every
  architecture's reward known: the fraction of label-0 examples in its minibatch."""
  decay = 0.9
  mesh, update, state = controller_update(env, 1, baseline_decay=decay)
  params = jax.tree.map(np.array, env.state.params)
  params['head']['kernel'][:] = 0
  params['head']['bias'][:] = 0
  params['head']['bias'][0] = 5.0
  variables = {'params': params, 'batch_stats': env.state.batch_stats}
  images, _ = valid_batches(env)
  zeros_per_batch = (2, 4, 8)
  labels = np.ones((NUM_AGGREGATE, VALID_BATCH), np.int32)
  for m, k in enumerate(zeros_per_batch):
    labels[m, :k] = 0
  rewards = [k / VALID_BATCH for k in zeros_per_batch]

  state = state.replace(baseline=jnp.float32(0.3))
  expected_b = 0.3
  for i in range(2):
    new_state, metrics = jax.device_get(update(
        train.replicate(mesh, state), train.replicate(mesh, variables),
        train.shard(mesh, images, 1), train.shard(mesh, labels, 1), jax.random.PRNGKey(10 + i)))
    for r in rewards:  # ENAS's order: b <- b - (1 - d)(b - R_i), one sample at a time
      expected_b = expected_b - (1 - decay) * (expected_b - r)
    chex.assert_trees_all_close(metrics['baseline'], expected_b, atol=1e-6)
    chex.assert_trees_all_close(new_state.baseline, expected_b, atol=1e-6)
    chex.assert_trees_all_close(metrics['reward'], np.mean(rewards), atol=1e-6)
    chex.assert_trees_all_close(metrics['valid_acc'], np.mean(rewards), atol=1e-6)
    assert set(metrics) >= {'controller_loss', 'reward', 'valid_acc', 'baseline', 'entropy',
                            'grad_norm'}
    chex.assert_tree_all_finite(metrics)
    chex.assert_tree_all_finite(new_state)
    assert metrics['grad_norm'] > 0
    # Two candidates at each of 4 nodes: the entropy is at most 4 log 2.
    assert 0 < metrics['entropy'] <= 4 * np.log(2) + 1e-5
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), new_state.params, state.params)
    assert any(jax.tree.leaves(changed)), 'controller parameters did not change'
    state = new_state


def test_controller_update_is_the_same_on_1_and_2_devices(env, dp_results):
  variables = dp_results[1]['super'][0].variables
  images, labels = valid_batches(env)
  outputs = []
  for n in (1, 2):
    mesh, update, state = controller_update(env, n)
    out = update(train.replicate(mesh, state), train.replicate(mesh, variables),
                 train.shard(mesh, images, 1), train.shard(mesh, labels, 1),
                 jax.random.PRNGKey(5))
    outputs.append(jax.device_get(out))
  (state1, metrics1), (state2, metrics2) = outputs
  chex.assert_tree_all_finite(outputs)
  chex.assert_trees_all_close(metrics2, metrics1, **TOL)
  chex.assert_trees_all_close(state2, state1, **TOL)
  assert 0 < metrics1['valid_acc'] < 1  # real scores, not a degenerate child


# ---------------------------------------------------------------------------------------
# Batch sizes, mesh, schedule.
# ---------------------------------------------------------------------------------------


def test_check_batch_size_names_the_device_count():
  mesh = train.make_mesh(4)
  train.check_batch_size(8, mesh)
  train.check_batch_size(4, mesh)
  for bad in (6, 1, 0, -4):
    with pytest.raises(ValueError, match='device count 4'):
      train.check_batch_size(bad, mesh)
  with pytest.raises(ValueError, match=r'config\.child\.batch_size 10 .*device count 4'):
    train.check_batch_size(10, mesh, 'config.child.batch_size')
  train.check_batch_size(7, train.make_mesh(1))
  with pytest.raises(ValueError, match='device count 2'):
    train.check_batch_size(7, train.make_mesh(2))


def test_make_mesh():
  assert train.make_mesh(0).devices.size == jax.device_count() == 4
  mesh = train.make_mesh(2)
  assert mesh.axis_names == (train.DATA_AXIS,) and mesh.devices.size == 2
  with pytest.raises(ValueError, match='5 devices'):
    train.make_mesh(5)
  x = train.shard(mesh, np.arange(8, dtype=np.float32))
  assert [s.data.shape for s in x.addressable_shards] == [(4,), (4,)]
  y = train.shard(mesh, np.zeros((3, 4)), 1)
  assert [s.data.shape for s in y.addressable_shards] == [(3, 2), (3, 2)]


@pytest.mark.parametrize('first_period,mul', [(20, 2), (15, 3), (25, 1)])
def test_sgdr_schedule_restarts(first_period, mul):
  lr_max, lr_min = 0.1, 1e-3
  schedule = train.sgdr_schedule(lr_max, lr_min, first_period, mul)
  starts, periods, start, period = [], [], 0, first_period
  for _ in range(3):
    starts.append(start)
    periods.append(period)
    start, period = start + period, period * mul
  ends = starts[1:] + [start]
  values = np.asarray(schedule(jnp.arange(ends[-1] + 1)))
  for start, period, end in zip(starts, periods, ends):
    assert values[start] == pytest.approx(lr_max, rel=1e-5)  # restart at T0, T0 + T0*mul, ...
    assert lr_min <= values[end - 1] < lr_min + 0.03 * (lr_max - lr_min)  # annealed to ~lr_min
    assert np.all(np.diff(values[start:end]) < 0)  # strictly decreasing within a period
    t = np.arange(period)
    cosine = lr_min + 0.5 * (lr_max - lr_min) * (1 + np.cos(np.pi * t / period))
    np.testing.assert_allclose(values[start:end], cosine, rtol=1e-4, atol=1e-7)
  assert values[ends[-1]] == pytest.approx(lr_max, rel=1e-5)
  # Scalar and traced steps agree.
  assert float(schedule(ends[0])) == pytest.approx(lr_max, rel=1e-5)
  assert float(jax.jit(schedule)(jnp.int32(ends[1]))) == pytest.approx(lr_max, rel=1e-5)
  with pytest.raises(ValueError, match='positive'):
    train.sgdr_schedule(lr_max, lr_min, 0, mul)


def test_child_optimizer_schedule_counts_epochs():
  """``t0_epochs`` is in epochs: with 4 steps per epoch and t0 = 1.5 epochs the first
  restart is at step 6; lr_max at step 0 (SGD update = -lr * grad)."""
  cfg = sgd_config(lr_max=0.1, lr_min=0.0, t0_epochs=1.5, t_mul=1, weight_decay=0.0,
                   momentum=0.0, nesterov=False)
  tx = train.child_optimizer(cfg, steps_per_epoch=4)
  params = {'w': jnp.ones(())}
  grads = {'w': jnp.ones(())}
  opt_state = tx.init(params)
  lrs = []
  for _ in range(8):
    updates, opt_state = tx.update(grads, opt_state, params)
    lrs.append(-float(updates['w']))
  np.testing.assert_allclose(lrs[0], 0.1, rtol=1e-6)
  np.testing.assert_allclose(lrs[6], 0.1, rtol=1e-6)
  assert lrs[5] < lrs[1] < lrs[0]


def _sgd_lrs(cfg, steps_per_epoch: int, steps: int) -> np.ndarray:
  """The learning rate of each of ``steps`` SGD steps of ``child_optimizer(cfg)`` (no
  momentum or decay in ``cfg``: the update of a unit gradient is ``-lr``)."""
  tx = train.child_optimizer(cfg, steps_per_epoch)
  params, grads = {'w': jnp.ones(())}, {'w': jnp.ones(())}
  opt_state, lrs = tx.init(params), []
  for _ in range(steps):
    updates, opt_state = tx.update(grads, opt_state, params)
    lrs.append(-float(updates['w']))
  return np.asarray(lrs)


def test_warmup_ramps_linearly_then_keeps_the_step_decay_boundaries():
  """ImageNet's recipe at 4 steps per epoch: lr 0.4, 2 warm-up epochs (8 steps: step i at
  0.4 (i + 1) / 8), then 0.4 until the decay at epoch 3 (step 12), x0.1 there and at
  epoch 4 (step 16): the warm-up does not shift the boundaries."""
  cfg = sgd_config(lr_max=0.4, lr_min=0.0, t0_epochs=5, t_mul=1, weight_decay=0.0,
                   momentum=0.0, nesterov=False, schedule='step', decay_epochs='3,4',
                   decay_factor=0.1)
  cfg.warmup_epochs = 2.0
  want = np.concatenate([0.4 * np.arange(1, 9) / 8, [0.4] * 4, [0.04] * 4, [0.004] * 4])
  np.testing.assert_allclose(_sgd_lrs(cfg, 4, 20), want, rtol=1e-5)
  # Without the field (every other config) or at 0: the schedule unchanged.
  del cfg['warmup_epochs']
  plain = _sgd_lrs(cfg, 4, 20)
  np.testing.assert_allclose(plain, np.concatenate([[0.4] * 12, [0.04] * 4, [0.004] * 4]),
                             rtol=1e-5)
  cfg.warmup_epochs = 0.0
  np.testing.assert_allclose(_sgd_lrs(cfg, 4, 20), plain, rtol=0)


def test_warmup_of_a_cosine_schedule_multiplies_it():
  schedule = train.sgdr_schedule(1.0, 0.0, 10, 1)
  warmed = train.linear_warmup(schedule, 4)
  steps = jnp.arange(12)
  np.testing.assert_allclose(np.asarray(jax.vmap(warmed)(steps)),
                             np.asarray(schedule(steps)) * np.minimum(1, (np.arange(12) + 1) / 4),
                             rtol=1e-6)
  assert train.linear_warmup(schedule, 0) is schedule
  with pytest.raises(ValueError, match='warm-up'):
    train.linear_warmup(schedule, -1)


def test_top_k_correct_on_planted_logits():
  """Planted logits over 7 classes: the label's rank decides (ranks 1, 3, 5, 6, 7)."""
  order = np.asarray([[0, 1, 2, 3, 4, 5, 6]] * 5)  # class c has logit -c: rank c + 1
  logits = -order.astype(np.float32)
  labels = np.asarray([0, 2, 4, 5, 6], np.int32)
  np.testing.assert_array_equal(train.top_k_correct(jnp.asarray(logits), labels, 5),
                                [1, 1, 1, 0, 0])
  np.testing.assert_array_equal(train.top_k_correct(jnp.asarray(logits), labels, 1),
                                [1, 0, 0, 0, 0])
  # Permuted classes: the same ranks, other positions.
  perm = np.random.default_rng(0).permutation(7)
  np.testing.assert_array_equal(
      train.top_k_correct(jnp.asarray(logits[:, np.argsort(perm)]), perm[labels].astype(np.int32), 5),
      [1, 1, 1, 0, 0])
  # Fewer classes than k: always correct.
  np.testing.assert_array_equal(train.top_k_correct(jnp.zeros((3, 4)), jnp.arange(3), 5), 1)


def test_eval_step_sums_top5_of_planted_logits():
  """The eval step's ``correct5`` counts the examples whose label is among the 5 largest
  logits of a network that outputs its input (padding weighted 0), on 1 and 2 devices."""

  class Identity(nn.Module):

    @nn.compact
    def __call__(self, x, op_indices=None, train=False):
      del op_indices, train
      return x.reshape(x.shape[0], -1)

  # Row i's label has rank[i] larger logits (0: the argmax); the last two rows are padding.
  rank = np.asarray([0, 1, 4, 5, 9, 0, 0, 2])
  weights = np.asarray([1, 1, 1, 1, 1, 1, 0, 0], np.float32)
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, 8).astype(np.int32)
  flat = np.zeros((8, 10), np.uint8)
  for i in range(8):
    others = rng.permutation([c for c in range(10) if c != labels[i]])
    by_rank = np.insert(others, rank[i], labels[i])  # classes from the largest logit down
    flat[i, by_rank] = 200 - 20 * np.arange(10)
  logits = flat.reshape(8, 1, 1, 10)
  for n in (1, 2):
    mesh = train.make_mesh(n)
    eval_fn = train.make_eval_step(Identity(), mesh, mean=(0.0,) * 10, std=(1 / 255,) * 10)
    sums = jax.device_get(eval_fn({}, train.shard(mesh, logits), train.shard(mesh, labels),
                                  train.shard(mesh, weights), None))
    assert sums['correct5'] == np.sum((rank < 5) * weights)
    assert sums['correct'] == np.sum((rank == 0) * weights)
    assert (sums['correct'], sums['correct5'], sums['count']) == (2, 4, 6)


# ---------------------------------------------------------------------------------------
# One trace, many architectures.
# ---------------------------------------------------------------------------------------


def test_one_compiled_step_serves_many_controller_sampled_architectures(env):
  chex.clear_trace_counter()
  mask = jnp.asarray(env.space.candidate_mask())

  @chex.assert_max_traces(n=1)
  def sample_from_controller(key, params):
    return controller.sample(params, key, mask, 1.5).arch

  ctrl_params = controller.init(jax.random.PRNGKey(1), len(ops.OP_NAMES), 16, 0.1)
  mesh = train.make_mesh(2)
  step = train.make_train_step(env.supernet, env.tx, mesh, mean=env.splits.mean,
                               std=env.splits.std, crop_padding=2, flip=True,
                               sample_arch=sample_from_controller)
  state = train.replicate(mesh, env.state)
  images, labels = train.shard(mesh, env.images), train.shard(mesh, env.labels)
  archs = []
  for i in range(6):
    state, metrics = step(state, images, labels, jax.random.PRNGKey(i), ctrl_params)
    archs.append(tuple(int(a) for a in jax.device_get(metrics['arch'])))
  assert len(set(archs)) >= 3, archs
  for arch in archs:
    env.space.validate(arch)  # only allowed ops are sampled
  assert step._cache_size() == 1
  assert int(state.step) == 6
  chex.assert_tree_all_finite(jax.device_get(state.params))


def test_scan_epoch_computes_the_steps_of_the_step_loop(env):
  """Three steps as one lax.scan == three calls of the step (keys, augmentation, archs)."""
  mask = jnp.asarray(env.space.candidate_mask())
  ctrl_params = controller.init(jax.random.PRNGKey(1), len(ops.OP_NAMES), 16, 0.1)
  mesh = train.make_mesh(2)
  step = train.make_train_step(
      env.supernet, env.tx, mesh, mean=env.splits.mean, std=env.splits.std, crop_padding=2,
      flip=True, sample_arch=lambda key, params: controller.sample(params, key, mask, 1.5).arch)
  images = env.splits.train.images[:3 * 16].reshape(3, 16, *env.images.shape[1:])
  labels = env.splits.train.labels[:3 * 16].reshape(3, 16)
  state = train.replicate(mesh, env.state)
  loop_metrics = []
  for i in range(3):
    state, m = step(state, train.shard(mesh, images[i]), train.shard(mesh, labels[i]), env.key,
                    ctrl_params)
    loop_metrics.append(jax.device_get(m))
  epoch = train.scan_epoch(step)
  assert train.scan_epoch(step) is epoch  # one compiled scan per step function
  scanned, metrics = epoch(train.replicate(mesh, env.state), train.shard(mesh, images, 1),
                           train.shard(mesh, labels, 1), env.key, ctrl_params)
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *loop_metrics)
  assert len({tuple(a) for a in stacked['arch']}) >= 2  # the scan samples a new arch per step
  chex.assert_trees_all_equal(jax.device_get(metrics['arch']), stacked['arch'])
  chex.assert_trees_all_close(jax.device_get(metrics), stacked, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(scanned), jax.device_get(state), atol=1e-5, rtol=1e-5)
  assert int(scanned.step) == 3
  with pytest.raises(ValueError, match='leading'):
    epoch(scanned, train.shard(mesh, images, 1), train.shard(mesh, labels[:2], 1), env.key,
          ctrl_params)


def test_cpu_xla_flags_are_added_once_and_never_override_the_users(monkeypatch):
  monkeypatch.setenv('XLA_FLAGS', '--xla_force_host_platform_device_count=2')
  train.add_cpu_xla_flags()
  train.add_cpu_xla_flags()
  assert os.environ['XLA_FLAGS'].split() == ['--xla_force_host_platform_device_count=2',
                                             *train.CPU_XLA_FLAGS]
  name = train.CPU_XLA_FLAGS[0].split('=')[0]
  monkeypatch.setenv('XLA_FLAGS', f'{name}=true')
  train.add_cpu_xla_flags()
  assert os.environ['XLA_FLAGS'] == f'{name}=true'
  monkeypatch.delenv('XLA_FLAGS')
  train.add_cpu_xla_flags()
  assert os.environ['XLA_FLAGS'].split() == list(train.CPU_XLA_FLAGS)
