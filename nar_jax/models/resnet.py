"""Basic-block ResNets over a :class:`~nar_jax.space.SearchSpace`: supernet and fixed network.

One module class serves both. A node's variables live under ``node{i:02d}/<op name>``:

* the **supernet** (``arch=None``) holds every candidate of every node and picks a
  node's branch with ``nn.switch`` on a *traced* op index, so one compiled step
  serves every architecture;
* the **fixed network** (``arch`` = a tuple of op indices) holds only the chosen op of
  each node and calls it directly (no switch). Its variable tree is the supernet's
  with the unselected branches dropped (:func:`select_branches`), which is how
  ``supernet(arch) == fixed(arch)`` is checked.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from nar_jax import margins, ops
from nar_jax.models import face_head
from nar_jax.space import Node, SearchSpace

HEADS = ('softmax', 'face')
"""Output heads of the softmax-family networks (:class:`ResNet`, ``MacroNet``): global
average pool + Dense, or ArcFace's :class:`~nar_jax.models.face_head.FaceHead`."""


def check_head(head: str) -> None:
  """Raises ``ValueError`` unless ``head`` is one of :data:`HEADS`."""
  if head not in HEADS:
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")


def head_output(parent: nn.Module, x: jax.Array, *, train: bool, labels: jax.Array | None,
                embed_only: bool) -> jax.Array:
  """The output of a softmax-family network from its last feature map ``x (B, H, W, C)``.

  Call from ``parent``'s compact method; ``parent`` (:class:`ResNet` or ``MacroNet``)
  has the attributes ``head``, ``num_classes``, ``embedding_size``, ``margin``,
  ``dropout_rate``, ``dtype`` and ``bn_axis_name``. ``'softmax'``: global average pool
  + Dense ``head``, float32 logits. ``'face'``: :class:`face_head.FaceHead` (the
  backbone's BN epsilon) with its variables directly under ``parent``.
  """
  check_head(parent.head)
  if parent.head == 'face':
    head = face_head.FaceHead(parent.num_classes, parent.embedding_size, parent.margin,
                              parent.dropout_rate, ops.BN_EPSILON, parent.dtype,
                              parent.bn_axis_name, name='face_head')
    return face_head.face_output(parent, head, x, train=train, labels=labels,
                                 embed_only=embed_only)
  if embed_only:
    raise ValueError("only head='face' networks have an embedding")
  x = jnp.mean(x, axis=(1, 2))
  logits = nn.Dense(parent.num_classes, dtype=parent.dtype, param_dtype=jnp.float32,
                    name='head')(x)
  return logits.astype(jnp.float32)


def node_body(node: Node, block: bool) -> tuple:
  """The :class:`ops.Branch` body of ``node``: one operator ``layer0`` carrying the
  stride, or for block nodes ``layer0 -> ReLU -> layer1`` (the residual body)."""
  first = ops.OperatorLayer('layer0', node.stride)
  return (first, ops.RELU, ops.OperatorLayer('layer1')) if block else (first,)


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
    if (self.arch is None) == (op_indices is None):
      raise ValueError('pass op_indices to the supernet (arch=None) and only to it')
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
      i = node_index
      node = self.space.nodes[i]
      choices = node.candidates if arch is None else (ops.OP_NAMES[arch[i]],)
      index = None if arch is not None else op_indices[i]
      node_index += 1
      return ops.Choice(choices, node_body(node, block), node.out_channels, self.choice,
                        self.dtype, self.bn_axis_name, name=f'node{i:02d}')(x, index, train)

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


def _node_and_op(path) -> tuple[int, str] | None:
  """``(node index, op name)`` if a variable path lies inside a node branch."""
  keys = [getattr(p, 'key', None) for p in path]
  for a, b in zip(keys, keys[1:]):
    if isinstance(a, str) and a.startswith('node') and a[4:].isdigit() and b in ops.OP_NAMES:
      return int(a[4:]), b
  return None


def branch_mask(tree: Any, op_indices: jax.Array) -> Any:
  """Bool pytree like ``tree``: True where a leaf is used by architecture ``op_indices``.

  Leaves outside any node (stem, shortcuts, head) are always True. Works on traced
  ``op_indices``; the result leaves are scalar booleans.
  """
  op_index_of = {name: i for i, name in enumerate(ops.OP_NAMES)}

  def leaf_mask(path, _):
    found = _node_and_op(path)
    if found is None:
      return jnp.asarray(True)
    node, op = found
    return op_indices[node] == op_index_of[op]

  return jax.tree_util.tree_map_with_path(leaf_mask, tree)


def select_branches(variables: Any, arch: Sequence[int]) -> Any:
  """The supernet's variables restricted to ``arch``: a fixed network's variables."""

  def prune(tree, path):
    found = _node_and_op(path)
    if found is not None and ops.OP_NAMES[arch[found[0]]] != found[1]:
      return None
    if not hasattr(tree, 'items'):
      return tree
    pruned = {k: prune(v, path + (jax.tree_util.DictKey(k),)) for k, v in tree.items()}
    return {k: v for k, v in pruned.items() if v is not None}

  return prune(variables, ())
