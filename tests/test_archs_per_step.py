"""Tests for ``archs_per_step`` (:func:`nar_jax.train.make_train_step`): several
architectures per supernet step, one per group of devices.

The supernet is a tiny 4-node ResNet (conv3x3 / max3x3 candidates, 16x16x3 synthetic
data) on the four fake CPU devices of ``tests/conftest.py``. With ``k = 2`` groups of
two devices, group 0 trains ``ARCH_A`` on the first half of the batch and group 1
``ARCH_B`` on the second half, so that among the branches

* ``node00/conv3x3`` and ``node02/max3x3`` are used by both groups,
* ``node01/max3x3``, ``node03/conv3x3`` by group 0 only, ``node01/conv3x3``,
  ``node03/max3x3`` by group 1 only,
* ``node00/max3x3`` and ``node02/conv3x3`` by none.

The architectures reach the step through :func:`keyed_sampler`, which returns the
``g``-th row of a table for the ``g``-th key split from the step's arch key: the test
fails unless group ``g`` samples from that key.
"""

from __future__ import annotations

import os
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import config as config_lib
from nar_jax import data, ops, pipeline, train
from nar_jax.data.augment import normalize
from nar_jax.models.resnet import ResNet
from nar_jax.space import Node, SearchSpace, Stage

CANDIDATES = ('conv3x3', 'max3x3')
CONV, MAX = ops.OP_NAMES.index('conv3x3'), ops.OP_NAMES.index('max3x3')
ARCH_A = (CONV, MAX, MAX, CONV)
ARCH_B = (CONV, CONV, MAX, MAX)
BATCH = 32
LR, MOMENTUM, WEIGHT_DECAY = 0.1, 0.9, 0.05
TOL = dict(atol=2e-5, rtol=1e-4)
SHARED_BY_BOTH = (('node00', 'conv3x3'), ('node02', 'max3x3'))
GROUP_A_ONLY = (('node01', 'max3x3'), ('node03', 'conv3x3'))
GROUP_B_ONLY = (('node01', 'conv3x3'), ('node03', 'max3x3'))
UNUSED = (('node00', 'max3x3'), ('node02', 'conv3x3'))


def tiny_space() -> SearchSpace:
  nodes = (Node('stage1.block0.conv1', 4, 4, 1, 'conv3x3', CANDIDATES),
           Node('stage1.block0.conv2', 4, 4, 1, 'conv3x3', CANDIDATES),
           Node('stage2.block0.conv1', 4, 8, 2, 'conv3x3', CANDIDATES),
           Node('stage2.block0.conv2', 8, 8, 1, 'conv3x3', CANDIDATES))
  return SearchSpace('tiny', 'conv', 4, (Stage(1, 4, 1), Stage(1, 8, 2)), nodes)


def group_keys(key: jax.Array, step: int, archs_per_step: int) -> jax.Array:
  """The keys the groups sample from at ``step``: the step's arch key (the second of
  the two keys split from ``fold_in(key, step)``) split ``archs_per_step`` ways."""
  _, arch_key = jax.random.split(jax.random.fold_in(key, step))
  return jax.random.split(arch_key, archs_per_step)


def keyed_sampler(key: jax.Array, table: dict) -> jax.Array:
  """``table['archs'][g]`` for ``key == table['keys'][g]`` (``(k, N)`` and ``(k, 2)``);
  row 0 when no key matches."""
  match = jnp.all(table['keys'] == key, axis=-1)
  return table['archs'][jnp.argmax(match)]


def table_for(env, archs) -> dict:
  return {'keys': group_keys(env.key, 0, len(archs)), 'archs': jnp.asarray(archs, jnp.int32)}


def momentum_tx() -> optax.GradientTransformation:
  """L2 weight decay and heavy-ball momentum: an unused branch would move under it."""
  return optax.chain(optax.add_decayed_weights(WEIGHT_DECAY), optax.sgd(LR, momentum=MOMENTUM))


def momentum_trace(opt_state) -> dict:
  """The momentum (a parameter-shaped tree) of a :func:`momentum_tx` state."""
  return opt_state[1][0].trace


@pytest.fixture(scope='module')
def env():
  splits = data.load_splits('synthetic')
  space = tiny_space()
  supernet = ResNet(space, splits.num_classes, bn_axis_name=train.DATA_AXIS)
  tx = momentum_tx()
  state = jax.device_get(train.create_train_state(
      jax.random.key(0, impl='rbg'), supernet, splits.image_shape, tx,
      jnp.asarray(space.baseline())))
  # Non-zero momentum everywhere, so that a frozen trace differs from an updated one.
  rng = np.random.default_rng(0)
  trace = jax.tree.map(lambda p: jnp.asarray(0.01 * rng.standard_normal(p.shape), p.dtype),
                       state.params)
  opt_state = (state.opt_state[0], (state.opt_state[1][0]._replace(trace=trace),
                                    *state.opt_state[1][1:]))
  mesh = train.make_mesh(4)
  kw = dict(mean=splits.mean, std=splits.std, crop_padding=0, flip=False)
  return types.SimpleNamespace(
      splits=splits, space=space, supernet=supernet, tx=tx, mesh=mesh, kw=kw,
      state=state.replace(opt_state=opt_state), key=jax.random.PRNGKey(7),
      images=splits.train.images[:BATCH], labels=splits.train.labels[:BATCH])


