"""The README's exact parameter and MAC counts, pinned against an independent derivation.

The derivation below is plain arithmetic over the layers of each network as the README
describes it ("Search spaces and operators", "Faces"), written without nar_jax.counting,
nar_jax.families or nar_jax.ops: a bias-free KxK conv has ``K*K*(C_in/groups)*C_out``
weights and as many MACs per output pixel, a BatchNorm has a scale and a bias per channel,
a PReLU a slope per channel, a dense layer weights and a bias (MACs: weights). The counts
must equal the analytic counts exactly (``model_testing.count_architecture``: the family's
count), and the params the initialised Flax model's (by ``jax.eval_shape``, no compute). A
missing shortcut projection or embedding layer changes the derived numbers (tested), so the
pins are tight.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import space
from nar_jax.models.iresnet import IResNet
from nar_jax.models.resnet import ResNet

from model_testing import count_architecture


class Counts(NamedTuple):
  params: int
  macs: int


def _conv(kernel: int, cin: int, cout: int, out_hw: int, groups: int = 1) -> Counts:
  """A bias-free square conv producing an ``out_hw x out_hw`` map."""
  weights = kernel * kernel * (cin // groups) * cout
  return Counts(weights, weights * out_hw * out_hw)


def _bn(channels: int) -> Counts:
  return Counts(2 * channels, 0)


def _prelu(channels: int) -> Counts:
  return Counts(channels, 0)


def _dense(features: int, outputs: int) -> Counts:
  return Counts(features * outputs + outputs, features * outputs)


def _total(layers: list[Counts]) -> Counts:
  return Counts(sum(c.params for c in layers), sum(c.macs for c in layers))


def cifar_resnet18(num_classes: int = 10, shortcuts: bool = True) -> Counts:
  """CIFAR ResNet-18 on 32x32x3: conv3x3/64 + BN stem (no max-pool); [2,2,2,2] basic blocks
  ``conv3x3-BN-ReLU-conv3x3-BN`` of 64-128-256-512 channels, the first block of stages 2-4
  at stride 2, a conv1x1(stride)+BN shortcut where the shape changes; global average
  pool and a dense classifier with bias."""
  hw, cin = 32, 64
  layers = [_conv(3, 3, 64, hw), _bn(64)]
  for channels, first_stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
    for block in range(2):
      stride = first_stride if block == 0 else 1
      out = hw // stride
      layers += [_conv(3, cin, channels, out), _bn(channels),
                 _conv(3, channels, channels, out), _bn(channels)]
      if shortcuts and (stride != 1 or cin != channels):
        layers += [_conv(1, cin, channels, out), _bn(channels)]
      cin, hw = channels, out
  layers.append(_dense(512, num_classes))
  return _total(layers)


def lresnet50e_ir(conv1: str = 'conv3x3', shortcuts: bool = True,
                  embedding: bool = True) -> Counts:
  """LResNet50E-IR on 112x112x3 without the classifier. "L": conv3x3/64 at stride 1, BN,
  PReLU. Stages of [3, 4, 14, 3] IR units of 64-128-256-512 channels, ``BN -> conv1 (in ->
  out, stride 1) -> BN -> PReLU -> conv2 (out -> out, the unit's stride) -> BN``; the first
  unit of every stage has stride 2 and a conv1x1(stride)+BN shortcut. "E": BN -> Dropout ->
  Dense(7*7*512 -> 512) -> BN with its scale fixed (bias only). ``conv1='sep3x3'`` makes
  every conv1 depthwise 3x3 then pointwise 1x1 (the BN after it unchanged)."""
  hw, cin = 112, 64
  layers = [_conv(3, 3, 64, hw), _bn(64), _prelu(64)]
  for units, channels in zip((3, 4, 14, 3), (64, 128, 256, 512)):
    for unit in range(units):
      stride = 2 if unit == 0 else 1
      out = hw // stride
      layers.append(_bn(cin))
      if conv1 == 'conv3x3':
        layers.append(_conv(3, cin, channels, hw))
      else:
        assert conv1 == 'sep3x3', conv1
        layers += [_conv(3, cin, cin, hw, groups=cin), _conv(1, cin, channels, hw)]
      layers += [_bn(channels), _prelu(channels), _conv(3, channels, channels, out),
                 _bn(channels)]
      if shortcuts and unit == 0:
        layers += [_conv(1, cin, channels, out), _bn(channels)]
      cin, hw = channels, out
  if embedding:
    layers += [_bn(512), _dense(hw * hw * 512, 512), Counts(512, 0)]
  return _total(layers)


def _num_params(variables) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(variables['params']))


def _sep_at_every_conv1(sp: space.SearchSpace) -> list[str]:
  return ['sep3x3' if n.name.endswith('.conv1') else n.original for n in sp.nodes]


def test_derivation_gives_the_readme_figures():
  """The derivation alone reproduces the README's rounded figures."""
  resnet = cifar_resnet18()
  assert resnet.params == 11_173_962 and round(resnet.macs / 1e9, 3) == 0.555
  ir = lresnet50e_ir()
  assert ir.params == 43_590_336 and round(ir.macs / 1e9, 3) == 6.309
  sep = lresnet50e_ir('sep3x3')
  assert sep.params == 30_760_896 and round(sep.macs / 1e9, 3) == 3.250


@pytest.mark.parametrize('variant', [
    lambda: cifar_resnet18(shortcuts=False), lambda: lresnet50e_ir(shortcuts=False),
    lambda: lresnet50e_ir(embedding=False)], ids=['resnet18-shortcuts', 'ir50-shortcuts',
                                                  'ir50-embedding'])
def test_pins_are_tight(variant):
  """Leaving out the shortcut projections or the embedding changes both counts."""
  reference = {cifar_resnet18(), lresnet50e_ir()}
  counts = variant()
  assert all(counts.params != r.params and counts.macs != r.macs for r in reference)


def test_cifar_resnet18_counts_exactly():
  sp = space.resnet_space('resnet18', 'conv')
  counts = count_architecture(sp, sp.baseline(), (32, 32), 3, 10)
  assert (counts.params, counts.macs) == cifar_resnet18()
  images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
  model = ResNet(sp, 10, arch=sp.baseline())
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  assert _num_params(variables) == cifar_resnet18().params


@pytest.mark.parametrize('conv1', ['conv3x3', 'sep3x3'])
def test_lresnet50e_ir_counts_exactly(conv1):
  """IR-50 and the sep3x3-at-every-conv1 IR-50: counting's numbers and the initialised
  model's params (its margin head, 7 x 512 class weights, subtracted) equal the derivation."""
  sp = space.ir_space(50)
  arch = sp.names(sp.baseline()) if conv1 == 'conv3x3' else _sep_at_every_conv1(sp)
  expected = lresnet50e_ir(conv1)
  counts = count_architecture(sp, arch, (112, 112), 3, 0)
  assert (counts.params, counts.macs) == expected
  images = jax.ShapeDtypeStruct((1, 112, 112, 3), jnp.float32)
  model = IResNet(sp, 7, arch=sp.validate(arch))
  variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
  assert _num_params(variables) == expected.params + 7 * 512
