"""ENAS's macro network over a :class:`~nar_jax.joint.JointSpace`: supernet and fixed network.

Layout (ENAS ``general_child``, see :mod:`nar_jax.joint` for the notation):

* stem: conv3x3 + BatchNorm (no activation, as ENAS), giving ``x_0``;
* layer ``j``: a branch on ``x_j``, then ``+ sum_t S[j, t] x_t`` over the selected
  earlier outputs and, for ``j > 0``, a BatchNorm, giving ``x_{j+1}``;
* after each pool layer, every output so far goes through its own
  :class:`FactorizedReduction` (stride 2);
* global average pool of the last layer's output and a dense head, or with
  ``head='face'`` ArcFace's :class:`~nar_jax.models.face_head.FaceHead` on the last
  layer's output (as :class:`~nar_jax.models.resnet.ResNet`).

Every branch follows ENAS: ``1x1 conv + BN + ReLU`` (``inp_conv``/``inp_bn``), then the
operator (:class:`nar_jax.ops.Operator`: its convs or pool, then BN), then ReLU.
This matches ENAS's conv branches exactly. ENAS's pool branches end with the
pool; here a BN sits between the pool and the final ReLU (``ops.Operator``
always ends with BN), and separable ops are depthwise + pointwise as in ENAS.

One module class serves both networks (as :class:`nar_jax.models.resnet.ResNet`):

* **supernet** (``arch=None``): ``__call__(images, arch_vector, train=...)`` takes the
  flat joint architecture as a traced int32 vector: ops pick a branch with
  :class:`nar_jax.ops.Choice` (``nn.switch``, or ``choice='select'``) and skips are added as ``bit * x_t``, so one trace serves every
  architecture. All factorized reductions run.
* **fixed network** (``arch`` = a flat joint architecture): holds only the chosen op
  of each layer, adds only the selected skips and builds only the reductions the
  architecture needs (:func:`nar_jax.joint.needed_reductions`). Its variables are
  the supernet's restricted by :func:`select_branches`.

Variable names: layer ``j``'s branches live under ``node{j:02d}/<op name>`` (the
naming :func:`nar_jax.models.nodes.branch_mask` reads), its post-skip BatchNorm
is ``layer{j:02d}_bn``, and the reduction of ``x_t`` at the ``k``-th pool layer is
``reduce{k}_from{t:02d}``. Each layer's output is also sown into the
``intermediates`` collection as ``layer{j:02d}`` (a no-op unless it is mutable).
"""

from __future__ import annotations

import re
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nar_jax import joint, margins, ops
from nar_jax.joint import JointSpace
from nar_jax.models import face_head, nodes
from nar_jax.models.heads import head_output

_REDUCTION = re.compile(r'reduce(\d+)_from(\d+)$')


BRANCH_BODY = (ops.ConvBNLayer('inp_conv', 'inp_bn'), ops.RELU, ops.OperatorLayer('op'), ops.RELU)
"""ENAS's branch as an :class:`nar_jax.ops.Branch` body: ``1x1 conv + BN + ReLU``, the
operator (convs or pool, then BN), ReLU."""


def factorized_inputs(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """ENAS's two stride-2 views of ``x (B, H, W, C)``: ``x[:, ::2, ::2]`` and the same grid
  shifted by one pixel down-right (zero past the border); both ``(B, ceil(H/2), ceil(W/2), C)``."""
  shifted = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))[:, 1:, 1:, :]
  return x[:, ::2, ::2, :], shifted[:, ::2, ::2, :]


