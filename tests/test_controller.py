"""Tests for nar_jax.controller: the ENAS LSTM controller as pure functions.

Covers parameter shapes and init range, sampling (shape, dtype, determinism, masks,
agreement with the teacher-forced scorer), greedy decoding, entropies, and an
end-to-end check that REINFORCE (EMA baseline + reinforce_loss + Adam) teaches the
controller a planted target architecture.
"""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import controller, reinforce, space

K = 6  # len(ops.OP_NAMES)


def _random_mask(seed, num_nodes, num_ops=K, density=0.5):
  """A random candidate mask with at least one allowed op per node; node 0 allows one op."""
  rng = np.random.default_rng(seed)
  mask = rng.random((num_nodes, num_ops)) < density
  mask[np.arange(num_nodes), rng.integers(0, num_ops, num_nodes)] = True
  mask[0] = False
  mask[0, rng.integers(0, num_ops)] = True
  return jnp.asarray(mask)


def _peaked_params(seed, num_ops=K, scale=10.0):
  """Controller params scaled up so the policy is far from uniform (a harder test case)."""
  params = controller.init(jax.random.key(seed), num_ops)
  return jax.tree.map(lambda p: scale * p, params)


_sample = jax.jit(controller.sample)
_sample_many = jax.jit(jax.vmap(controller.sample, in_axes=(None, 0, None)))
_log_prob = jax.jit(controller.log_prob)
_log_probs = jax.jit(controller.log_probs)
_most_likely = jax.jit(controller.most_likely)


# ---------------------------------------------------------------------------
# init.


@pytest.mark.parametrize('num_ops,hidden', [(K, 64), (4, 16)])
def test_init_shapes_and_range(num_ops, hidden):
  """ENAS: bias-free 1-layer LSTM, every weight uniform in [-0.1, 0.1]."""
  params = controller.init(jax.random.key(0), num_ops, hidden)
  assert set(params) == {'lstm_kernel', 'start_embedding', 'op_embedding', 'softmax_kernel'}
  chex.assert_shape(params['lstm_kernel'], (2 * hidden, 4 * hidden))
  chex.assert_shape(params['start_embedding'], (hidden,))
  chex.assert_shape(params['op_embedding'], (num_ops, hidden))
  chex.assert_shape(params['softmax_kernel'], (hidden, num_ops))
  chex.assert_type(list(params.values()), jnp.float32)
  for name, p in params.items():
    assert float(jnp.min(p)) >= -0.1 and float(jnp.max(p)) <= 0.1, name
  # Uniform over the whole range (not e.g. a narrow normal): the big kernel fills it.
  lstm = np.asarray(params['lstm_kernel'])
  assert lstm.min() < -0.099 and lstm.max() > 0.099
  np.testing.assert_allclose(lstm.std(), 0.2 / math.sqrt(12), rtol=0.05)  # U(-a, a): a/sqrt(3)
  assert abs(lstm.mean()) < 0.005
  # Each weight has its own random stream.
  assert not np.allclose(params['start_embedding'][:num_ops], params['op_embedding'][0, :num_ops])


def test_init_key_and_range_arguments():
  a = controller.init(jax.random.key(0), K)
  b = controller.init(jax.random.key(1), K)
  assert not np.allclose(a['lstm_kernel'], b['lstm_kernel'])
  chex.assert_trees_all_equal(a, controller.init(jax.random.key(0), K))
  wide = controller.init(jax.random.key(0), K, init_range=0.5)
  assert 0.45 < float(jnp.max(jnp.abs(wide['lstm_kernel']))) <= 0.5


# ---------------------------------------------------------------------------
# sample / log_prob.


@pytest.mark.parametrize('seed', [0, 1])
def test_sample_shapes_and_log_prob_agree(seed):
  """sample gives (N,) int32 ops and the log-prob, entropies that log_prob recomputes
  by teacher forcing the same architecture."""
  num_nodes = 11
  mask = _random_mask(seed, num_nodes)
  params = _peaked_params(seed)
  for i in range(4):
    s = _sample(params, jax.random.key(100 * seed + i), mask)
    chex.assert_shape(s.arch, (num_nodes,))
    assert s.arch.dtype == jnp.int32
    chex.assert_shape([s.log_prob, s.sample_entropy], ())
    chex.assert_shape(s.entropy, (num_nodes,))
    scored = _log_prob(params, s.arch, mask)
    chex.assert_trees_all_close(s, scored, atol=1e-5)
    # log_prob is the sum over nodes of the chosen ops' log-softmaxes.
    log_p = _log_probs(params, s.arch, mask)
    chosen = jnp.take_along_axis(log_p, s.arch[:, None], 1)[:, 0]
    chex.assert_trees_all_close(s.log_prob, jnp.sum(chosen), atol=1e-5)
    assert float(s.log_prob) < 0.0