@pytest.fixture(scope='module')
def two_groups(env):
  """The ``k = 2`` step, and its result on ``ARCH_A`` (group 0) / ``ARCH_B`` (group 1)."""
  step = train.make_train_step(env.supernet, env.tx, env.mesh, sample_arch=keyed_sampler,
                               archs_per_step=2, **env.kw)
  out = step(train.replicate(env.mesh, env.state), train.shard(env.mesh, env.images),
             train.shard(env.mesh, env.labels), env.key, table_for(env, [ARCH_A, ARCH_B]))
  return step, jax.device_get(out)


@pytest.fixture(scope='module')
def one_arch_step(env):
  """The ``archs_per_step=1`` step of the architecture passed as sampler parameters."""
  return train.make_train_step(env.supernet, env.tx, env.mesh, sample_arch=lambda key, a: a,
                               **env.kw)


def run(env, step, images, labels, sampler_params):
  return jax.device_get(step(train.replicate(env.mesh, env.state), train.shard(env.mesh, images),
                             train.shard(env.mesh, labels), env.key, sampler_params))


@pytest.fixture(scope='module')
def groups_by_hand(env):
  """Each group of the ``k = 2`` step on one device: ``{'A': ..., 'B': ...}``, each
  ``(share, grads, batch_stats)``: its share of the global-batch mean loss (its
  examples' summed cross-entropy over ``BATCH``), the gradient of that share and the
  BN running averages after its forward pass (statistics of its own examples)."""
  reference = ResNet(env.space, env.splits.num_classes)  # no bn axis: the group's batch

  @jax.jit
  def share_and_grad(arch, images, labels):
    def share(p):
      logits, updated = reference.apply({'params': p, 'batch_stats': env.state.batch_stats},
                                        normalize(images, env.splits.mean, env.splits.std),
                                        arch, train=True, mutable=['batch_stats'])
      return (optax.softmax_cross_entropy_with_integer_labels(logits, labels).sum() / BATCH,
              updated['batch_stats'])
    (loss, stats), grads = jax.value_and_grad(share, has_aux=True)(env.state.params)
    return loss, grads, stats

  half = BATCH // 2
  return {name: jax.device_get(share_and_grad(jnp.asarray(arch), env.images[part],
                                              env.labels[part]))
          for name, arch, part in (('A', ARCH_A, slice(0, half)),
                                   ('B', ARCH_B, slice(half, BATCH)))}


# ---------------------------------------------------------------------------------------
# 1. The same architecture in every group is the one-architecture step.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('k', [2, 4])
def test_the_same_architecture_in_every_group_is_the_one_architecture_step(env, two_groups,
                                                                           one_arch_step, k):
  """``k`` groups of ``ARCH_A`` on ``k`` copies of one group's batch (so every group's
  BatchNorm statistics are the global batch's) compute what ``archs_per_step=1`` does."""
  per_group = BATCH // k
  images = np.concatenate([env.images[:per_group]] * k)
  labels = np.concatenate([env.labels[:per_group]] * k)
  expected_state, expected = run(env, one_arch_step, images, labels,
                                 jnp.asarray(ARCH_A, jnp.int32))
  step = two_groups[0] if k == 2 else train.make_train_step(
      env.supernet, env.tx, env.mesh, sample_arch=keyed_sampler, archs_per_step=k, **env.kw)
  state, metrics = run(env, step, images, labels, table_for(env, [ARCH_A] * k))
  np.testing.assert_array_equal(metrics.pop('arch'), [ARCH_A] * k)
  np.testing.assert_array_equal(expected.pop('arch'), ARCH_A)
  chex.assert_trees_all_close(metrics, expected, **TOL)
  chex.assert_trees_all_close(state.params, expected_state.params, **TOL)
  chex.assert_trees_all_close(state.batch_stats, expected_state.batch_stats, **TOL)
  chex.assert_trees_all_close(state.opt_state, expected_state.opt_state, **TOL)
  assert int(state.step) == 1
  # Not vacuous: the step moved the used branches.
  assert not np.allclose(state.params['node03']['conv3x3']['layer0']['conv0']['kernel'],
                         env.state.params['node03']['conv3x3']['layer0']['conv0']['kernel'])


# ---------------------------------------------------------------------------------------
# 2. Different architectures: each branch gets the sum of its groups' gradients.
# ---------------------------------------------------------------------------------------


