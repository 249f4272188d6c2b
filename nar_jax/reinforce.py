"""REINFORCE for the controller, and the paper's reading of it (eq. 3-7).

ENAS's estimator (README, "Design notes": ENAS's controller and recipe): for each
sampled architecture ``i`` in turn, the exponential-moving-average baseline is
updated *before* the advantage is taken, ``b <- b - (1 - decay) (b - R_i)``,
``A_i = R_i - b``, and the loss is ``-log p(tau_i) A_i``; ``num_aggregate`` such losses
are averaged per update.

The paper shows the same gradient is that of a reward-weighted cross entropy
(eq. 4), and that it hands each (node, operator) pair the reward
``R_O[j, k] = sum_i O^i_jk R^i / N`` (eq. 6): the policy gradient assigns the sparse
reward by sampling frequency. :func:`reward_weighted_cross_entropy` and
:func:`assigned_operator_rewards` compute those quantities so they can be tested
against the estimator and logged as diagnostics.

For the joint (operator + skip) search the loss adds ENAS's KL skip penalty
(:func:`joint_loss`), eq. 7's skip rewards are :func:`assigned_skip_rewards`, and
:func:`joint_update_diagnostics` gives everything the paper's Figure 1 and the plots
(:mod:`nar_jax.plots`) read for one update, :func:`operator_update_diagnostics` the
same for an operator-only search.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from nar_jax import controller, joint


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


class CostReward(NamedTuple):
  """MnasNet's resource constraint on the controller's reward (:func:`cost_aware_reward`).

  ``macs`` is a jittable ``arch -> MACs`` (:attr:`nar_jax.families.Family.macs_model`);
  ``weight`` is the exponent above ``target_macs`` and ``weight_below`` at or below it.
  """

  macs: Callable[[jax.Array], jax.Array]
  target_macs: float
  weight: float
  weight_below: float


def cost_aware_reward(accuracy: jax.Array, macs: jax.Array, target_macs: float,
                      weight: float, weight_below: float | None = None) -> jax.Array:
  """MnasNet's ``ACC(m) * (MACs(m) / T) ** w`` (Tan et al. 2019, eq. 2), elementwise.

  ``w = weight_below`` where ``MACs <= T`` and ``weight`` above it; ``weight_below=None``
  uses ``weight`` on both sides (MnasNet's soft constraint). With ``w = -0.07`` a network
  at the target keeps its accuracy, one with twice the target's MACs loses
  ``1 - 2 ** -0.07`` (4.7%) of it, one with half gains 5.0%. ``weight_below=0`` and
  ``weight=-1`` is MnasNet's hard constraint: no gain below the target, accuracy
  scaled by ``T / MACs`` above it.
  """
  ratio = macs / target_macs
  if weight_below is None or weight_below == weight:
    return accuracy * ratio ** weight
  return accuracy * jnp.where(ratio <= 1.0, ratio ** weight_below, ratio ** weight)


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


# ---------------------------------------------------------------------------------------
# Operators vs skip connections (eq. 3-7, Figure 1): diagnostics of a controller update.
# ---------------------------------------------------------------------------------------


def joint_loss(log_probs: jax.Array, advantages: jax.Array, skip_penalties: jax.Array,
               skip_weight: float) -> jax.Array:
  """ENAS's joint controller loss: :func:`reinforce_loss` + ``skip_weight * mean_i penalty_i``.

  ``log_probs, advantages, skip_penalties (M,)``: per sampled architecture, its whole
  log-probability (ops and skips), advantage and KL skip penalty.
  """
  return reinforce_loss(log_probs, advantages) + skip_weight * jnp.mean(skip_penalties)


def term_gradient_norms(terms_fn, params) -> jax.Array:
  """Global L2 norm of the gradient of each term: ``(T,)`` for ``terms_fn(params) -> T scalars``.

  For Figure 1 pass the two parts of the REINFORCE loss, ``mean_i -log p(O^i) A_i``
  and ``mean_i -log p(S^i) A_i`` (eq. 3's operator and skip sums): their gradients
  add up to the REINFORCE gradient, and each is attributed to its decisions no
  matter which parameters (shared LSTM included) it flows through.
  """
  jacobian = jax.jacrev(lambda p: jnp.stack(terms_fn(p)))(params)
  squares = [jnp.sum(jnp.reshape(leaf, (leaf.shape[0], -1)) ** 2, axis=1)
             for leaf in jax.tree.leaves(jacobian)]
  return jnp.sqrt(sum(squares))


def group_gradient_norms(grads: dict, groups: dict[str, tuple[str, ...]]) -> dict[str, jax.Array]:
  """L2 norm of the gradient leaves of each named group, e.g.
  :data:`nar_jax.controller.JOINT_PARAM_GROUPS`; every leaf must be in exactly one group."""
  names = [n for members in groups.values() for n in members]
  if sorted(names) != sorted(grads):
    raise ValueError(f'parameter groups {sorted(names)} do not partition the gradient '
                     f'leaves {sorted(grads)}')
  return {group: jnp.sqrt(sum(jnp.sum(grads[n] ** 2) for n in members))
          for group, members in groups.items()}


def assigned_skip_rewards(skips: jax.Array, rewards: jax.Array) -> jax.Array:
  """Eq. 7: ``R_S[j, t, n] = sum_i [S^i_jt == n] R^i / M``; returns ``(L, L, 2)``.

  ``skips (M, L, L)`` are the sampled bits (:func:`nar_jax.joint.split`), ``n = 1``
  the reward handed to "skip present", ``n = 0`` to "absent". Entries with
  ``t >= j`` (no such skip) are zero.
  """
  num_layers = skips.shape[-1]
  lower = jnp.tril(jnp.ones((num_layers, num_layers), bool), -1)
  one_hot = jax.nn.one_hot(skips, 2) * lower[..., None]                   # (M, L, L, 2)
  return jnp.einsum('mjtn,m->jtn', one_hot, rewards) / skips.shape[0]


def operator_update_diagnostics(params, archs: jax.Array, rewards: jax.Array,
                                advantages: jax.Array, mask: jax.Array,
                                tanh_constant: float,
                                variant: controller.Variant = controller.ENAS,
                                prior: jax.Array | None = None) -> dict[str, jax.Array]:
  """Diagnostics of one operator-only (NAR) controller update.

  Args:
    params: ``variant``'s controller parameters (:func:`nar_jax.controller.init` for
      ENAS) the archs were sampled from.
    archs: ``(M, num_nodes)`` sampled op indices; ``rewards, advantages (M,)``.
    mask: ``(num_nodes, num_ops)`` candidate mask; ``prior``: the policy's logit
      offsets (:func:`nar_jax.controller.original_prior`), or ``None``.

  Returns a dict: ``grad_norm_ops`` (norm of the REINFORCE gradient), ``op_probs``
  ``(num_nodes, num_ops)`` (teacher-forced ``p(O_j | context)`` averaged over the
  ``M`` samples, an estimate of each node's marginal), ``op_entropy (num_nodes,)``
  (averaged the same way) and ``op_rewards`` (eq. 6, ``(num_nodes, num_ops)``).
  """
  def loss(p):
    scored = jax.vmap(lambda arch: controller.log_prob(p, arch, mask, tanh_constant,
                                                       variant, prior))(archs)
    return (reinforce_loss(scored.log_prob, advantages),)

  op_log_p = jax.vmap(lambda arch: controller.log_probs(params, arch, mask, tanh_constant,
                                                        variant, prior))(archs)
  return {
      'grad_norm_ops': term_gradient_norms(loss, params)[0],
      'op_probs': jnp.mean(jnp.exp(op_log_p), axis=0),
      'op_entropy': jnp.mean(-jnp.sum(jnp.exp(op_log_p) * op_log_p, axis=-1), axis=0),
      'op_rewards': assigned_operator_rewards(archs, rewards, op_log_p.shape[-1]),
  }


def joint_update_diagnostics(params, archs: jax.Array, rewards: jax.Array,
                             advantages: jax.Array, mask: jax.Array,
                             tanh_constant: float,
                             variant: controller.Variant = controller.ENAS
                             ) -> dict[str, jax.Array]:
  """Diagnostics of one joint (ops + skips) controller update: the paper's Figure 1 and eq. 6-7.

  Args:
    params: ``variant``'s joint controller parameters
      (:func:`nar_jax.controller.init_joint` for ENAS).
    archs: ``(M, L (L + 1) / 2)`` sampled flat joint architectures;
      ``rewards, advantages (M,)``.
    mask: ``(L, num_ops)`` candidate mask.

  Returns a dict:
    ``grad_norm_ops``, ``grad_norm_skips``: :func:`term_gradient_norms` of
      ``mean_i -log p(O^i) A_i`` and ``mean_i -log p(S^i) A_i`` (the skip penalty's
      gradient is in neither);
    ``op_probs (L, num_ops)``, ``skip_probs (L, L)``: teacher-forced ``p(O_j)`` and
      ``p(S_jt = 1)`` averaged over the ``M`` samples;
    ``op_entropy (L,)``, ``skip_entropy (L,)``: per-layer entropies, averaged alike
      (a layer's skip entropy sums its ``j`` bits);
    ``op_rewards (L, num_ops)`` (eq. 6), ``skip_rewards (L, L, 2)`` (eq. 7).
  """
  score = lambda p: jax.vmap(lambda arch: controller.log_prob_joint(
      p, arch, mask, tanh_constant, variant=variant))(archs)

  def terms(p):
    scored = score(p)
    return (reinforce_loss(scored.op_log_prob, advantages),
            reinforce_loss(scored.skip_log_prob, advantages))

  norms = term_gradient_norms(terms, params)
  scored = score(params)
  op_log_p, skip_probs = jax.vmap(lambda arch: controller.log_probs_joint(
      params, arch, mask, tanh_constant, variant))(archs)
  ops_, skips = joint.split(archs, mask.shape[0])
  return {
      'grad_norm_ops': norms[0],
      'grad_norm_skips': norms[1],
      'op_probs': jnp.mean(jnp.exp(op_log_p), axis=0),
      'skip_probs': jnp.mean(skip_probs, axis=0),
      'op_entropy': jnp.mean(scored.entropy, axis=0),
      'skip_entropy': jnp.mean(scored.skip_entropy, axis=0),
      'op_rewards': assigned_operator_rewards(ops_, rewards, op_log_p.shape[-1]),
      'skip_rewards': assigned_skip_rewards(skips, rewards),
  }
