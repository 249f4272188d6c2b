"""Refining a network of your own: a small VGG-style network on mnist5k.

Everything the pipeline needs to know about a network is its *family*
(:class:`nar_jax.families.Family`). This file declares one outside the package and runs
the whole pipeline (pretrain, search, derive, retrain, report) on it:

1. **The space**: the network's searchable layers as :class:`nar_jax.space.Node` s, each
   with its original operator and the candidates it may take instead
   (:func:`vgg_space`).
2. **The network**: an ordinary Flax module that calls
   :func:`nar_jax.models.nodes.choice_node` where a searchable layer goes; the same
   module is the supernet (``arch=None``) and every fixed network (:class:`TinyVGG`).
3. **The counts**: parameters and MACs of a fixed network, layer by layer from
   :mod:`nar_jax.ops`' recipes (:func:`count_architecture`); the cost-aware reward and
   the report use them, and a test checks them against the initialised parameters.
4. **The family**, registered under the ``config.model.base`` it answers to
   (``FAMILY``, :func:`nar_jax.families.operator_family`), and a config
   (:func:`get_config`) whose ``model.family_module`` names this file, so every later
   command that reads the workdir's ``config.json`` finds the family again.

Run it from the repository root (README, "Refining your own network"):

  python -m nar_jax.main --config=examples/own_network.py --workdir=runs/own_network

Variant ``smoke``: width 0.25, one search epoch of a few controller updates and one
retraining epoch (the tests run it: a check that the pipeline runs, not an experiment).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from nar_jax import families, ops
from nar_jax.config import base_config
from nar_jax.models import nodes
from nar_jax.space import Node, NodeSpace, candidates_for, scaled

BASE = 'tiny_vgg'
LAYERS = ((16, 1), (32, 2), (32, 1), (64, 2), (64, 1))
"""The network after its stem: ``(channels, stride)`` of each 3x3 conv (a node each)."""
STEM_CHANNELS = 16


def vgg_space(width: float = 1.0, rule: str = 'paper') -> NodeSpace:
  """The five 3x3 convs of :class:`TinyVGG` as searchable nodes (channels times ``width``),
  each with the candidates of ``rule`` (:func:`nar_jax.space.candidates_for`: ``'paper'``,
  no more parameters than the original conv3x3)."""
  in_channels, layer_nodes = scaled(STEM_CHANNELS, width), []
  for i, (channels, stride) in enumerate(LAYERS):
    out_channels = scaled(channels, width)
    candidates = candidates_for('conv3x3', in_channels, out_channels, stride, 'conv', rule)
    layer_nodes.append(Node(f'conv{i + 1}', in_channels, out_channels, stride, 'conv3x3',
                            candidates))
    in_channels = out_channels
  return NodeSpace(f'{BASE}-{len(LAYERS)}', tuple(layer_nodes))


class TinyVGG(nn.Module):
  """Stem conv3x3 + BN + ReLU, five searchable 3x3 layers (each op + BN, then ReLU),
  global average pooling and a dense classifier.

  Attributes:
    space: :func:`vgg_space`; ``num_classes``: classifier outputs.
    arch: ``None`` for the supernet, else the fixed network's op indices.
    dtype, bn_axis_name, choice: as the built-in networks'.
  """

  space: NodeSpace
  num_classes: int
  arch: tuple[int, ...] | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  choice: str = 'switch'

  @nn.compact
  def __call__(self, images: jax.Array, op_indices: jax.Array | None = None, *, train: bool,
               labels: jax.Array | None = None) -> jax.Array:
    """Logits ``(B, num_classes)`` float32 of ``images (B, H, W, C)``; ``labels`` unused
    (every network of the pipeline takes them)."""
    del labels
    nodes.check_call(self.arch, op_indices)
    x = ops.Conv(self.space.nodes[0].in_channels, 3, dtype=self.dtype, name='stem_conv')(images)
    x = nn.relu(ops.batch_norm(train, self.bn_axis_name, self.dtype, name='stem_bn')(x))
    for i in range(self.space.num_nodes):
      x = nn.relu(nodes.choice_node(x, self.space.nodes, i, self.arch, op_indices, train=train,
                                    choice=self.choice, dtype=self.dtype,
                                    bn_axis_name=self.bn_axis_name))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                    name='head')(x).astype(jnp.float32)


def count_architecture(space: NodeSpace, arch: Sequence[int | str], image_hw: tuple[int, int],
                       in_channels: int, num_classes: int) -> ops.Counts:
  """Parameters and MACs of the fixed :class:`TinyVGG` ``arch`` on ``image_hw`` inputs."""
  arch = space.validate(arch)
  stem = space.nodes[0].in_channels
  hw = tuple(image_hw)
  total = ops.count_conv(ops.ConvLayer(3, in_channels, stem), hw) + ops.count_bn(stem)
  for node, op_index in zip(space.nodes, arch):
    counts, hw = ops.count_op(ops.OP_NAMES[op_index], node.in_channels, node.out_channels,
                              node.stride, hw)
    total += counts
  channels = space.nodes[-1].out_channels
  return total + ops.Counts(channels * num_classes + num_classes, channels * num_classes)


FAMILY = families.register(families.operator_family(
    BASE, bases=(BASE,), heads=('softmax',),
    space=lambda config: vgg_space(config.model.width, config.model.candidate_rule),
    network=lambda space, arch, a: TinyVGG(space, a.num_classes, arch, a.dtype,
                                           a.bn_axis_name, a.choice),
    counts=lambda space, arch, a: count_architecture(space, arch, a.image_hw, a.in_channels,
                                                     a.num_classes),
))


def get_config(arg=None):
  """TinyVGG (width 0.5: 8-16-16-32-32 channels) refined on mnist5k with the quickstart's
  recipe (a search near the base network, MACs at most 70% of it)."""
  if arg not in (None, '', 'smoke'):
    raise ValueError(f"unknown variant {arg!r}; use 'smoke' or none")
  c = base_config()
  c.model.base = BASE
  c.model.family_module = os.path.abspath(__file__)
  c.model.width = 0.5
  c.dataset.name = 'mnist5k'
  c.dataset.crop_padding = 2
  c.dataset.flip = False
  c.child.batch_size = 64
  c.pretrain.epochs = 1
  c.search.epochs = 6
  c.search.controller.updates_per_epoch = 10
  c.search.controller.num_aggregate = 10
  c.search.controller.valid_batch_size = 100
  c.search.controller.kind = 'node_aware'
  c.search.controller.lr = 0.02
  c.search.controller.baseline_decay = 0.9
  c.search.controller.original_prob = 0.5
  c.search.cost.target_macs = 0.7
  c.search.cost.weight = -1.0
  c.search.cost.weight_below = 0.0
  c.derive.num_samples = 10
  c.retrain.epochs = 4
  c.retrain.batch_size = 64
  c.retrain.optimizer.lr_max = 0.05
  c.retrain.optimizer.t0_epochs = 4
  c.eval_batch_size = 500
  c.log_every_steps = 20
  if arg == 'smoke':
    c.model.width = 0.25
    c.child.batch_size = c.retrain.batch_size = 128
    c.pretrain.epochs = 0
    c.search.epochs = 1
    c.search.controller.updates_per_epoch = 2
    c.search.controller.num_aggregate = 2
    c.derive.num_samples = 2
    c.retrain.epochs = 1
    c.retrain.optimizer.t0_epochs = 1
  return c
