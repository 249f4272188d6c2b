"""Analytic parameter and MAC counts of any architecture of a search space.

MACs are the multiply-accumulates of convolutions and dense layers, which is how the
paper and ArcFace count "FLOPs"; BatchNorm, activations, pooling and residual additions
cost none. (So ImageNet ResNet-18 at 224x224 has 1,814,073,344 MACs, torchvision's
"1.81 GFLOPS"; counters that also charge those per-element operations, such as
ptflops, print 1.82 GMac.) Parameters are trainable weights (conv kernels,
BatchNorm scale and bias, PReLU slopes, dense weights and bias). Both come from the
operator recipes in :mod:`nar_jax.ops`, the same definitions the modules are built from.

The classifier is counted with ``num_classes`` outputs and vanishes for
``num_classes=0``: a basic-block ResNet's or macro network's dense head (weights and
bias), a face network's margin head (``num_classes x embedding_size`` class weights,
no bias). Face networks (IR, and ``head='face'`` ResNets and macro networks) also
count their "E" output (:func:`count_face_head`).
ArcFace's reference figures (about 43.6M params and 6.31 G MACs for IR-50 at
112x112) exclude the classifier: count them with ``num_classes=0``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from nar_jax import joint, ops
from nar_jax.joint import JointSpace
from nar_jax.space import SearchSpace


def count_prelu(channels: int) -> ops.Counts:
  """A per-channel PReLU: one slope per channel."""
  return ops.Counts(channels, 0)


def count_dense(in_features: int, out_features: int, bias: bool = True) -> ops.Counts:
  """A dense layer ``in_features -> out_features``."""
  weights = in_features * out_features
  return ops.Counts(weights + (out_features if bias else 0), weights)


def count_face_head(hw: tuple[int, int], channels: int, embedding_size: int,
                    num_classes: int) -> ops.Counts:
  """:class:`~nar_jax.models.face_head.FaceHead` on an ``hw`` feature map of ``channels``:
  the "E" output (BN -> Dropout -> flatten -> Dense -> BN with its scale fixed to 1, so
  bias only) and the margin head's ``num_classes x embedding_size`` class weights."""
  features = hw[0] * hw[1] * channels
  return (ops.count_bn(channels) + count_dense(features, embedding_size)
          + ops.Counts(embedding_size, 0) + count_dense(embedding_size, num_classes, bias=False))


def count_architecture(space: SearchSpace, arch: Sequence[int | str], image_hw: tuple[int, int],
                       in_channels: int, num_classes: int,
                       embedding_size: int | None = None) -> ops.Counts:
  """Counts of the fixed network ``arch`` of ``space`` on ``image_hw`` inputs.

  Args:
    space: the search space (skeleton and nodes); family ``'resnet'`` or ``'ir'``.
    arch: one op (name or index) per node; validated.
    image_hw: input height and width.
    in_channels: input image channels.
    num_classes: classifier outputs; 0 leaves the classifier out.
    embedding_size: a basic-block ResNet's face head (``head='face'``) of this many
      embedding features; ``None`` for its softmax head. IR networks always have the
      face head of ``space.embedding_size`` and must leave it ``None``.
  """
  arch = space.validate(arch)
  ir = space.family == 'ir'
  if ir and embedding_size is not None:
    raise ValueError('IR networks embed with space.embedding_size; pass embedding_size=None')
  stem = space.stem_layers
  stem_conv = ops.ConvLayer(stem.kernel, in_channels, space.stem_channels, stem.stride)
  conv_hw = tuple(ops.same_padding(s, stem.kernel, stem.stride)[1] for s in image_hw)
  total = ops.count_conv(stem_conv, conv_hw) + ops.count_bn(space.stem_channels)
  hw = stem.out_hw(image_hw)  # the stem's max pool (if any) costs no MACs
  if ir:
    total += count_prelu(space.stem_channels)
  channels = space.stem_channels
  node_iter = iter(zip(space.nodes, arch))
  for stage in space.stages:
    for bi in range(stage.num_blocks):
      stride = stage.stride if bi == 0 else 1
      if stride != 1 or channels != stage.channels:
        projection = ops.ConvLayer(1, channels, stage.channels, stride)
        out_hw = tuple(ops.same_padding(s, 1, stride)[1] for s in hw)
        total += ops.count_conv(projection, out_hw) + ops.count_bn(stage.channels)
      if ir:  # the unit's leading BN and the PReLU between its two nodes
        total += ops.count_bn(channels) + count_prelu(stage.channels)
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
  if ir:
    embedding_size = space.embedding_size
  if embedding_size is not None:
    return total + count_face_head(hw, channels, embedding_size, num_classes)
  return total + count_dense(channels, num_classes)


