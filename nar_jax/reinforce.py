"""REINFORCE for the controller, and the paper's reading of it (eq. 3-7).

ENAS's estimator (DESIGN.md section 4): for each sampled architecture ``i`` in
turn, the exponential-moving-average baseline is updated *before* the advantage is
taken, ``b <- b - (1 - decay) (b - R_i)``, ``A_i = R_i - b``, and the loss is
``-log p(tau_i) A_i``; ``num_aggregate`` such losses are averaged per update.

The paper shows the same gradient is that of a reward-weighted cross entropy
(eq. 4), and that it hands each (node, operator) pair the reward
``R_O[j, k] = sum_i O^i_jk R^i / N`` (eq. 6): the policy gradient assigns the sparse
reward by sampling frequency. :func:`reward_weighted_cross_entropy` and
:func:`assigned_operator_rewards` compute those quantities so they can be tested
against the estimator and logged as diagnostics.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def ema_advantages(baseline: jax.Array, rewards: jax.Array,
                   decay: float) -> tuple[jax.Array, jax.Array]:
  """Sequential EMA baseline over ``rewards (M,)``.

  Returns:
    ``(new_baseline, advantages (M,))`` where sample ``i`` is compared with the
    baseline already updated with ``R_i`` (ENAS's order).
  """

  def step(b, reward):
    b = b - (1.0 - decay) * (b - reward)
    return b, reward - b

  return jax.lax.scan(step, jnp.asarray(baseline, jnp.float32), rewards)


def reinforce_loss(log_probs: jax.Array, advantages: jax.Array) -> jax.Array:
  """``mean_i -log p(tau_i) * A_i``; ``log_probs, advantages (M,)``, no gradient through A."""
  return jnp.mean(-log_probs * jax.lax.stop_gradient(advantages))


def reward_weighted_cross_entropy(log_p: jax.Array, archs: jax.Array,
                                  rewards: jax.Array) -> jax.Array:
  """The paper's eq. 4 (operators only), as a loss to minimise.

  Args:
    log_p: ``(M, num_nodes, num_ops)`` log-softmaxes of the controller for each of
      the ``M`` sampled architectures (teacher-forced).
    archs: ``(M, num_nodes)`` sampled op indices (the one-hot targets ``O^i_j``).
    rewards: ``(M,)`` rewards (or advantages) ``R^i``.

  Returns:
    ``(1/M) sum_i R^i sum_j CE(O^i_j, p(O^i_j))``.
  """
  cross_entropy = optax.softmax_cross_entropy_with_integer_labels(log_p, archs)  # (M, N)
  return jnp.mean(jax.lax.stop_gradient(rewards) * jnp.sum(cross_entropy, axis=1))


def assigned_operator_rewards(archs: jax.Array, rewards: jax.Array, num_ops: int) -> jax.Array:
  """Eq. 6: ``R_O[j, k] = sum_i [a^i_j == k] R^i / M``; returns ``(num_nodes, num_ops)``."""
  one_hot = jax.nn.one_hot(archs, num_ops)                        # (M, N, K)
  return jnp.einsum('mnk,m->nk', one_hot, rewards) / archs.shape[0]
