"""Helpers shared by the model tests (supernet vs fixed network, branch masks)."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


def random_variables(shapes: Any, seed: int, small_var: tuple[str, ...] = ()) -> Any:
  """Random values for a variable tree (e.g. ``jax.eval_shape(model.init, ...)``).

  Every leaf gets a non-trivial value, so a wrong branch or a wrong statistic shows up
  in the outputs: He-scaled kernels (``kernel``, ``weight``), BatchNorm scale and
  variance in [0.5, 1.5], PReLU slopes in [0.1, 0.5], everything else (biases, means)
  N(0, 0.2). BN variances whose path contains one of ``small_var`` are drawn in
  [1e-5, 3e-5], where the BatchNorm epsilon visibly matters.
  """
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    where = jax.tree_util.keystr(path)
    if name == 'var' and any(s in where for s in small_var):
      value = rng.uniform(1e-5, 3e-5, leaf.shape)
    elif name in ('scale', 'var'):
      value = rng.uniform(0.5, 1.5, leaf.shape)
    elif name == 'negative_slope':
      value = rng.uniform(0.1, 0.5, leaf.shape)
    elif name in ('kernel', 'weight'):
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_in)
    else:
      value = 0.2 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


def leaf_paths(tree: Any) -> set[str]:
  """The key paths of a tree's leaves, as strings."""
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def assert_gradients_follow_mask(grads: Any, used: Any,
                                 must_move: Callable[[str], bool] = lambda path: True) -> None:
  """Gradients are exactly zero where ``used`` (a branch mask) is False, and nonzero
  where it is True for every leaf path ``must_move`` selects."""
  for (path, g), u in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(used)):
    where = jax.tree_util.keystr(path)
    if not bool(u):
      np.testing.assert_array_equal(g, 0.0, err_msg=where)
    elif must_move(where):
      assert np.any(g != 0), where


def count_architecture(space: Any, arch: Any, image_hw: tuple[int, int], in_channels: int,
                       num_classes: int, embedding_size: int | None = None) -> Any:
  """The analytic counts of ``space``'s fixed network ``arch``: the count of the family the
  space belongs to (one call for every space in the tests)."""
  from nar_jax import families  # noqa: PLC0415
  from nar_jax.joint import JointSpace  # noqa: PLC0415
  if isinstance(space, JointSpace):
    return families.macro.count_architecture(space, arch, image_hw, in_channels, num_classes,
                                             embedding_size)
  if space.family == 'ir':
    assert embedding_size is None, 'IR networks embed with space.embedding_size'
    return families.ir.count_architecture(space, arch, image_hw, in_channels, num_classes)
  return families.resnet.count_architecture(space, arch, image_hw, in_channels, num_classes,
                                            embedding_size)


def macs_model(space: Any, image_hw: tuple[int, int], in_channels: int, num_classes: int,
               embedding_size: int | None = None) -> Callable[[Any], Any]:
  """The jittable MACs of ``space``'s family (:attr:`nar_jax.families.Family.macs_model`)."""
  from nar_jax import families  # noqa: PLC0415
  from nar_jax.joint import JointSpace  # noqa: PLC0415
  from nar_jax.models.heads import Head  # noqa: PLC0415
  family = (families.macro.FAMILY if isinstance(space, JointSpace)
            else families.ir.FAMILY if space.family == 'ir' else families.resnet.FAMILY)
  head = Head('face', embedding_size=embedding_size) if embedding_size else Head()
  return family.macs_model(space, families.CountArgs(tuple(image_hw), in_channels, num_classes,
                                                     head))