def test_log_probs_are_normalised_masked_log_softmaxes():
  """Per node, exp(log_probs) sums to 1 over the allowed ops and is 0 on masked ops."""
  mask = _random_mask(3, 8)
  params = _peaked_params(3)
  arch = controller.uniform_sample(jax.random.key(0), mask)
  probs = jnp.exp(_log_probs(params, arch, mask))
  chex.assert_shape(probs, (8, K))
  chex.assert_trees_all_close(probs.sum(-1), jnp.ones(8), atol=1e-5)
  assert float(jnp.max(jnp.where(mask, 0.0, probs))) == 0.0
  # A node with one allowed op contributes log 1 = 0.
  np.testing.assert_allclose(probs[0][mask[0]], 1.0, atol=1e-6)


def test_sample_is_deterministic_given_key_and_varies_across_keys():
  mask = _random_mask(4, 10)
  params = controller.init(jax.random.key(0), K)
  a = _sample(params, jax.random.key(7), mask)
  b = _sample(params, jax.random.key(7), mask)
  chex.assert_trees_all_equal(a, b)
  archs = {tuple(np.asarray(_sample(params, jax.random.key(i), mask).arch)) for i in range(10)}
  assert len(archs) >= 5  # near-uniform policy over ~3 ops per node: collisions are rare


def test_sampling_distribution_equals_scored_distribution():
  """Empirical frequencies of sampled architectures match exp(log_prob) for every
  architecture of a 2-node, 3-op space, with a context-dependent (peaked) policy.
  This is what makes the REINFORCE estimator unbiased."""
  num_ops = 3
  params = controller.init(jax.random.key(0), num_ops, hidden=8, init_range=1.0)
  mask = jnp.ones((2, num_ops), bool)
  samples = jax.jit(jax.vmap(lambda k: controller.sample(params, k, mask).arch))(
      jax.random.split(jax.random.key(1), 40_000))
  counts = np.zeros((num_ops, num_ops))
  np.add.at(counts, (np.asarray(samples[:, 0]), np.asarray(samples[:, 1])), 1)
  exact = np.zeros((num_ops, num_ops))
  for a, b in itertools.product(range(num_ops), repeat=2):
    exact[a, b] = np.exp(_log_prob(params, jnp.asarray([a, b]), mask).log_prob)
  np.testing.assert_allclose(exact.sum(), 1.0, atol=1e-5)
  np.testing.assert_allclose(counts / counts.sum(), exact, atol=0.01)
  # The policy is context dependent: p(a_1 | a_0) differs across a_0.
  conditionals = exact / exact.sum(1, keepdims=True)
  assert np.abs(conditionals[0] - conditionals[1]).max() > 0.02


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_masked_ops_are_never_sampled(seed):
  """2,000 samples from a peaked policy: every sampled op is allowed at its node, and each
  allowed op does appear (the mask does not over-restrict)."""
  num_nodes = 12
  mask = _random_mask(seed, num_nodes)
  params = _peaked_params(seed, scale=3.0)
  s = _sample_many(params, jax.random.split(jax.random.key(seed), 2000), mask)
  archs = np.asarray(s.arch)
  chex.assert_shape(archs, (2000, num_nodes))
  allowed = np.asarray(mask)[np.arange(num_nodes), archs]
  assert allowed.all()
  assert np.all(np.isfinite(np.asarray(s.log_prob)))
  # Node 0 allows a single op: it is always chosen.
  assert (archs[:, 0] == int(np.argmax(mask[0]))).all()


@pytest.mark.parametrize('seed', [0, 1])
def test_uniform_sample_respects_mask_and_is_uniform(seed):
  """Pretraining sampler: each node's op is uniform over the node's allowed ops."""
  num_nodes, n = 8, 6000
  mask = np.asarray(_random_mask(seed, num_nodes, density=0.6))
  archs = jax.jit(jax.vmap(controller.uniform_sample, in_axes=(0, None)))(
      jax.random.split(jax.random.key(seed), n), jnp.asarray(mask))
  chex.assert_shape(archs, (n, num_nodes))
  assert archs.dtype == jnp.int32
  archs = np.asarray(archs)
  assert mask[np.arange(num_nodes), archs].all()
  for j in range(num_nodes):
    freq = np.bincount(archs[:, j], minlength=K) / n
    expected = mask[j] / mask[j].sum()
    np.testing.assert_allclose(freq, expected, atol=0.03, err_msg=f'node {j}')


