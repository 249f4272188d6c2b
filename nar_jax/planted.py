"""Controller searches on a planted reward: can a controller learn a known target?

The reward of an architecture is the fraction of its nodes (layers, for a joint
policy: their operators) equal to a planted target; the search runs through
:func:`nar_jax.train.make_policy_update`, the very update the pipeline uses, so a
config's controller, optimizer and REINFORCE settings are measured as they search.
Used by ``benchmarks/controller_planted.py`` and ``tests/test_controller_learning.py``.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nar_jax import joint, train
from nar_jax import policy as policy_lib


def random_target(mask: np.ndarray, seed: int) -> np.ndarray:
  """``(num_nodes,)`` int32: an allowed op of ``mask (num_nodes, num_ops)`` per node,
  uniformly at random."""
  rng = np.random.default_rng(seed)
  return np.asarray([rng.choice(np.flatnonzero(row)) for row in mask], np.int32)


def uniform_target(mask: np.ndarray) -> np.ndarray:
  """``(num_nodes,)`` int32: one op every node allows, the same for all (the all-same
  target); raises ``ValueError`` when no op is allowed everywhere."""
  common = np.flatnonzero(np.all(mask, axis=0))
  if not common.size:
    raise ValueError('no op is allowed at every node')
  return np.full(mask.shape[0], common[-1], np.int32)


def node_ops(policy: policy_lib.Policy, archs: jax.Array, num_nodes: int) -> jax.Array:
  """The op per node ``(..., num_nodes)`` of ``policy``'s architectures ``archs``."""
  return joint.split(archs, num_nodes)[0] if policy.kind == 'joint' else archs


def matching_reward(policy: policy_lib.Policy, target: np.ndarray) -> train.RewardFn:
  """A :data:`nar_jax.train.RewardFn`: the fraction of nodes whose op equals ``target``."""
  target = jnp.asarray(target, jnp.int32)
  return lambda variables, archs, images, targets: jnp.mean(
      node_ops(policy, archs, target.shape[0]) == target, axis=-1)


class PlantedResult(NamedTuple):
  """Outcome of :func:`planted_search`.

  Attributes:
    updates: controller updates until the greedy decode first matched ``threshold``
      of the nodes (checked every ``check_every``), or ``None`` within the budget.
    match: the greedy decode's fraction of matching nodes at the end.
    entropy: the last update's mean per-architecture sum of op entropies (nats).
  """

  updates: int | None
  match: float
  entropy: float


def planted_search(policy: policy_lib.Policy, tx: optax.GradientTransformation,
                   target: np.ndarray, *, budget: int, num_aggregate: int, entropy_weight: float,
                   baseline_decay: float, seed: int = 0, threshold: float = 0.9,
                   check_every: int = 5, args: tuple[Any, ...] = ()) -> PlantedResult:
  """Runs up to ``budget`` updates of ``num_aggregate`` architectures on the planted reward.

  Stops once the greedy decode (``policy.most_likely``) matches ``threshold`` of
  ``target (num_nodes,)``. ``args``: the policy's extra arguments (the incumbent of a
  forced policy).
  """
  update = train.make_policy_update(policy, tx, matching_reward(policy, target),
                                    entropy_weight=entropy_weight, baseline_decay=baseline_decay)
  greedy = jax.jit(lambda params: policy.most_likely(params, *args).arch)
  target = np.asarray(target)
  match = lambda params: float(np.mean(
      np.asarray(node_ops(policy, greedy(params), target.shape[0])) == target))
  key = jax.random.key(seed)
  state = train.controller_state(policy.init(jax.random.fold_in(key, 0)), tx)
  slots = jnp.zeros((num_aggregate, 1), jnp.float32)    # update reads M off the batch
  entropy = float('nan')
  for step in range(1, budget + 1):
    state, metrics = update(state, None, slots, slots, jax.random.fold_in(key, step), *args)
    if step % check_every == 0 or step == budget:
      entropy = float(metrics['entropy'])
      if match(state.params) >= threshold:
        return PlantedResult(step, match(state.params), entropy)
  return PlantedResult(None, match(state.params), entropy)
