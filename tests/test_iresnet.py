"""Tests for nar_jax.models.iresnet: LResNet-E-IR structure, supernet == fixed, one trace, heads.

Variables come from ``jax.eval_shape(init)`` filled with random NumPy values (as in
tests/test_models.py): every BatchNorm statistic and PReLU slope is non-trivial and no
``init`` needs compiling.
"""

import dataclasses
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import controller, margins, ops, space
from nar_jax.models.iresnet import IResNet
from nar_jax.models.nodes import branch_mask, select_branches
from nar_jax.models.resnet import ResNet

from model_testing import random_variables, assert_gradients_follow_mask

NUM_CLASSES = 5
EMBEDDING = 16
IMAGE_SHAPE = (4, 16, 16, 3)
NUM_ARCHS = 3
TOL = dict(atol=1e-4, rtol=1e-4)
LOGIT_TOL = dict(atol=2e-3, rtol=1e-4)  # logits carry the scale s = 64


def _init_shapes(net, images, *op_indices):
  return jax.eval_shape(lambda x, *a: net.init(jax.random.key(0), x, *a, train=False),
                        images, *op_indices)


def _images(seed, shape=IMAGE_SHAPE):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def _apply_all(net, variables, images, labels, dropout_key, *op_indices):
  """(eval logits, eval embedding, train margin logits, train-updated batch_stats)."""
  eval_logits = net.apply(variables, images, *op_indices, train=False)
  embedding = net.apply(variables, images, *op_indices, train=False, method='embed')
  train_logits, updates = net.apply(variables, images, *op_indices, train=True, labels=labels,
                                    rngs={'dropout': dropout_key}, mutable=['batch_stats'])
  return eval_logits, embedding, train_logits, updates['batch_stats']


@dataclasses.dataclass
class Setup:
  space: space.SearchSpace
  net: IResNet
  variables: dict
  images: jax.Array
  labels: jax.Array
  run: callable
  archs: list
  supernet_out: list
  fixed_out: list


@pytest.fixture(scope='module')
def setup() -> Setup:
  """A width-1/16 IR-18 supernet (16 nodes x 4 face candidates) on 16x16 images and, for
  a few random architectures, its outputs and the matching fixed network's outputs."""
  sp = space.ir_space(18, width=0.0625, embedding_size=EMBEDDING)
  net = IResNet(sp, NUM_CLASSES)
  images = _images(0)
  labels = jnp.arange(IMAGE_SHAPE[0]) % NUM_CLASSES
  shapes = _init_shapes(net, images, jnp.asarray(sp.baseline(), jnp.int32))
  variables = random_variables(shapes, seed=1)
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def run(variables, images, op_indices):
    return _apply_all(net, variables, images, labels, jax.random.key(7), op_indices)

  run = jax.jit(run)
  mask = jnp.asarray(sp.candidate_mask())
  keys = jax.random.split(jax.random.key(10), NUM_ARCHS)
  archs = [tuple(int(a) for a in controller.uniform_sample(k, mask)) for k in keys]
  supernet_out, fixed_out = [], []
  for arch in archs:
    supernet_out.append(run(variables, images, jnp.asarray(arch, jnp.int32)))
    fixed = IResNet(sp, NUM_CLASSES, arch=arch)
    fixed_run = jax.jit(lambda v, x, fixed=fixed: _apply_all(fixed, v, x, labels,
                                                             jax.random.key(7)))
    fixed_out.append(fixed_run(select_branches(variables, arch), images))
  return Setup(sp, net, variables, images, labels, run, archs, supernet_out, fixed_out)


# ---------------------------------------------------------------------------
# Supernet == fixed network.


def test_variable_tree(setup):
  """Node branches under node{i:02d}/<op>, unit BN/PReLU/shortcut names, embedding BN
  without a scale, per-channel PReLU, class weights (num_classes, embedding)."""
  params = setup.variables['params']
  for i, node in enumerate(setup.space.nodes):
    assert set(params[f'node{i:02d}']) == set(node.candidates)
  assert 'scale' not in params['embedding_bn'] and 'bias' in params['embedding_bn']
  chex.assert_shape(params['stem_prelu']['negative_slope'], (setup.space.stem_channels,))
  chex.assert_shape(params['stage2_unit0_prelu']['negative_slope'], (8,))
  chex.assert_shape(params['stage2_unit0_bn']['scale'], (4,))  # the unit's input channels
  chex.assert_shape(params['head']['weight'], (NUM_CLASSES, EMBEDDING))
  # Every stage's first unit has a projection shortcut (stride 2); the others do not.
  shortcuts = sorted(k for k in params if k.endswith('_shortcut_conv'))
  assert shortcuts == [f'stage{s}_unit0_shortcut_conv' for s in range(1, 5)]