def count_joint_architecture(space: JointSpace, arch: Sequence[Any], image_hw: tuple[int, int],
                             in_channels: int, num_classes: int,
                             embedding_size: int | None = None) -> ops.Counts:
  """Counts of the fixed ENAS macro network of joint ``arch`` (:class:`nar_jax.models.macro.MacroNet`).

  Stem conv3x3 + BN; per layer of ``c`` channels a branch ``1x1 conv + BN``, then the
  operator (``c -> c``, stride 1), and for layers after the first the post-skip BN
  (skip additions cost nothing here); at each pool layer one factorized reduction
  (two 1x1 convs to ``c' / 2`` on the stride-2 grid, BN) per output the architecture
  still reads (:func:`nar_jax.joint.needed_reductions`); the dense head, or the face
  head (:func:`count_face_head`) on the last layer's output.

  Args:
    space: the joint space; ``arch``: flat or readable joint architecture (validated).
    image_hw, in_channels, num_classes: as :func:`count_architecture`.
    embedding_size: the face head's embedding features (``head='face'``); ``None``
      for the softmax head.
  """
  _, skips = joint.split(np.asarray(space.validate(arch)), space.num_layers)
  ops_ = [entry['op'] for entry in space.names(arch)]
  needed = joint.needed_reductions(skips, space.pool_layers)
  reductions = joint_reduction_counts(space, image_hw)
  hw = tuple(image_hw)
  channels = space.stage_channels(0)
  total = ops.count_conv(ops.ConvLayer(3, in_channels, channels), hw) + ops.count_bn(channels)
  for j, op in enumerate(ops_):
    last_hw, last_channels = hw, channels  # the head reads the last layer's output
    total += ops.count_conv(ops.ConvLayer(1, channels, channels), hw) + ops.count_bn(channels)
    total += ops.count_op(op, channels, channels, 1, hw)[0]
    if j > 0:
      total += ops.count_bn(channels)
    if j in space.pool_layers:
      k = space.pool_layers.index(j)
      for _ in range(int(np.sum(needed[k]))):
        total += reductions[k]
      hw = tuple(-(-s // 2) for s in hw)
      channels = space.stage_channels(k + 1)
  if embedding_size is not None:
    return total + count_face_head(last_hw, last_channels, embedding_size, num_classes)
  return total + count_dense(last_channels, num_classes)


def joint_reduction_counts(space: JointSpace, image_hw: tuple[int, int]) -> list[ops.Counts]:
  """Counts of one factorized reduction at each pool layer of ``space`` (two 1x1 convs
  to half the next stage's channels on the stride-2 grid, then BN)."""
  hw, channels, counts = tuple(image_hw), space.stage_channels(0), []
  for k, _ in enumerate(space.pool_layers):
    out = space.stage_channels(k + 1)
    hw = tuple(-(-s // 2) for s in hw)
    half = ops.count_conv(ops.ConvLayer(1, channels, out // 2), hw)
    counts.append(half + half + ops.count_bn(out))
    channels = out
  return counts


def macs_model(space: SearchSpace | JointSpace, image_hw: tuple[int, int], in_channels: int,
               num_classes: int, embedding_size: int | None = None) -> Callable[[Any], Any]:
  """A jittable ``arch -> MACs`` (float32 scalar) of the fixed networks of ``space``.

  It equals :func:`count_architecture` (or :func:`count_joint_architecture`) with the
  same arguments for every architecture, and takes a traced ``arch`` (op indices, or
  the flat joint vector), so a controller update can price the architectures it
  samples. A node's operator changes the MACs of that node alone, so the count is
  ``baseline + sum_j table[j, arch_j]`` with ``table[j, k]`` the change of setting node
  ``j`` of the baseline to op ``k``; in the joint space each factorized reduction
  the architecture needs (:func:`nar_jax.joint.needed_reductions`) adds its MACs.
  """
  joint_space = isinstance(space, JointSpace)
  count = count_joint_architecture if joint_space else count_architecture
  macs = lambda arch: count(space, arch, image_hw, in_channels, num_classes, embedding_size).macs
  baseline = np.asarray(space.baseline())
  positions = space.op_positions() if joint_space else np.arange(space.num_nodes)
  mask = space.candidate_mask()
  table = np.zeros(mask.shape, np.float64)
  for j, position in enumerate(positions):
    for k in np.flatnonzero(mask[j]):
      arch = baseline.copy()
      arch[position] = k
      table[j, k] = macs(tuple(arch)) - macs(tuple(baseline))
  base_macs = float(macs(tuple(baseline)))
  if not joint_space:
    return lambda arch: base_macs + jnp.sum(jnp.asarray(table, jnp.float32)[
        jnp.arange(len(positions)), jnp.asarray(arch)])
  reduction_macs = np.array([c.macs for c in joint_reduction_counts(space, image_hw)], np.float64)
  needed_count = lambda arch: joint.needed_reductions(
      joint.split(arch, space.num_layers)[1], space.pool_layers).sum(-1)
  base_macs -= float(np.dot(reduction_macs, needed_count(baseline)))

  def joint_macs(arch):
    arch = jnp.asarray(arch)
    op_macs = jnp.sum(jnp.asarray(table, jnp.float32)[jnp.arange(len(positions)), arch[positions]])
    return base_macs + op_macs + jnp.dot(jnp.asarray(reduction_macs, jnp.float32),
                                         needed_count(arch).astype(jnp.float32))

  return joint_macs
