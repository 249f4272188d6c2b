"""Tests for nar_jax.reinforce: ENAS's EMA baseline and the paper's reading of REINFORCE.

The paper (eq. 3-7) shows that the REINFORCE gradient of the controller equals the
gradient of a reward-weighted cross entropy (eq. 4), and that it hands each
(node, operator) pair the reward R_O[j, k] = sum_i [a^i_j == k] R^i / M (eq. 6).
These tests check the three functions against hand-written references and check
both equalities on real controller gradients.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import controller, reinforce

K = 6  # len(ops.OP_NAMES)


def _random_mask(seed, num_nodes, num_ops=K):
  """A random candidate mask with at least one allowed op per node."""
  rng = np.random.default_rng(seed)
  mask = rng.random((num_nodes, num_ops)) < 0.5
  mask[np.arange(num_nodes), rng.integers(0, num_ops, num_nodes)] = True
  return jnp.asarray(mask)


# ---------------------------------------------------------------------------
# EMA baseline.


def _ema_reference(baseline, rewards, decay):
  """ENAS: for each sample, first b <- b - (1 - d)(b - R), then A = R - b."""
  b = float(baseline)
  advantages = []
  for r in rewards:
    b = b - (1.0 - decay) * (b - float(r))
    advantages.append(float(r) - b)
  return b, np.asarray(advantages)


@pytest.mark.parametrize('decay', [0.99, 0.9, 0.5, 0.0])
@pytest.mark.parametrize('baseline', [0.0, 0.37])
def test_ema_advantages_matches_python_loop(decay, baseline):
  rewards = jnp.asarray(np.random.default_rng(0).uniform(0, 1, 11), jnp.float32)
  new_baseline, advantages = reinforce.ema_advantages(jnp.float32(baseline), rewards, decay)
  want_baseline, want_advantages = _ema_reference(baseline, rewards, decay)
  chex.assert_shape(advantages, (11,))
  chex.assert_shape(new_baseline, ())
  chex.assert_trees_all_close((new_baseline, advantages),
                              (jnp.float32(want_baseline), jnp.asarray(want_advantages)),
                              atol=1e-6)


def test_ema_baseline_is_updated_before_the_advantage():
  """One step by hand: b0 = 0.5, R = 1, d = 0.9 -> b1 = 0.55 and A = R - b1 = 0.45
  (not R - b0 = 0.5). With d = 0, A is always 0 (the baseline jumps to R)."""
  b, a = reinforce.ema_advantages(jnp.float32(0.5), jnp.asarray([1.0]), 0.9)
  np.testing.assert_allclose(b, 0.55, atol=1e-6)
  np.testing.assert_allclose(a, [0.45], atol=1e-6)
  _, a = reinforce.ema_advantages(jnp.float32(0.5), jnp.asarray([1.0, 0.2, 0.7]), 0.0)
  np.testing.assert_allclose(a, 0.0, atol=1e-7)


def test_ema_advantages_jits():
  rewards = jnp.asarray([0.1, 0.9, 0.4])
  eager = reinforce.ema_advantages(jnp.float32(0.2), rewards, 0.95)
  jitted = jax.jit(reinforce.ema_advantages, static_argnums=2)(jnp.float32(0.2), rewards, 0.95)
  chex.assert_trees_all_close(eager, jitted, atol=1e-7)


# ---------------------------------------------------------------------------
# REINFORCE loss == reward-weighted cross entropy (eq. 4).


def test_reinforce_loss_value_and_stop_gradient():
  """mean_i -log p_i * A_i; no gradient flows into the advantages."""
  log_probs = jnp.asarray([-1.0, -2.0, -0.5])
  advantages = jnp.asarray([0.3, -0.1, 2.0])
  np.testing.assert_allclose(reinforce.reinforce_loss(log_probs, advantages),
                             np.mean([0.3, -0.2, 1.0]), atol=1e-7)
  g_lp, g_adv = jax.grad(reinforce.reinforce_loss, argnums=(0, 1))(log_probs, advantages)
  chex.assert_trees_all_close(g_lp, -advantages / 3, atol=1e-7)
  chex.assert_trees_all_close(g_adv, jnp.zeros(3))


@pytest.mark.parametrize('seed', [0, 1])
def test_reinforce_gradient_equals_reward_weighted_cross_entropy_gradient(seed):
  """For M architectures sampled from the controller, the gradient (w.r.t. all controller
  parameters) of mean_i -log p(tau_i) A_i equals that of the eq. 4 cross entropy
  (1/M) sum_i A_i sum_j CE(a^i_j, p_j), computed from teacher-forced log-softmaxes."""
  num_nodes, m = 9, 12
  mask = _random_mask(seed, num_nodes)
  params = controller.init(jax.random.key(seed), K)
  # Larger weights than the init, so the policy is far from uniform.
  params = jax.tree.map(lambda p: 8.0 * p, params)
  keys = jax.random.split(jax.random.key(100 + seed), m)
  archs = jax.jit(jax.vmap(lambda k: controller.sample(params, k, mask).arch))(keys)
  advantages = jnp.asarray(np.random.default_rng(seed).standard_normal(m), jnp.float32)

  def reinforce_objective(p):
    log_probs = jax.vmap(lambda a: controller.log_prob(p, a, mask).log_prob)(archs)
    return reinforce.reinforce_loss(log_probs, advantages)

  def cross_entropy_objective(p):
    log_p = jax.vmap(lambda a: controller.log_probs(p, a, mask))(archs)  # (M, N, K)
    chex.assert_shape(log_p, (m, num_nodes, K))
    return reinforce.reward_weighted_cross_entropy(log_p, archs, advantages)

  value_a, grad_a = jax.jit(jax.value_and_grad(reinforce_objective))(params)
  value_b, grad_b = jax.jit(jax.value_and_grad(cross_entropy_objective))(params)
  chex.assert_trees_all_close(value_a, value_b, atol=1e-5, rtol=1e-5)
  chex.assert_trees_all_close(grad_a, grad_b, atol=1e-5, rtol=1e-4)
  # Not vacuous: every parameter gets a non-zero gradient.
  for g in jax.tree.leaves(grad_a):
    assert float(jnp.max(jnp.abs(g))) > 1e-6


# ---------------------------------------------------------------------------
# Assigned operator rewards (eq. 6) and the context-free policy gradient (eq. 5).


def test_assigned_operator_rewards_toy_batch():
  """M = 3 architectures of 2 nodes over 3 ops, rewards 1, 2, 4:
  R_O[j, k] = (sum of the rewards of the architectures that chose op k at node j) / 3."""
  archs = jnp.asarray([[0, 2],
                       [1, 2],
                       [0, 0]])
  rewards = jnp.asarray([1.0, 2.0, 4.0])
  expected = np.array([[(1 + 4) / 3, 2 / 3, 0.0],
                       [4 / 3, 0.0, (1 + 2) / 3]])
  got = reinforce.assigned_operator_rewards(archs, rewards, 3)
  chex.assert_shape(got, (2, 3))
  chex.assert_trees_all_close(got, jnp.asarray(expected), atol=1e-6)
  # Every node hands out the whole mean reward: sum_k R_O[j, k] = mean_i R_i.
  chex.assert_trees_all_close(got.sum(-1), jnp.full((2,), 7.0 / 3), atol=1e-6)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_context_free_policy_gradient_is_assigned_reward(seed):
  """Context-free policy: log p_j = log_softmax(theta_j), theta (N, K).

  L = -(1/M) sum_i R_i sum_j log p_j(a_ij), and d log p_j(a)/d theta_jk = [a == k] - p_jk, so
    dL/dtheta_jk = -(1/M) sum_i R_i ([a_ij == k] - p_jk)
                 = -(R_O[j, k] - p_jk * (1/M) sum_i R_i)
                 = -(R_O[j, k] - p_jk * sum_k' R_O[j, k'])        (eq. 5 with eq. 6)
  since each architecture picks exactly one op per node. The REINFORCE gradient moves
  each logit by the reward the operator was assigned minus its expected share.
  """
  n, k, m = 5, K, 16
  rng = np.random.default_rng(seed)
  theta = jnp.asarray(rng.standard_normal((n, k)), jnp.float32)
  archs = jnp.asarray(rng.integers(0, k, (m, n)), jnp.int32)
  rewards = jnp.asarray(rng.uniform(-1, 1, m), jnp.float32)

  def loss(theta):
    log_p = jax.nn.log_softmax(theta)                                     # (N, K)
    log_probs = jnp.take_along_axis(log_p[None], archs[..., None], -1)[..., 0].sum(-1)  # (M,)
    return reinforce.reinforce_loss(log_probs, rewards)

  grad = jax.grad(loss)(theta)
  r_o = reinforce.assigned_operator_rewards(archs, rewards, k)
  p = jax.nn.softmax(theta)
  expected = -(r_o - p * r_o.sum(-1, keepdims=True))
  chex.assert_shape(grad, (n, k))
  chex.assert_trees_all_close(grad, expected, atol=1e-6)
  # The same holds for the eq. 4 form (teacher-forced log-softmaxes, here context-free).
  ce_grad = jax.grad(lambda t: reinforce.reward_weighted_cross_entropy(
      jnp.broadcast_to(jax.nn.log_softmax(t), (m, n, k)), archs, rewards))(theta)
  chex.assert_trees_all_close(ce_grad, expected, atol=1e-6)