class FactorizedReduction(nn.Module):
  """Stride-2 reduction without dropping pixels: two 1x1 convs (``channels / 2`` each) on
  the two :func:`factorized_inputs` views, concatenated, then BatchNorm."""

  channels: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    if self.channels % 2:
      raise ValueError(f'factorized reduction needs an even channel count, got {self.channels}')
    a, b = factorized_inputs(x)
    a = ops.Conv(self.channels // 2, 1, dtype=self.dtype, name='path1_conv')(a)
    b = ops.Conv(self.channels // 2, 1, dtype=self.dtype, name='path2_conv')(b)
    return ops.batch_norm(train, self.bn_axis_name, self.dtype, name='bn')(
        jnp.concatenate([a, b], axis=-1))


class MacroNet(nn.Module):
  """ENAS macro network: supernet (``arch=None``) or the fixed network of ``arch``.

  Attributes:
    space: the joint space.
    num_classes: classifier outputs.
    arch: ``None`` for the supernet, else a joint architecture (flat vector or
      readable form; validated).
    dtype: compute dtype (parameters and BN statistics stay float32).
    bn_axis_name: mesh axis for synchronised BatchNorm in training, or ``None``.
    head: ``'softmax'`` (global average pool + Dense ``head``) or ``'face'``
      (:class:`~nar_jax.models.face_head.FaceHead`, as ``ResNet``'s).
    margin, embedding_size, dropout_rate: the face head's (unused by ``'softmax'``).
    choice: the supernet's operator choice, ``'switch'`` or ``'select'``
      (:class:`nar_jax.ops.Choice`).
  """

  space: JointSpace
  num_classes: int
  arch: tuple[int, ...] | None = None
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  head: str = 'softmax'
  margin: margins.Margin = margins.Margin.arcface()
  embedding_size: int = face_head.EMBEDDING_SIZE
  dropout_rate: float = face_head.DROPOUT_RATE
  choice: str = 'switch'

  @nn.compact
  def __call__(self, images: jax.Array, arch: jax.Array | None = None, *,
               train: bool, labels: jax.Array | None = None,
               embed_only: bool = False) -> jax.Array:
    """Logits ``(B, num_classes)`` float32 for ``images (B, H, W, C)``.

    ``arch`` is the flat joint architecture ``(L (L + 1) / 2,)`` int32 for the
    supernet (may be traced) and must be ``None`` for a fixed network. ``labels``
    and ``embed_only`` as :class:`nar_jax.models.resnet.ResNet` (softmax logits
    ignore the labels).
    """
    if (self.arch is None) == (arch is None):
      raise ValueError('pass the architecture to the supernet (arch=None) and only to it')
    sp = self.space
    if self.arch is None:
      op_index, skips = joint.split(jnp.asarray(arch), sp.num_layers)
      needed = None
    else:
      op_index, skips = joint.split(np.asarray(sp.validate(self.arch)), sp.num_layers)
      needed = joint.needed_reductions(skips, sp.pool_layers)
    bn = lambda name: ops.batch_norm(train, self.bn_axis_name, self.dtype, name=name)

    x = ops.Conv(sp.stage_channels(0), 3, dtype=self.dtype, name='stem_conv')(images)
    outputs: list[jax.Array | None] = [bn('stem_bn')(x)]
    for j in range(sp.num_layers):
      channels = sp.stage_channels(sp.stage_of(j))
      if self.arch is None:
        y = ops.Choice(sp.candidates, BRANCH_BODY, channels, self.choice, self.dtype,
                       self.bn_axis_name, name=f'node{j:02d}')(outputs[-1], op_index[j], train)
        for t in range(j):
          y = y + skips[j, t].astype(y.dtype) * outputs[t]
      else:
        y = ops.Choice((ops.OP_NAMES[int(op_index[j])],), BRANCH_BODY, channels,
                       dtype=self.dtype, bn_axis_name=self.bn_axis_name,
                       name=f'node{j:02d}')(outputs[-1], None, train)
        for t in range(j):
          if skips[j, t]:
            y = y + outputs[t]
      if j > 0:
        y = bn(f'layer{j:02d}_bn')(y)
      self.sow('intermediates', f'layer{j:02d}', y)
      outputs.append(y)
      if j in sp.pool_layers:
        k = sp.pool_layers.index(j)
        reduce = lambda t, o: FactorizedReduction(
            sp.stage_channels(k + 1), self.dtype, self.bn_axis_name,
            name=f'reduce{k}_from{t:02d}')(o, train)
        outputs = [reduce(t, o) if needed is None or needed[k, t] else None
                   for t, o in enumerate(outputs)]

    return head_output(self, y, train=train, labels=labels, embed_only=embed_only)

  def embed(self, images: jax.Array, arch: jax.Array | None = None, *,
            train: bool) -> jax.Array:
    """The face embedding ``(B, embedding_size)`` float32 of a ``head='face'`` network.

    Call as ``model.apply(variables, images, [arch], train=False, method='embed')``.
    """
    return self(images, arch, train=train, embed_only=True)


def _reduction_of(path) -> tuple[int, int] | None:
  """``(pool index k, source t)`` if a variable path lies inside a factorized reduction."""
  for p in path:
    match = _REDUCTION.match(str(getattr(p, 'key', '')))
    if match:
      return int(match.group(1)), int(match.group(2))
  return None


def branch_mask(tree: Any, arch: jax.Array, space: JointSpace) -> Any:
  """Bool pytree like ``tree`` (scalar leaves): True where a leaf is used by ``arch``.

  Unselected op branches (via :func:`nar_jax.models.nodes.branch_mask` on the op
  indices) and factorized reductions whose output no layer of ``arch`` reads are
  False; everything else (stem, post-skip BatchNorms, head) is True. ``arch`` is the
  flat joint vector and may be traced.
  """
  op_index, skips = joint.split(jnp.asarray(arch), space.num_layers)
  needed = joint.needed_reductions(skips, space.pool_layers)
  op_mask = nodes.branch_mask(tree, op_index)

  def leaf_mask(path, used):
    found = _reduction_of(path)
    return used if found is None else needed[found]

  return jax.tree_util.tree_map_with_path(leaf_mask, op_mask)


def select_branches(variables: Any, arch: Sequence[Any], space: JointSpace) -> Any:
  """The supernet's variables restricted to ``arch``: the fixed network's variables."""
  op_index, skips = joint.split(np.asarray(space.validate(arch)), space.num_layers)
  needed = joint.needed_reductions(skips, space.pool_layers)
  pruned = nodes.select_branches(variables, tuple(int(o) for o in op_index))

  def prune(tree, path):
    found = _reduction_of(path)
    if found is not None and not needed[found]:
      return None
    if not hasattr(tree, 'items'):
      return tree
    kept = {k: prune(v, path + (jax.tree_util.DictKey(k),)) for k, v in tree.items()}
    return {k: v for k, v in kept.items() if v is not None}

  return prune(pruned, ())