def test_each_branch_is_updated_with_the_sum_of_its_groups_gradients(env, two_groups,
                                                                     groups_by_hand):
  step, (state, metrics) = two_groups
  np.testing.assert_array_equal(metrics['arch'], [ARCH_A, ARCH_B])
  (loss_a, grads_a, _), (loss_b, grads_b, _) = groups_by_hand['A'], groups_by_hand['B']
  np.testing.assert_allclose(metrics['loss'], loss_a + loss_b, **TOL)
  grads = jax.tree.map(lambda a, b: a + b, grads_a, grads_b)
  # SGD with momentum and weight decay, by hand, on every leaf some group used.
  old_trace = momentum_trace(env.state.opt_state)
  trace = jax.tree.map(lambda m, g, p: MOMENTUM * m + g + WEIGHT_DECAY * p, old_trace, grads,
                       env.state.params)
  params = jax.tree.map(lambda p, m: p - LR * m, env.state.params, trace)
  new_trace = momentum_trace(state.opt_state)
  for node, op in SHARED_BY_BOTH + GROUP_A_ONLY + GROUP_B_ONLY:
    chex.assert_trees_all_close(state.params[node][op], params[node][op], **TOL)
    chex.assert_trees_all_close(new_trace[node][op], trace[node][op], **TOL)
  for name in ('stem_conv', 'stem_bn', 'head'):
    chex.assert_trees_all_close(state.params[name], params[name], **TOL)
  for node, op in SHARED_BY_BOTH:  # not vacuous: both groups' shares are there
    for g in (grads_a, grads_b):
      assert max(np.abs(x).max() for x in jax.tree.leaves(g[node][op])) > 1e-4, (node, op)
  for node, op in UNUSED:
    chex.assert_trees_all_equal(state.params[node][op], env.state.params[node][op])
    chex.assert_trees_all_equal(new_trace[node][op], old_trace[node][op])
  assert step._cache_size() == 1


# ---------------------------------------------------------------------------------------
# 3. BatchNorm running averages.
# ---------------------------------------------------------------------------------------


def test_running_averages_are_the_mean_of_the_groups_that_used_a_branch(env, two_groups,
                                                                         groups_by_hand):
  state = two_groups[1][0]
  stats_a, stats_b = groups_by_hand['A'][2], groups_by_hand['B'][2]
  old = env.state.batch_stats
  mean = lambda a, b: jax.tree.map(lambda x, y: (x + y) / 2, a, b)
  for node, op in SHARED_BY_BOTH:
    assert not np.allclose(stats_a[node][op]['layer0']['bn']['mean'],
                           stats_b[node][op]['layer0']['bn']['mean'])  # two different updates
    chex.assert_trees_all_close(state.batch_stats[node][op], mean(stats_a[node][op],
                                                                  stats_b[node][op]), **TOL)
  chex.assert_trees_all_close(state.batch_stats['stem_bn'], mean(stats_a['stem_bn'],
                                                                 stats_b['stem_bn']), **TOL)
  for node, op in GROUP_A_ONLY:
    chex.assert_trees_all_close(state.batch_stats[node][op], stats_a[node][op], **TOL)
  for node, op in GROUP_B_ONLY:
    chex.assert_trees_all_close(state.batch_stats[node][op], stats_b[node][op], **TOL)
  for node, op in UNUSED:
    chex.assert_trees_all_equal(state.batch_stats[node][op], old[node][op])


# ---------------------------------------------------------------------------------------
# 4. Invalid settings.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('k', [3, 5, 0, -1, 2.0])
def test_archs_per_step_must_divide_the_device_count(env, k):
  with pytest.raises(ValueError, match='divisor of the device count 4'):
    train.make_train_step(env.supernet, env.tx, env.mesh, sample_arch=keyed_sampler,
                          archs_per_step=k, **env.kw)


def test_several_architectures_per_step_need_a_sampler(env):
  with pytest.raises(ValueError, match='needs a supernet and sample_arch'):
    train.make_train_step(env.supernet, env.tx, env.mesh, sample_arch=None, archs_per_step=2,
                          **env.kw)


def test_arch_group_mesh_groups_consecutive_devices(env):
  grid = train.arch_group_mesh(env.mesh, 2)
  assert grid.axis_names == (train.ARCH_AXIS, train.DATA_AXIS)
  assert [[d.id for d in row] for row in grid.devices] == [
      [d.id for d in env.mesh.devices[:2]], [d.id for d in env.mesh.devices[2:]]]


@pytest.mark.parametrize('k,match', [(0, 'positive integer'), (3, 'divisor of the device count 4')])
def test_the_pipeline_rejects_a_bad_archs_per_step_before_it_starts(tmp_path, k, match):
  config = config_lib.base_config()
  config.dataset.name = 'synthetic'
  config.search.archs_per_step = k
  with pytest.raises(ValueError, match=rf'config\.search\.archs_per_step.*{match}'):
    pipeline.setup(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'config.json')
