"""Analytic parameter and MAC counts: the layers every family's counts are made of.

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
Each family counts its own skeleton from these (:attr:`nar_jax.families.Family.counts`).
ArcFace's reference figures (about 43.6M params and 6.31 G MACs for IR-50 at
112x112) exclude the classifier: count them with ``num_classes=0``.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax.numpy as jnp
import numpy as np

from nar_jax import ops


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


def count_projection(in_channels: int, out_channels: int, stride: int,
                     in_hw: tuple[int, int]) -> ops.Counts:
  """A residual shortcut's projection (1x1 conv at ``stride`` + BN) where the stride or
  the channels change; nothing otherwise."""
  if stride == 1 and in_channels == out_channels:
    return ops.ZERO
  out_hw = tuple(ops.same_padding(s, 1, stride)[1] for s in in_hw)
  return (ops.count_conv(ops.ConvLayer(1, in_channels, out_channels, stride), out_hw)
          + ops.count_bn(out_channels))


def count_output(hw: tuple[int, int], channels: int, num_classes: int,
                 embedding_size: int | None) -> ops.Counts:
  """The output of a network whose last feature map is ``hw x channels``: the dense head
  after global average pooling, or with ``embedding_size`` the face head
  (:func:`count_face_head`)."""
  if embedding_size is not None:
    return count_face_head(hw, channels, embedding_size, num_classes)
  return count_dense(channels, num_classes)


def additive_macs_model(macs: Callable[[tuple[int, ...]], int], baseline: Sequence[int],
                        mask: np.ndarray, positions: Sequence[int] | None = None
                        ) -> Callable[[Any], Any]:
  """A jittable ``arch -> MACs`` (float32 scalar) from an exact count ``macs``.

  Valid where a decision's operator changes the MACs of that decision alone (every
  operator space): the count is ``macs(baseline) + sum_j table[j, arch[positions[j]]]``
  with ``table[j, k]`` the change of setting decision ``j`` of the baseline to op ``k``.

  Args:
    macs: the exact MACs of an architecture (a tuple of ints).
    baseline: the base architecture.
    mask: ``(num_decisions, num_ops)`` bool, the ops each decision may take.
    positions: where decision ``j`` sits in the architecture vector (default ``j``).
  """
  baseline = np.asarray(baseline)
  positions = np.arange(len(mask)) if positions is None else np.asarray(positions)
  base_macs = float(macs(tuple(baseline)))
  table = np.zeros(mask.shape, np.float64)
  for j, position in enumerate(positions):
    for k in np.flatnonzero(mask[j]):
      arch = baseline.copy()
      arch[position] = k
      table[j, k] = macs(tuple(arch)) - base_macs
  table = jnp.asarray(table, jnp.float32)
  rows = jnp.arange(len(positions))
  return lambda arch: base_macs + jnp.sum(table[rows, jnp.asarray(arch)[positions]])
