"""Searchable nodes inside any Flax network: the building block of every family.

A network refines its layers by calling :func:`choice_node` where a searchable layer
goes. Node ``i``'s variables live under ``node{i:02d}/<op name>/``, the naming
:func:`branch_mask` (which supernet leaves an architecture uses) and
:func:`select_branches` (a fixed network's variables from the supernet's) read, so a
network built from these nodes gets the supernet training, freezing and
``supernet(arch) == fixed(arch)`` of the built-in families for free.

* **supernet** (``arch=None``): node ``i`` holds every candidate and picks one by the
  traced ``op_indices[i]`` (:class:`nar_jax.ops.Choice`: ``lax.switch`` or a select);
* **fixed network** (``arch`` a tuple of op indices): node ``i`` holds only
  ``arch[i]`` and calls it directly.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp

from nar_jax import ops
from nar_jax.space import Node


def node_name(index: int) -> str:
  """The variable scope of node ``index``: ``node00``, ``node01``, ..."""
  return f'node{index:02d}'


def node_body(node: Node, block: bool = False) -> tuple:
  """The :class:`ops.Branch` body of ``node``: one operator ``layer0`` carrying the
  stride, or for block nodes ``layer0 -> ReLU -> layer1`` (a residual body)."""
  first = ops.OperatorLayer('layer0', node.stride)
  return (first, ops.RELU, ops.OperatorLayer('layer1')) if block else (first,)


def choice_node(x: jax.Array, nodes: Sequence[Node], index: int, arch: tuple[int, ...] | None,
                op_indices: jax.Array | None, *, train: bool, choice: str = 'switch',
                dtype: Any = jnp.float32, bn_axis_name: str | None = None,
                bn_epsilon: float = ops.BN_EPSILON, block: bool = False) -> jax.Array:
  """Runs node ``index`` of ``nodes`` on ``x (B, H, W, C_in)``; call it from a compact method.

  Args:
    x: the node's input.
    nodes: the space's nodes (:attr:`nar_jax.space.SearchSpace.nodes`).
    index: which node (its scope is :func:`node_name` ``(index)``).
    arch: the fixed network's validated op indices, or ``None`` for the supernet.
    op_indices: the supernet's traced architecture ``(num_nodes,)`` int32, or ``None``.
    train, choice, dtype, bn_axis_name, bn_epsilon: as :class:`nar_jax.ops.Choice`.
    block: the node is a whole residual body (two operator layers).

  Returns:
    ``(B, H', W', out_channels)``: the chosen operator (conv or pool, then BatchNorm).
  """
  node = nodes[index]
  choices = node.candidates if arch is None else (ops.OP_NAMES[arch[index]],)
  op_index = None if arch is not None else op_indices[index]
  return ops.Choice(choices, node_body(node, block), node.out_channels, choice, dtype,
                    bn_axis_name, bn_epsilon, name=node_name(index))(x, op_index, train)


def check_call(arch: tuple[int, ...] | None, op_indices: jax.Array | None) -> None:
  """Raises ``ValueError`` unless exactly one of ``arch`` (fixed) and ``op_indices``
  (supernet) is given."""
  if (arch is None) == (op_indices is None):
    raise ValueError('pass op_indices to the supernet (arch=None) and only to it')


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