def test_fixed_variables_are_the_selected_branches(setup):
  for arch in setup.archs:
    fixed = IResNet(setup.space, NUM_CLASSES, arch=arch)
    shapes = _init_shapes(fixed, setup.images)
    chex.assert_trees_all_equal_shapes(select_branches(setup.variables, arch), shapes)


def test_supernet_equals_fixed(setup):
  """Eval logits, embeddings, train-mode margin logits (same dropout key) and updated
  BN statistics agree for every architecture."""
  for arch, sup, fix in zip(setup.archs, setup.supernet_out, setup.fixed_out):
    chex.assert_shape(sup[0], (IMAGE_SHAPE[0], NUM_CLASSES))
    chex.assert_shape(sup[1], (IMAGE_SHAPE[0], EMBEDDING))
    chex.assert_trees_all_close(sup[0], fix[0], **LOGIT_TOL, custom_message=str(arch))
    chex.assert_trees_all_close(sup[1], fix[1], **TOL, custom_message=str(arch))
    chex.assert_trees_all_close(sup[2], fix[2], **LOGIT_TOL, custom_message=str(arch))
    chex.assert_trees_all_close(select_branches(sup[3], arch), fix[3], **TOL,
                                custom_message=str(arch))


def test_architectures_actually_differ(setup):
  embeddings = [sup[1] for sup in setup.supernet_out]
  assert len(set(setup.archs)) == len(setup.archs)
  for i in range(len(embeddings)):
    for j in range(i + 1, len(embeddings)):
      assert not np.allclose(embeddings[i], embeddings[j], atol=1e-3)


def test_train_mode_leaves_unselected_branches_untouched(setup):
  before = setup.variables['batch_stats']
  for arch, sup in zip(setup.archs, setup.supernet_out):
    used = branch_mask(before, jnp.asarray(arch))
    for (path, b), a, u in zip(jax.tree_util.tree_leaves_with_path(before),
                               jax.tree.leaves(sup[3]), jax.tree.leaves(used)):
      if not bool(u):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(sup[3]['embedding_bn']['mean'], before['embedding_bn']['mean'])


def test_one_trace_serves_many_architectures(setup):
  mask = jnp.asarray(setup.space.candidate_mask())
  archs = [controller.uniform_sample(jax.random.key(100 + i), mask) for i in range(3)]
  archs.append(jnp.asarray(setup.space.baseline(), jnp.int32))
  archs.append(jnp.full((setup.space.num_nodes,), ops.OP_NAMES.index('avg3x3'), jnp.int32))
  outputs = [setup.run(setup.variables, setup.images, a) for a in archs]
  for out in outputs:
    chex.assert_tree_all_finite(out)
  assert not np.allclose(outputs[-1][1], outputs[-2][1], atol=1e-3)


# ---------------------------------------------------------------------------
# Heads: logits, margin, embedding, dropout.


