"""ArcFace's LResNet-E-IR over an ``'ir'`` :class:`~nar_jax.space.SearchSpace`: supernet and fixed net.

Same conventions as :class:`nar_jax.models.resnet.ResNet`: ``arch=None`` is the
supernet (every candidate of every node, :class:`nar_jax.ops.Choice` on a traced op
index: ``nn.switch`` or, with ``choice='select'``, no conditional), an ``arch`` is a
fixed network holding only the chosen ops. Nodes are the same
:class:`~nar_jax.ops.Choice` under ``node{i:02d}/<op name>``, so
:func:`~nar_jax.models.nodes.branch_mask` and
:func:`~nar_jax.models.nodes.select_branches` work unchanged.

The network (insightface's ``fresnet``, ``version_input=1, version_unit=3,
version_output='E'``; README, "Faces: refining LResNet50E-IR with ArcFace"), every
BatchNorm with eps 2e-5:

* "L" input: conv3x3 (stride 1) -> BN -> PReLU;
* IR unit: BN -> node1 (op, BN) -> PReLU -> node2 (op carrying the stride, BN), plus
  the shortcut (identity, or conv1x1 with the stride + BN); no activation after the add;
* "E" output: BN -> Dropout(0.4) -> flatten -> Dense(embedding_size) -> BN with its
  scale fixed to 1 (no scale parameter): the embedding;
* classifier: :class:`~nar_jax.margins.CosineHead` (``head/weight``) and the margin of
  :mod:`nar_jax.margins`.

The output and classifier are :class:`nar_jax.models.face_head.FaceHead`, run in this
module's scope (variables ``output_bn``, ``embedding_dense``, ``embedding_bn``,
``head/weight``).

Dropout draws from the ``'dropout'`` rng stream when ``train=True`` and labels are given:
``model.apply(variables, images, op_indices, train=True, labels=labels,
rngs={'dropout': key}, mutable=['batch_stats'])``. Evaluation (``train=False``) and
``init`` need no dropout rng.

The flatten is NHWC (row, column, channel) order, not MXNet's NCHW: the Dense kernel
of converted MXNet weights would need its rows permuted.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nar_jax import margins, ops
from nar_jax.models import face_head, nodes
from nar_jax.space import SearchSpace

BN_EPSILON = 2e-5
PRELU_INIT = 0.25


class PReLU(nn.Module):
  """Per-channel PReLU (MXNet ``LeakyReLU(act_type='prelu')``): ``x`` if ``x > 0`` else ``a_c * x``.

  Parameter ``negative_slope (C,)``, initialised to 0.25, float32.
  """

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    slope = self.param('negative_slope', nn.initializers.constant(PRELU_INIT), (x.shape[-1],),
                       jnp.float32)
    return jnp.where(x > 0, x, slope.astype(x.dtype) * x)


class IResNet(nn.Module):
  """LResNet-E-IR whose unit convs are search-space nodes, with a margin classifier.

  Attributes:
    space: an ``'ir'`` search space (:func:`nar_jax.space.ir_space`).
    num_classes: identities of the classifier.
    arch: ``None`` for the supernet, else a validated tuple of op indices (fixed net).
    margin: the target-logit margin and scale used when labels are given.
    dropout_rate: dropout before the embedding's Dense layer (0.4 in ArcFace).
    dtype: compute dtype (parameters, BN statistics and the head stay float32).
    bn_axis_name: mesh axis for synchronised BatchNorm in training, or ``None``.
    choice: the supernet's operator choice, ``'switch'`` or ``'select'``
      (:class:`nar_jax.ops.Choice`).
  """

  space: SearchSpace
  num_classes: int
  arch: tuple[int, ...] | None = None
  margin: margins.Margin = margins.Margin.arcface()
  dropout_rate: float = face_head.DROPOUT_RATE
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  choice: str = 'switch'

  @nn.compact
  def __call__(self, images: jax.Array, op_indices: jax.Array | None = None, *, train: bool,
               labels: jax.Array | None = None, embed_only: bool = False) -> jax.Array:
    """Scaled cosine logits ``(B, num_classes)`` for ``images (B, H, W, C)`` (normalised floats).

    Args:
      images: ``(x - 127.5) / 128`` for ArcFace's 112x112 faces.
      op_indices: the architecture ``(num_nodes,)`` int32 for the supernet; ``None``
        for a fixed network.
      train: batch statistics; with ``labels`` also dropout (needs the ``'dropout'`` rng).
      labels: ``(B,)`` int class indices: the margin is applied to each target logit
        (training loss). ``None``: plain ``s * cos(theta)`` logits (accuracy), no dropout.
      embed_only: return the embedding ``(B, embedding_size)`` instead (see :meth:`embed`).
    """
    if self.space.family != 'ir':
      raise ValueError(f'IResNet needs an IR search space; {self.space.name!r} has family '
                       f'{self.space.family!r} (use nar_jax.models.resnet.ResNet)')
    nodes.check_call(self.arch, op_indices)
    arch = None if self.arch is None else self.space.validate(self.arch)
    bn = lambda name: ops.batch_norm(train, self.bn_axis_name, self.dtype, name=name,
                                     epsilon=BN_EPSILON)

    x = ops.Conv(self.space.stem_channels, 3, dtype=self.dtype, name='stem_conv')(images)
    x = PReLU(name='stem_prelu')(bn('stem_bn')(x))

    node_index = iter(range(self.space.num_nodes))

    def run_node(x):
      return nodes.choice_node(x, self.space.nodes, next(node_index), arch, op_indices,
                               train=train, choice=self.choice, dtype=self.dtype,
                               bn_axis_name=self.bn_axis_name, bn_epsilon=BN_EPSILON)

    for si, stage in enumerate(self.space.stages):
      for ui in range(stage.num_blocks):
        prefix = f'stage{si + 1}_unit{ui}'
        stride = stage.stride if ui == 0 else 1
        shortcut = x
        if stride != 1 or x.shape[-1] != stage.channels:
          shortcut = ops.Conv(stage.channels, 1, stride, dtype=self.dtype,
                              name=f'{prefix}_shortcut_conv')(x)
          shortcut = bn(f'{prefix}_shortcut_bn')(shortcut)
        y = run_node(bn(f'{prefix}_bn')(x))
        y = run_node(PReLU(name=f'{prefix}_prelu')(y))
        x = y + shortcut

    head = face_head.FaceHead(self.num_classes, self.space.embedding_size, self.margin,
                              self.dropout_rate, BN_EPSILON, self.dtype, self.bn_axis_name,
                              name='face_head')
    return face_head.face_output(self, head, x, train=train, labels=labels,
                                 embed_only=embed_only)

  def embed(self, images: jax.Array, op_indices: jax.Array | None = None, *,
            train: bool) -> jax.Array:
    """The face embedding ``(B, embedding_size)`` float32 (not L2-normalised).

    Call as ``model.apply(variables, images, [op_indices], train=False, method='embed')``.
    """
    return self(images, op_indices, train=train, embed_only=True)
