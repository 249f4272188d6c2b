"""The ``ir`` family: ArcFace's LResNet-E-IR face networks (IR-18/34/50/100).

Space :func:`nar_jax.space.ir_space` (the two convs of every IR unit are nodes),
network :class:`nar_jax.models.iresnet.IResNet`, always with the face head.
"""

from __future__ import annotations

from typing import Sequence

import ml_collections

from nar_jax import counting, ops
from nar_jax import families
from nar_jax.models.iresnet import IResNet
from nar_jax.space import IR_UNITS, SearchSpace, ir_space


def count_architecture(space: SearchSpace, arch: Sequence[int | str], image_hw: tuple[int, int],
                       in_channels: int, num_classes: int) -> ops.Counts:
  """Parameters and MACs of the fixed IR network ``arch`` of ``space``.

  Stem conv3x3 + BN + PReLU; per unit the leading BN, the two nodes' operators with the
  PReLU between them and the shortcut projection; then the "E" output of
  ``space.embedding_size`` features and the margin head's ``num_classes`` class weights
  (:func:`nar_jax.counting.count_face_head`; 0 leaves them out, ArcFace's convention).
  """
  arch = space.validate(arch)
  hw = tuple(image_hw)
  total = (ops.count_conv(ops.ConvLayer(3, in_channels, space.stem_channels), hw)
           + ops.count_bn(space.stem_channels) + counting.count_prelu(space.stem_channels))
  channels = space.stem_channels
  node_iter = iter(zip(space.nodes, arch))
  for stage in space.stages:
    for ui in range(stage.num_blocks):
      stride = stage.stride if ui == 0 else 1
      total += counting.count_projection(channels, stage.channels, stride, hw)
      total += ops.count_bn(channels) + counting.count_prelu(stage.channels)
      for _ in range(2):
        node, op_index = next(node_iter)
        counts, hw = ops.count_op(ops.OP_NAMES[op_index], node.in_channels, node.out_channels,
                                  node.stride, hw)
        total += counts
      channels = stage.channels
  return total + counting.count_output(hw, channels, num_classes, space.embedding_size)


def _space(config: ml_collections.ConfigDict) -> SearchSpace:
  m = config.model
  allowed = families.restricted_ops(config)
  return ir_space(int(m.base[2:]), m.width, m.candidate_rule,
                  **({'allowed': allowed} if allowed else {}), embedding_size=m.embedding_size)


def _network(space: SearchSpace, arch, args: families.NetworkArgs) -> IResNet:
  return IResNet(space, args.num_classes, arch=arch, margin=args.head.margin, dtype=args.dtype,
                 bn_axis_name=args.bn_axis_name, choice=args.choice)


def _counts(space: SearchSpace, arch, a: families.CountArgs) -> ops.Counts:
  return count_architecture(space, arch, a.image_hw, a.in_channels, a.num_classes)


FAMILY = families.register(families.operator_family(
    'ir', bases=tuple(f'ir{depth}' for depth in IR_UNITS), heads=('face',), space=_space,
    network=_network, counts=_counts))