def _cosines(embedding, weight):
  emb, weight = np.asarray(embedding, np.float64), np.asarray(weight, np.float64)
  return (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ (
      weight / np.linalg.norm(weight, axis=1, keepdims=True)).T


def test_logits_are_scaled_cosines_of_the_embedding(setup):
  """labels=None: s * cos(embedding, class weight)."""
  eval_logits, embedding = setup.supernet_out[0][:2]
  cos = _cosines(embedding, setup.variables['params']['head']['weight'])
  np.testing.assert_allclose(eval_logits, 64.0 * cos, atol=2e-3, rtol=1e-4)


@pytest.fixture(scope='module')
def tiny():
  """A fixed two-unit IR (stages of 1 + 1 units) with a CosFace margin at s = 30."""
  with pytest.MonkeyPatch.context() as mp:
    mp.setitem(space.IR_UNITS, 2, (1, 1))
    sp = space.ir_space(2, width=0.0625, embedding_size=8)
  net = IResNet(sp, 3, arch=sp.baseline(), margin=margins.Margin.cosface(30.0))
  images = _images(4, (4, 8, 8, 3))
  return net, random_variables(_init_shapes(net, images), seed=5), images


def test_labels_put_the_margin_on_the_target_logit(tiny):
  """With labels only the target logit changes, to s * (cos(theta) - m3) (CosFace here);
  the embedding method returns what the logits are computed from."""
  net, variables, images = tiny
  labels = jnp.asarray([0, 1, 2, 1])

  @jax.jit
  def outputs(variables):
    return (net.apply(variables, images, train=False),
            net.apply(variables, images, train=False, labels=labels),
            net.apply(variables, images, train=False, method='embed'))

  plain, with_labels, embedding = outputs(variables)
  chex.assert_shape(embedding, (4, 8))
  cos = _cosines(embedding, variables['params']['head']['weight'])
  np.testing.assert_allclose(plain, 30.0 * cos, atol=1e-3, rtol=1e-4)
  expected = 30.0 * cos
  expected[np.arange(4), labels] -= 30.0 * 0.35
  np.testing.assert_allclose(with_labels, expected, atol=1e-3, rtol=1e-4)


def test_dropout_needs_the_dropout_rng_and_uses_it(tiny):
  """Training (train=True with labels) draws the dropout mask from the 'dropout' rng: same
  key, same logits; another key, other logits; no rng, an error. A train-mode pass
  without labels (scoring with batch statistics) and eval mode use no dropout."""
  net, variables, images = tiny
  labels = jnp.asarray([0, 1, 2, 1])

  @jax.jit
  def train_logits(key):
    return net.apply(variables, images, train=True, labels=labels, rngs={'dropout': key},
                     mutable=['batch_stats'])[0]

  first, again, other = (train_logits(jax.random.key(k)) for k in (1, 1, 2))
  np.testing.assert_array_equal(first, again)
  assert not np.allclose(first, other, atol=1e-3)
  with pytest.raises(Exception, match='dropout'):
    jax.eval_shape(lambda: net.apply(variables, images, train=True, labels=labels,
                                     mutable=['batch_stats']))

  @jax.jit
  def scoring(key):
    return net.apply(variables, images, train=True, rngs={'dropout': key},
                     mutable=['batch_stats'])[0]

  np.testing.assert_array_equal(scoring(jax.random.key(1)), scoring(jax.random.key(2)))


# ---------------------------------------------------------------------------
# Structure against a hand-written forward pass.


def _bn(x, stats, params, eps, scale=True):
  y = (x - stats['mean']) / jnp.sqrt(stats['var'] + eps)
  return (y * params['scale'] if scale else y) + params['bias']


def _prelu(x, params):
  return jnp.where(x > 0, x, params['negative_slope'] * x)


def _conv(x, kernel, stride):
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride), 'SAME',
                                      dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


def _reference_embedding(v, images, sp, eps):
  """LResNet-E-IR eval forward of the conv3x3 baseline written out from the README
  ("Faces": search space)."""
  p, s = v['params'], v['batch_stats']
  bn = lambda x, name, **kw: _bn(x, s[name], p[name], eps, **kw)
  x = _prelu(bn(_conv(images, p['stem_conv']['kernel'], 1), 'stem_bn'), p['stem_prelu'])
  i = 0
  for si, stage in enumerate(sp.stages):
    for ui in range(stage.num_blocks):
      prefix, stride = f'stage{si + 1}_unit{ui}', 2 if ui == 0 else 1
      nodes = []
      for k in (i, i + 1):
        branch = f'node{k:02d}'
        nodes.append((p[branch]['conv3x3']['layer0'], s[branch]['conv3x3']['layer0']))
      i += 2
      y = bn(x, f'{prefix}_bn')
      y = _bn(_conv(y, nodes[0][0]['conv0']['kernel'], 1), nodes[0][1]['bn'], nodes[0][0]['bn'], eps)
      y = _prelu(y, p[f'{prefix}_prelu'])
      y = _bn(_conv(y, nodes[1][0]['conv0']['kernel'], stride), nodes[1][1]['bn'],
              nodes[1][0]['bn'], eps)
      shortcut = x
      if ui == 0:
        shortcut = bn(_conv(x, p[f'{prefix}_shortcut_conv']['kernel'], stride),
                      f'{prefix}_shortcut_bn')
      x = y + shortcut
  x = bn(x, 'output_bn').reshape(x.shape[0], -1)
  x = x @ p['embedding_dense']['kernel'] + p['embedding_dense']['bias']
  return bn(x, 'embedding_bn', scale=False)


