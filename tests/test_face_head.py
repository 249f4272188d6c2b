"""Tests for the face head (nar_jax.models.face_head) on ResNet and the ENAS macro network.

With ``head='face'`` a softmax-family network ends in ArcFace's "E" output and margin
head, exactly as the IR networks (tests/test_iresnet.py covers those). Checked here:
the head's variables sit where an IR network's do; supernet == fixed network (eval
logits, training logits with the margin and dropout, embeddings); the margin is
applied to the target logit only; analytic counts == initialised parameters; clear
errors. Variables come from ``jax.eval_shape(init)`` filled with random values.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import config as config_lib
from nar_jax import joint, margins, space, tasks
from nar_jax.models import macro, nodes
from nar_jax.models.face_head import FaceHead
from nar_jax.models.macro import MacroNet
from nar_jax.models.resnet import ResNet

from model_testing import random_variables
import model_testing

NUM_CLASSES = 5
EMBEDDING = 16
IMAGES = (4, 8, 8, 3)
TOL = dict(atol=1e-4, rtol=1e-4)
OPS = ('conv3x3', 'sep3x3', 'max3x3')  # a cheap supernet: three candidates per node


def _resnet_space():
  return space.resnet_space('resnet20_wide', 'block', width=0.0625, rule='all', allowed=OPS)


def _macro_space():
  return joint.joint_space(4, 8, candidates=OPS)


def _net(kind, sp, arch=None, **kwargs):
  cls = ResNet if kind == 'resnet' else MacroNet
  return cls(sp, NUM_CLASSES, arch=arch, head='face', embedding_size=EMBEDDING, **kwargs)


def _select(kind, variables, arch, sp):
  if kind == 'resnet':
    return nodes.select_branches(variables, arch)
  return macro.select_branches(variables, arch, sp)


def _archs(kind, sp):
  """The baseline and one architecture that differs from it (ops, and skips for macro)."""
  base = sp.baseline()
  if kind == 'resnet':
    return [base, tuple(sp.validate(['sep3x3' if i % 2 else 'max3x3' for i in range(len(base))]))]
  readable = [{'op': 'sep3x3', 'skips': []}, {'op': 'max3x3', 'skips': ['stem']},
              {'op': 'conv3x3', 'skips': ['layer0']}, {'op': 'sep3x3', 'skips': ['stem', 'layer1']}]
  return [base, tuple(int(a) for a in sp.validate(readable))]


def _outputs(net, variables, images, labels, key, *arch):
  """(eval logits, eval logits with the margin, train logits with margin + dropout,
  updated batch_stats, embeddings) of one network."""
  plain = net.apply(variables, images, *arch, train=False)
  margin = net.apply(variables, images, *arch, train=False, labels=labels)
  trained, updates = net.apply(variables, images, *arch, train=True, labels=labels,
                               rngs={'dropout': key}, mutable=['batch_stats'])
  embedding = net.apply(variables, images, *arch, train=False, method='embed')
  return plain, margin, trained, updates['batch_stats'], embedding


@pytest.fixture(scope='module', params=['resnet', 'macro'])
def setup(request):
  kind = request.param
  sp = _resnet_space() if kind == 'resnet' else _macro_space()
  net = _net(kind, sp)
  images = jnp.asarray(np.random.default_rng(0).standard_normal(IMAGES), jnp.float32)
  labels = jnp.asarray([0, 3, 1, 4], jnp.int32)
  base = jnp.asarray(sp.baseline(), jnp.int32)
  shapes = jax.eval_shape(lambda x, a: net.init(jax.random.key(0), x, a, train=False),
                          images, base)
  variables = random_variables(shapes, seed=1)
  return kind, sp, net, variables, images, labels


def test_face_head_variables_sit_where_an_ir_network_has_them(setup):
  _, _, _, variables, _, _ = setup
  params, stats = variables['params'], variables['batch_stats']
  assert set(params['output_bn']) == {'scale', 'bias'}
  assert set(params['embedding_bn']) == {'bias'}  # scale fixed to 1
  # The last feature map of 8x8 images is 2x2 in both networks; flattened.
  features = 2 * 2 * params['output_bn']['scale'].shape[0]
  chex.assert_shape(params['embedding_dense']['kernel'], (features, EMBEDDING))
  chex.assert_shape(params['head']['weight'], (NUM_CLASSES, EMBEDDING))
  assert set(params['head']) == {'weight'}
  assert {'output_bn', 'embedding_bn'} <= set(stats)


def test_supernet_equals_fixed_with_the_face_head(setup):
  kind, sp, net, variables, images, labels = setup
  key = jax.random.key(7)
  run = jax.jit(lambda v, x, y, k, a: _outputs(net, v, x, y, k, a))
  results = []
  for arch in _archs(kind, sp):
    supernet = list(run(variables, images, labels, key, jnp.asarray(arch, jnp.int32)))
    # The supernet's updated statistics, restricted to the fixed network's branches.
    supernet[3] = _select(kind, {'batch_stats': supernet[3]}, arch, sp)['batch_stats']
    fixed_net = _net(kind, sp, arch=arch)
    fixed = jax.jit(lambda v, x, y, k: _outputs(fixed_net, v, x, y, k))(
        _select(kind, variables, arch, sp), images, labels, key)
    chex.assert_trees_all_close(tuple(supernet), fixed, **TOL)
    plain, _, trained, _, embedding = supernet
    chex.assert_shape([plain, trained], [(IMAGES[0], NUM_CLASSES)] * 2)
    chex.assert_shape(embedding, (IMAGES[0], EMBEDDING))
    assert embedding.dtype == jnp.float32
    results.append(plain)
  assert not np.allclose(results[0], results[1], atol=1e-3)  # the architectures differ


def test_margin_lowers_only_the_target_logit(setup):
  _, sp, net, variables, images, labels = setup
  base = jnp.asarray(sp.baseline(), jnp.int32)
  plain, margin = jax.jit(lambda v: (net.apply(v, images, base, train=False),
                                     net.apply(v, images, base, train=False, labels=labels)))(
                                         variables)
  arcface = margins.Margin.arcface()
  np.testing.assert_array_less(np.abs(plain), arcface.scale + 1e-3)  # s * cos
  target = np.arange(NUM_CLASSES) == np.asarray(labels)[:, None]
  expected = np.where(target, arcface.scale * margins.target_cosine(plain / arcface.scale, arcface),
                      plain)
  chex.assert_trees_all_close(margin, jnp.asarray(expected, jnp.float32), **TOL)


def test_dropout_only_in_training_with_labels(setup):
  _, sp, net, variables, images, labels = setup
  base = jnp.asarray(sp.baseline(), jnp.int32)
  def run(labels):
    apply = lambda key: net.apply(variables, images, base, train=True, labels=labels,
                                  rngs={'dropout': key}, mutable=['batch_stats'])[0]
    return jax.jit(jax.vmap(apply))(jax.random.split(jax.random.key(0)))

  with_labels, without = run(labels), run(None)
  assert not np.allclose(with_labels[0], with_labels[1])
  chex.assert_trees_all_close(without[0], without[1])


def _param_count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize('kind', ['resnet', 'macro'])
@pytest.mark.parametrize('hw', [(8, 8), (12, 10)])
def test_counts_match_initialised_face_networks(kind, hw):
  sp = _resnet_space() if kind == 'resnet' else _macro_space()
  images = jnp.zeros((2, *hw, 3), jnp.float32)
  count = model_testing.count_architecture if kind == 'resnet' else model_testing.count_architecture
  for arch in _archs(kind, sp):
    shapes = jax.eval_shape(
        lambda x, arch=arch: _net(kind, sp, arch=arch).init(jax.random.key(0), x, train=False),
        images)
    params = shapes['params']
    counts = count(sp, arch, hw, 3, NUM_CLASSES, EMBEDDING)
    assert counts.params == _param_count(params)
    # Without the classifier (num_classes=0, how the pipeline counts face networks).
    without = count(sp, arch, hw, 3, 0, EMBEDDING)
    assert without.params == _param_count(params) - NUM_CLASSES * EMBEDDING
    assert counts.macs - without.macs == NUM_CLASSES * EMBEDDING
    # The face head replaces the softmax head (Dense channels -> classes, with bias):
    # output BN (scale, bias), Dense features -> embedding (+ bias), embedding BN bias,
    # class weights.
    softmax = count(sp, arch, hw, 3, NUM_CLASSES)
    features = params['embedding_dense']['kernel'].shape[0]
    channels = params['output_bn']['scale'].shape[0]
    assert (counts.params - softmax.params ==
            2 * channels + features * EMBEDDING + 2 * EMBEDDING + NUM_CLASSES * EMBEDDING
            - (channels * NUM_CLASSES + NUM_CLASSES))


def test_face_head_errors():
  sp = _resnet_space()
  images = jnp.zeros(IMAGES, jnp.float32)
  with pytest.raises(ValueError, match='head must be one of'):
    jax.eval_shape(lambda x: ResNet(sp, NUM_CLASSES, arch=sp.baseline(), head='arcface').init(
        jax.random.key(0), x, train=False), images)
  softmax = MacroNet(_macro_space(), NUM_CLASSES, arch=_macro_space().baseline())
  with pytest.raises(ValueError, match="only head='face' networks have an embedding"):
    jax.eval_shape(lambda x: softmax.init(jax.random.key(0), x, train=False, method='embed'),
                   images)
  with pytest.raises(ValueError, match='embedding size must be positive'):
    jax.eval_shape(lambda x: FaceHead(NUM_CLASSES, 0).init(jax.random.key(0), x, train=False),
                   images)


def test_config_face_head_needs_a_face_dataset():
  c = config_lib.base_config()
  assert tasks.task_for(c).name == 'classification'
  c.model.head = 'face'
  with pytest.raises(ValueError, match="model.head='face' trains face networks"):
    config_lib.validate(c)
  c.dataset.name = 'synthetic_faces'
  config_lib.validate(c)
  assert tasks.task_for(c).name == 'faces'
  c.model.embedding_size = 0
  with pytest.raises(ValueError, match='config.model.embedding_size must be positive'):
    config_lib.validate(c)
  c.model.embedding_size, c.model.head = 512, 'arcface'
  with pytest.raises(ValueError, match="config.model.head must be 'softmax' or 'face'"):
    config_lib.validate(c)
  c.model.head, c.model.base = 'softmax', 'ir18'
  assert tasks.task_for(c).name == 'faces'  # IR bases always have the face head
