"""Tests for the building blocks of the ImageNet transfer (paper Table 6): the ImageNet
ResNet-18 stem and its counts, and the imagenet2012 input pipeline (nar_jax.data.imagenet).

Model variables come from ``jax.eval_shape(init)`` (nothing is computed); the data tests
read a tiny fake imagenet2012 written by the real TFDS builder in the real array_record
format (``imagenet_testing.prepare_fake_imagenet``).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import counting, space
from nar_jax.models.resnet import ResNet, select_branches

IMAGENET_HW = (224, 224)
IMAGENET_CLASSES = 1000


def _num_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _init_shapes(model, image_hw, *args):
  images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, *args, train=False), images)


def _refined(sp: space.SearchSpace) -> tuple[int, ...]:
  """An architecture with every kind of candidate: sep3x3, sep5x5, max3x3 and avg3x3 at
  nodes of both strides and of changing channel counts."""
  names = list(sp.names(sp.baseline()))
  for node, op in ((0, 'sep3x3'), (2, 'max3x3'), (3, 'avg3x3'), (4, 'sep5x5'), (8, 'avg3x3'),
                   (sp.num_nodes - 1, 'sep3x3')):
    names[node % sp.num_nodes] = op
  return sp.validate(names)


# ---------------------------------------------------------------------------
# ImageNet ResNet-18: 7x7/2 stem, 3x3/2 max pool, the searched op at each node.


@pytest.mark.parametrize('granularity', ['conv', 'block'])
def test_imagenet_resnet18_reference_counts(granularity):
  """torchvision's ResNet-18 at 224x224, 1000 classes: 11,689,512 parameters (conv
  kernels, BN scale and bias, fc weights and bias) and 1,814,073,344 MACs (convs and fc,
  the project's convention: torchvision's "1.81 GFLOPS"; ptflops' 1.82 GMac adds one op
  per element of every BN, ReLU and pool, 8,104,424 more)."""
  sp = space.resnet_space('resnet18', granularity, stem='imagenet')
  counts = counting.count_architecture(sp, sp.baseline(), IMAGENET_HW, 3, IMAGENET_CLASSES)
  assert counts.params == 11_689_512
  assert counts.macs == 1_814_073_344
  assert round(counts.params / 1e6, 2) == 11.69


def test_imagenet_resnet18_macs_by_hand():
  """The baseline's MACs summed layer by layer: stem at 112x112, stages at 56, 28, 14, 7."""
  macs = 7 * 7 * 3 * 64 * 112 * 112
  cin, side = 64, 56
  for stage, c in enumerate((64, 128, 256, 512)):
    if stage:
      side //= 2
      macs += cin * c * side * side  # the 1x1 projection of the first block
    macs += (9 * cin * c + 3 * 9 * c * c) * side * side  # four 3x3 convs
    cin = c
  macs += 512 * IMAGENET_CLASSES
  sp = space.resnet_space('resnet18', 'conv', stem='imagenet')
  assert counting.count_architecture(sp, sp.baseline(), IMAGENET_HW, 3,
                                     IMAGENET_CLASSES).macs == macs


@pytest.mark.parametrize('granularity', ['conv', 'block'])
def test_imagenet_counts_equal_the_initialised_network(granularity):
  """Counted parameters == the initialised fixed network's, for the baseline and a
  refined architecture; the refined one is smaller in both counts."""
  sp = space.resnet_space('resnet18', granularity, stem='imagenet')
  counted = {}
  for name, arch in (('baseline', sp.baseline()), ('refined', _refined(sp))):
    variables = _init_shapes(ResNet(sp, IMAGENET_CLASSES, arch=arch), IMAGENET_HW)
    counted[name] = counting.count_architecture(sp, arch, IMAGENET_HW, 3, IMAGENET_CLASSES)
    assert _num_params(variables['params']) == counted[name].params, sp.names(arch)
  assert counted['refined'].params < counted['baseline'].params
  assert counted['refined'].macs < counted['baseline'].macs


def test_imagenet_stem_runs_the_first_stage_at_56x56():
  sp = space.resnet_space('resnet18', 'conv', stem='imagenet')
  model = ResNet(sp, IMAGENET_CLASSES, arch=sp.baseline())
  variables = _init_shapes(model, IMAGENET_HW)
  images = jax.ShapeDtypeStruct((2, *IMAGENET_HW, 3), jnp.float32)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False,
                               capture_intermediates=lambda m, _: m.name == 'node00'),
      variables, images)
  assert logits.shape == (2, IMAGENET_CLASSES)
  assert state['intermediates']['node00']['__call__'][0].shape == (2, 56, 56, 64)
  assert sp.stem_layers.out_hw(IMAGENET_HW) == (56, 56)


def test_stems_share_variable_names_and_the_cifar_stem_is_unchanged():
  """Both stems are ``stem_conv`` + ``stem_bn`` (the max pool has no variables): the
  CIFAR network's variables (and so its checkpoints) are what they were, and the two
  trees differ only in the stem kernel's shape."""
  cifar = space.resnet_space('resnet18', 'conv')
  imagenet = space.resnet_space('resnet18', 'conv', stem='imagenet')
  assert cifar == space.resnet_space('resnet18', 'conv', stem='cifar')
  assert cifar.nodes == imagenet.nodes and cifar.name == imagenet.name
  shapes = {}
  for name, sp in (('cifar', cifar), ('imagenet', imagenet)):
    variables = _init_shapes(ResNet(sp, 10, arch=sp.baseline()), (32, 32))
    shapes[name] = {jax.tree_util.keystr(p): v.shape
                    for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  assert shapes['cifar'].keys() == shapes['imagenet'].keys()
  differ = {k for k in shapes['cifar'] if shapes['cifar'][k] != shapes['imagenet'][k]}
  assert differ == {"['params']['stem_conv']['kernel']"}
  assert shapes['cifar']["['params']['stem_conv']['kernel']"] == (3, 3, 3, 64)
  assert shapes['imagenet']["['params']['stem_conv']['kernel']"] == (7, 7, 3, 64)


def test_imagenet_supernet_restricted_to_an_architecture_is_the_fixed_network():
  """The supernet's variables with the unselected branches dropped have the fixed
  network's tree and shapes (the stem lies outside every node)."""
  sp = space.resnet_space('resnet18', 'conv', width=0.25, stem='imagenet')
  arch = _refined(sp)
  supernet = _init_shapes(ResNet(sp, 10), IMAGENET_HW, jnp.asarray(arch))
  fixed = _init_shapes(ResNet(sp, 10, arch=arch), IMAGENET_HW)
  shape = lambda tree: jax.tree_util.tree_map(lambda v: v.shape, tree)
  assert shape(select_branches(supernet, arch)) == shape(fixed)


def test_unknown_stem_is_rejected():
  with pytest.raises(ValueError, match="stem must be one of cifar, imagenet, got 'tiny'"):
    space.resnet_space('resnet18', stem='tiny')

