"""The ``resnet`` family: basic-block ResNets (CIFAR ResNet-18, ResNet-20-wide).

Space :func:`nar_jax.space.resnet_space` (a node per 3x3 conv, or per residual body at
``granularity='block'``), network :class:`nar_jax.models.resnet.ResNet`, NAR's operator
controller (:func:`nar_jax.families.operator_family`).
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from nar_jax import counting, ops
from nar_jax import families
from nar_jax.models.resnet import ResNet
from nar_jax.space import BASE_NETWORKS, SearchSpace, resnet_space


def count_architecture(space: SearchSpace, arch: Sequence[int | str], image_hw: tuple[int, int],
                       in_channels: int, num_classes: int,
                       embedding_size: int | None = None) -> ops.Counts:
  """Parameters and MACs of the fixed ResNet ``arch`` of ``space`` on ``image_hw`` inputs.

  The space's stem (:attr:`nar_jax.space.SearchSpace.stem`: conv + BN, and ImageNet's
  max pool); per block the shortcut projection (1x1 conv + BN, where the
  stride or the channels change) and the nodes' operators (two layers per node at
  block granularity); then the dense head (``num_classes`` outputs, 0 leaves it out)
  or, with ``embedding_size``, the face head (:func:`nar_jax.counting.count_face_head`).
  """
  arch = space.validate(arch)
  stem = space.stem_layers
  conv_hw = tuple(ops.same_padding(s, stem.kernel, stem.stride)[1] for s in image_hw)
  total = (ops.count_conv(ops.ConvLayer(stem.kernel, in_channels, space.stem_channels,
                                        stem.stride), conv_hw)
           + ops.count_bn(space.stem_channels))
  hw = stem.out_hw(image_hw)  # the stem's max pool (if any) costs no MACs
  channels = space.stem_channels
  node_iter = iter(zip(space.nodes, arch))
  block = space.granularity == 'block'
  for stage in space.stages:
    for bi in range(stage.num_blocks):
      stride = stage.stride if bi == 0 else 1
      total += counting.count_projection(channels, stage.channels, stride, hw)
      for _ in range(1 if block else 2):
        node, op_index = next(node_iter)
        op = ops.OP_NAMES[op_index]
        counts, hw_after = ops.count_op(op, node.in_channels, node.out_channels, node.stride, hw)
        total += counts
        if block:
          counts, hw_after = ops.count_op(op, node.out_channels, node.out_channels, 1, hw_after)
          total += counts
        hw = hw_after
      channels = stage.channels
  return total + counting.count_output(hw, channels, num_classes, embedding_size)


def _space(config: ml_collections.ConfigDict) -> SearchSpace:
  m = config.model
  return resnet_space(m.base, m.granularity, m.width, m.candidate_rule,
                      families.restricted_ops(config), stem=m.get('stem', 'cifar'))


def _network(space: SearchSpace, arch, args: families.NetworkArgs) -> ResNet:
  return ResNet(space, args.num_classes, arch=arch, dtype=args.dtype,
                bn_axis_name=args.bn_axis_name, choice=args.choice, head=args.head.kind,
                margin=args.head.margin, embedding_size=args.head.embedding_size)


def _counts(space: SearchSpace, arch, a: families.CountArgs) -> ops.Counts:
  embedding = a.head.embedding_size if a.head.kind == 'face' else None
  return count_architecture(space, arch, a.image_hw, a.in_channels, a.num_classes, embedding)


FAMILY = families.register(families.operator_family(
    'resnet', bases=tuple(BASE_NETWORKS), heads=('softmax', 'face'), space=_space,
    network=_network, counts=_counts))