def test_uniform_sample_resnet_space_mask():
  """With the ResNet-18-16 'paper' mask, conv5x5 never appears and the 5 others do."""
  mask = jnp.asarray(space.resnet_space('resnet18', 'conv').candidate_mask())
  archs = np.asarray(jax.vmap(controller.uniform_sample, in_axes=(0, None))(
      jax.random.split(jax.random.key(0), 500), mask))
  assert set(np.unique(archs)) == {0, 2, 3, 4, 5}


# ---------------------------------------------------------------------------
# most_likely and entropy.


def _greedy_reference(params, mask):
  """Greedy decoding by hand: at node j, argmax of the teacher-forced log-softmax given
  the greedy choices of nodes < j (log_probs at node j depends only on ops < j)."""
  num_nodes = mask.shape[0]
  arch = np.zeros(num_nodes, np.int32)
  for j in range(num_nodes):
    log_p = _log_probs(params, jnp.asarray(arch), mask)
    arch[j] = int(jnp.argmax(log_p[j]))
  return arch


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_most_likely_is_argmax_decoding(seed):
  mask = _random_mask(seed, 9)
  params = _peaked_params(seed)
  s = _most_likely(params, mask)
  np.testing.assert_array_equal(np.asarray(s.arch), _greedy_reference(params, mask))
  assert np.asarray(mask)[np.arange(9), np.asarray(s.arch)].all()
  chex.assert_trees_all_close(s, _log_prob(params, s.arch, mask), atol=1e-5)
  # Each greedy step takes the most likely op of its conditional: its log-prob is the max.
  log_p = _log_probs(params, s.arch, mask)
  chex.assert_trees_all_close(jnp.take_along_axis(log_p, s.arch[:, None], 1)[:, 0],
                              jnp.max(log_p, axis=1))


@pytest.mark.parametrize('scale', [1.0, 10.0])
def test_entropy_bounds(scale):
  """0 <= H_j <= log(#allowed ops at j); H_j = -sum p log p over the allowed ops;
  a node with one allowed op has zero entropy; sample_entropy is the chosen ops' share."""
  num_nodes = 10
  mask = _random_mask(5, num_nodes)
  params = _peaked_params(5, scale=scale)
  s = _sample(params, jax.random.key(0), mask)
  entropy = np.asarray(s.entropy)
  allowed = np.asarray(mask).sum(-1)
  assert np.all(entropy >= -1e-6)
  assert np.all(entropy <= np.log(allowed) + 1e-5)
  np.testing.assert_allclose(entropy[0], 0.0, atol=1e-6)
  log_p = np.asarray(_log_probs(params, s.arch, mask), np.float64)
  p = np.exp(log_p)
  manual = -np.sum(np.where(np.asarray(mask), p * log_p, 0.0), -1)
  np.testing.assert_allclose(entropy, manual, atol=1e-5)
  chosen = log_p[np.arange(num_nodes), np.asarray(s.arch)]
  np.testing.assert_allclose(s.sample_entropy, np.sum(-chosen * np.exp(chosen)), atol=1e-5)
  if scale == 1.0:  # near-uniform init: close to the maximum
    np.testing.assert_allclose(entropy, np.log(allowed), atol=0.05)
  else:  # peaked: strictly below it somewhere
    assert np.any(entropy < np.log(allowed) - 0.1)


def test_sample_entropy_has_no_gradient_but_log_prob_does():
  mask = _random_mask(6, 5)
  params = controller.init(jax.random.key(0), K)
  arch = controller.uniform_sample(jax.random.key(1), mask)
  g_ent, g_lp = jax.jit(lambda p: (
      jax.grad(lambda q: controller.log_prob(q, arch, mask).sample_entropy)(p),
      jax.grad(lambda q: controller.log_prob(q, arch, mask).log_prob)(p)))(params)
  for leaf in jax.tree.leaves(g_ent):
    assert float(jnp.max(jnp.abs(leaf))) == 0.0
  assert all(float(jnp.max(jnp.abs(leaf))) > 0.0 for leaf in jax.tree.leaves(g_lp))


# ---------------------------------------------------------------------------
# The controller learns a planted reward.

