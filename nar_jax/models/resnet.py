"""Basic-block ResNets over a :class:`~nar_jax.space.SearchSpace`: supernet and fixed network.

One module class serves both. A node's variables live under ``node{i:02d}/<op name>``
(:mod:`nar_jax.models.nodes`):

* the **supernet** (``arch=None``) holds every candidate of every node and picks a
  node's branch with ``nn.switch`` on a *traced* op index, so one compiled step
  serves every architecture;
* the **fixed network** (``arch`` = a tuple of op indices) holds only the chosen op of
  each node and calls it directly (no switch). Its variable tree is the supernet's
  with the unselected branches dropped (:func:`nar_jax.models.nodes.select_branches`), which is how
  ``supernet(arch) == fixed(arch)`` is checked.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nar_jax import margins, ops
from nar_jax.models import face_head, nodes
from nar_jax.models.heads import head_output
from nar_jax.space import SearchSpace

class ResNet(nn.Module):
  """Basic-block ResNet whose 3x3 layers are search-space nodes.

  The stem is the space's (:attr:`SearchSpace.stem`): CIFAR's 3x3 conv, or ImageNet's 7x7
  conv at stride 2 and 3x3 max pool at stride 2; either way its variables are
  ``stem_conv`` and ``stem_bn``.

  Attributes:
    space: the search space (skeleton and nodes).
    num_classes: classifier outputs.
    arch: ``None`` for the supernet, else a validated tuple of op indices (fixed net).
    dtype: compute dtype (parameters and BN statistics stay float32).
    bn_axis_name: mesh axis for synchronised BatchNorm in training, or ``None``.
    head: ``'softmax'`` (global average pool + Dense ``head``) or ``'face'``
      (:class:`~nar_jax.models.face_head.FaceHead` on the last feature map: embedding,
      cosine head and margin, variables as an IR network's; BN eps 1e-5).
    margin, embedding_size, dropout_rate: the face head's (unused by ``'softmax'``).
    choice: the supernet's operator choice, ``'switch'`` or ``'select'``
      (:class:`nar_jax.ops.Choice`; the fixed network has none).
  """

  space: SearchSpace
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
  def __call__(self, images: jax.Array, op_indices: jax.Array | None = None, *,
               train: bool, labels: jax.Array | None = None,
               embed_only: bool = False) -> jax.Array:
    """Logits ``(B, num_classes)`` float32 for ``images (B, H, W, C)`` (normalised floats).

    ``op_indices`` is the architecture ``(num_nodes,)`` int32 for the supernet and
    must be ``None`` for a fixed network. ``labels (B,)``: the face head's margin
    and dropout (training loss); softmax logits do not depend on them (every model
    of the project has one signature). ``embed_only``: the face head's embedding
    ``(B, embedding_size)`` instead (see :meth:`embed`).
    """
    if self.space.family != 'resnet':
      raise ValueError(f'ResNet needs a basic-block search space; {self.space.name!r} has family '
                       f'{self.space.family!r} (use nar_jax.models.iresnet.IResNet for IR spaces)')
    nodes.check_call(self.arch, op_indices)
    arch = None if self.arch is None else self.space.validate(self.arch)
    bn = lambda name: ops.batch_norm(train, self.bn_axis_name, self.dtype, name=name)
    stem = self.space.stem_layers
    x = ops.Conv(self.space.stem_channels, stem.kernel, stem.stride, dtype=self.dtype,
                 name='stem_conv')(images)
    x = nn.relu(bn('stem_bn')(x))
    if stem.pool_window:
      x = ops.pool(x, 'max', stem.pool_window, stem.pool_stride)

    block = self.space.granularity == 'block'
    node_index = 0

    def run_node(x):
      nonlocal node_index
      node_index += 1
      return nodes.choice_node(x, self.space.nodes, node_index - 1, arch, op_indices,
                               train=train, choice=self.choice, dtype=self.dtype,
                               bn_axis_name=self.bn_axis_name, block=block)

    for si, stage in enumerate(self.space.stages):
      for bi in range(stage.num_blocks):
        stride = stage.stride if bi == 0 else 1
        shortcut = x
        if stride != 1 or x.shape[-1] != stage.channels:
          prefix = f'stage{si + 1}_block{bi}_shortcut'
          shortcut = ops.Conv(stage.channels, 1, stride, dtype=self.dtype,
                              name=f'{prefix}_conv')(x)
          shortcut = bn(f'{prefix}_bn')(shortcut)
        if block:
          y = run_node(x)
        else:
          y = nn.relu(run_node(x))
          y = run_node(y)
        x = nn.relu(y + shortcut)

    return head_output(self, x, train=train, labels=labels, embed_only=embed_only)

  def embed(self, images: jax.Array, op_indices: jax.Array | None = None, *,
            train: bool) -> jax.Array:
    """The face embedding ``(B, embedding_size)`` float32 of a ``head='face'`` network.

    Call as ``model.apply(variables, images, [op_indices], train=False, method='embed')``.
    """
    return self(images, op_indices, train=train, embed_only=True)