def test_fixed_baseline_equals_hand_written_forward(monkeypatch):
  """A two-stage IR (units 2 + 1: projection and identity shortcuts) in eval mode equals
  the forward pass written out by hand with BN eps 2e-5, and not with eps 1e-5 (the
  variances of three BNs are ~2e-5, where the epsilon matters)."""
  monkeypatch.setitem(space.IR_UNITS, 2, (2, 1))
  sp = space.ir_space(2, width=0.0625, embedding_size=EMBEDDING)
  assert [n.stride for n in sp.nodes] == [1, 2, 1, 1, 1, 2]
  net = IResNet(sp, NUM_CLASSES, arch=sp.baseline())
  images = _images(5, (2, 8, 8, 3))
  variables = random_variables(_init_shapes(net, images), seed=6,
                                small_var=('stem_bn', "['node01']", 'embedding_bn'))
  got = jax.jit(lambda v, x: net.apply(v, x, train=False, method='embed'))(variables, images)
  chex.assert_shape(got, (2, EMBEDDING))
  expected = _reference_embedding(variables, images, sp, 2e-5)
  chex.assert_trees_all_close(got, expected, atol=1e-3, rtol=1e-4)
  wrong_eps = _reference_embedding(variables, images, sp, 1e-5)
  assert not np.allclose(got, wrong_eps, atol=1e-3, rtol=1e-2)


# ---------------------------------------------------------------------------
# Gradients and misuse.


def test_margin_loss_gradients_supernet_equal_fixed(monkeypatch):
  """Train-mode gradients of the ArcFace loss (dropout on, same key) agree between the
  supernet and the fixed net on the selected branches; unselected branches get zero."""
  monkeypatch.setitem(space.IR_UNITS, 2, (1, 1))
  sp = space.ir_space(2, width=0.0625, embedding_size=8)
  images = _images(8, (4, 8, 8, 3))
  labels = jnp.asarray([0, 1, 2, 1])
  net = IResNet(sp, 3)
  variables = random_variables(_init_shapes(net, images, jnp.asarray(sp.baseline())), seed=9)

  def loss(model, params, *op_indices):
    logits, _ = model.apply({'params': params, 'batch_stats': variables['batch_stats']}, images,
                            *op_indices, train=True, labels=labels,
                            rngs={'dropout': jax.random.key(3)}, mutable=['batch_stats'])
    return jnp.mean(-jax.nn.log_softmax(logits)[jnp.arange(4), labels])

  supernet_grad = jax.jit(jax.grad(lambda p, a: loss(net, p, a)))
  names = ('sep3x3', 'max3x3', 'conv3x3', 'avg3x3')
  arch = tuple(ops.OP_NAMES.index(op) for op in names)
  grads = supernet_grad(variables['params'], jnp.asarray(arch, jnp.int32))
  fixed = IResNet(sp, 3, arch=arch)
  fixed_grads = jax.jit(jax.grad(lambda p: loss(fixed, p)))(
      select_branches(variables, arch)['params'])
  chex.assert_trees_all_close(select_branches(grads, arch), fixed_grads, atol=1e-4, rtol=1e-3)
  used = branch_mask(grads, jnp.asarray(arch))
  assert_gradients_follow_mask(grads, used)


def test_misuse_errors(setup):
  arch = setup.archs[0]
  fixed = IResNet(setup.space, NUM_CLASSES, arch=arch)
  with pytest.raises(ValueError, match='pass op_indices to the supernet'):
    fixed.apply(select_branches(setup.variables, arch), setup.images, jnp.asarray(arch),
                train=False)
  with pytest.raises(ValueError, match='pass op_indices to the supernet'):
    setup.net.apply(setup.variables, setup.images, train=False)
  resnet_space = space.resnet_space('resnet18', width=0.0625)
  with pytest.raises(ValueError, match="family 'resnet'.*use nar_jax.models.resnet.ResNet"):
    IResNet(resnet_space, NUM_CLASSES, arch=resnet_space.baseline()).init(
        jax.random.key(0), setup.images, train=False)
  with pytest.raises(ValueError, match="family 'ir'.*IResNet"):
    ResNet(setup.space, NUM_CLASSES, arch=setup.space.baseline()).init(
        jax.random.key(0), setup.images, train=False)
  bad = list(setup.space.baseline())
  bad[3] = ops.OP_NAMES.index('conv5x5')
  with pytest.raises(ValueError, match=r"op 'conv5x5' is not a candidate of node 3 "
                                       r"\(stage1\.unit1\.conv2\)"):
    IResNet(setup.space, NUM_CLASSES, arch=tuple(bad)).init(
        jax.random.key(0), setup.images, train=False)
  assert math.isclose(IResNet(setup.space, NUM_CLASSES).margin.m2, 0.5)