# Optimiser: ENAS's Adam (beta1 = 0, eps = 1e-3) with lr 5e-3 instead of ENAS's 1e-3,
# to converge within a unit-test budget.
LEARN_LR = 5e-3
LEARN_DECAY = 0.9        # EMA baseline decay (ENAS: 0.99; 0.9 tracks the rising reward faster)
LEARN_SAMPLES = 20       # architectures per update (ENAS's num_aggregate)
LEARN_NODES = 10
# Controller weights drawn from U(-1, 1) instead of ENAS's U(-0.1, 0.1). With the small init
# the LSTM's hidden states are nearly identical at every node, so the first updates push all
# nodes towards the ops most frequent in the target, the logits saturate at +-1.5 (tanh) and
# some nodes freeze on a wrong op. Measured with 16 nodes and 8 random problems: 6,000
# updates at lr 1e-3 / 3e-3 / 5e-3 solved at most 1 of 8 (the rest stayed at 44-81% of
# nodes); 3,000 updates at lr 1e-2 / 3e-2 solved 1-4 of 8.
# With U(-1, 1), lr 5e-3 and 10 nodes, 40 of 40 random problems reached >= 90% within
# 1,028 updates (median ~100); this test's problem takes 44 updates (bound: 1,500).
LEARN_INIT_RANGE = 1.0
LEARN_MAX_UPDATES = 1500
LEARN_CHUNK = 100         # updates per jitted lax.scan call


def test_controller_learns_planted_target():
  """REINFORCE with ENAS's EMA baseline teaches the controller a hidden architecture.

  Reward = fraction of nodes whose op equals a hidden random target (allowed by the mask).
  Each update samples 20 architectures, computes EMA advantages, and takes an Adam step on
  the gradient of mean_i -log p(tau_i) A_i. Within LEARN_MAX_UPDATES updates, greedy
  decoding must match >= 90% of the target's nodes.
  """
  num_nodes = LEARN_NODES
  mask = _random_mask(7, num_nodes, density=0.6)
  target = controller.uniform_sample(jax.random.key(1234), mask)
  assert np.asarray(mask)[np.arange(num_nodes), np.asarray(target)].all()
  tx = optax.adam(LEARN_LR, b1=0.0, eps=1e-3)
  params = controller.init(jax.random.key(0), K, init_range=LEARN_INIT_RANGE)

  def reward(arch):
    return jnp.mean((arch == target).astype(jnp.float32))

  def update(carry, key):
    params, opt_state, baseline = carry
    keys = jax.random.split(key, LEARN_SAMPLES)
    archs = jax.vmap(lambda k: controller.sample(params, k, mask).arch)(keys)
    rewards = jax.vmap(reward)(archs)
    baseline, advantages = reinforce.ema_advantages(baseline, rewards, LEARN_DECAY)

    def loss_fn(p):
      log_probs = jax.vmap(lambda a: controller.log_prob(p, a, mask).log_prob)(archs)
      return reinforce.reinforce_loss(log_probs, advantages)

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    accuracy = reward(controller.most_likely(params, mask).arch)
    return (params, opt_state, baseline), (accuracy, jnp.mean(rewards))

  @jax.jit
  def run_chunk(carry, key):
    return jax.lax.scan(update, carry, jax.random.split(key, LEARN_CHUNK))

  carry = (params, tx.init(params), jnp.float32(0.0))
  initial = float(reward(_most_likely(params, mask).arch))
  accuracies, mean_rewards = [], []
  key = jax.random.key(99)
  while len(accuracies) < LEARN_MAX_UPDATES:
    key, sub = jax.random.split(key)
    carry, (acc, mean_reward) = run_chunk(carry, sub)
    accuracies.extend(np.asarray(acc).tolist())
    mean_rewards.extend(np.asarray(mean_reward).tolist())
    if max(accuracies) >= 0.9:
      break
  accuracies = np.asarray(accuracies)
  solved = np.flatnonzero(accuracies >= 0.9)
  assert solved.size, (f'not learned in {len(accuracies)} updates: greedy accuracy '
                       f'{initial:.2f} -> {accuracies[-1]:.2f}, max {accuracies.max():.2f}')
  first = int(solved[0]) + 1
  assert first <= LEARN_MAX_UPDATES
  assert initial < 0.6  # the target was not already the greedy architecture
  # The sampled reward rose too, not only the greedy decode.
  assert np.mean(mean_rewards[-20:]) > np.mean(mean_rewards[:20]) + 0.2
