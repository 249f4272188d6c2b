"""Analytic parameter and MAC counts of any architecture of a search space.

MACs are the multiply-accumulates of convolutions and dense layers, which is how the
paper and ArcFace count "FLOPs". Parameters are trainable weights (conv kernels,
BatchNorm scale and bias, dense weights and bias). Both come from the operator
recipes in :mod:`nar_jax.ops`, the same definitions the modules are built from.
"""

from __future__ import annotations

from typing import Sequence

from nar_jax import ops
from nar_jax.space import SearchSpace


def count_architecture(space: SearchSpace, arch: Sequence[int | str], image_hw: tuple[int, int],
                       in_channels: int, num_classes: int) -> ops.Counts:
  """Counts of the fixed network ``arch`` of ``space`` on ``image_hw`` inputs.

  Args:
    space: the search space (skeleton and nodes).
    arch: one op (name or index) per node; validated.
    image_hw: input height and width.
    in_channels: input image channels.
    num_classes: classifier outputs.
  """
  arch = space.validate(arch)
  hw = tuple(image_hw)
  stem = ops.ConvLayer(3, in_channels, space.stem_channels)
  total = ops.count_conv(stem, hw) + ops.count_bn(space.stem_channels)
  channels = space.stem_channels
  node_iter = iter(zip(space.nodes, arch))
  for stage in space.stages:
    for bi in range(stage.num_blocks):
      stride = stage.stride if bi == 0 else 1
      if stride != 1 or channels != stage.channels:
        projection = ops.ConvLayer(1, channels, stage.channels, stride)
        out_hw = tuple(ops.same_padding(s, 1, stride)[1] for s in hw)
        total += ops.count_conv(projection, out_hw) + ops.count_bn(stage.channels)
      layers = 1 if space.granularity == 'block' else 2
      body_hw = hw
      for layer in range(layers):
        node, op_index = next(node_iter)
        op = ops.OP_NAMES[op_index]
        counts, body_hw = ops.count_op(op, node.in_channels, node.out_channels, node.stride, body_hw)
        total += counts
        if space.granularity == 'block':
          counts, body_hw = ops.count_op(op, node.out_channels, node.out_channels, 1, body_hw)
          total += counts
      hw = body_hw
      channels = stage.channels
  head = ops.Counts(channels * num_classes + num_classes, channels * num_classes)
  return total + head
