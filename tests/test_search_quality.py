"""Tests of what makes a search find something: the cost-aware reward, the refinement
prior (sampling near the base network) and random search as a method.

Planted rewards (fixed functions of the architecture) drive the real controller
update, :func:`nar_jax.train.make_policy_update`, as the pipeline builds it.
"""

from __future__ import annotations

import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import config as config_lib
from nar_jax import controller, joint, ops, policy, reinforce, space, train
from tests.test_pipeline import read_json, read_metrics, records, run_tiny, tiny_config
import model_testing

QUICKSTART_SPACE = space.resnet_space('resnet18', 'conv', 0.125, 'paper')
MNIST = dict(image_hw=(28, 28), in_channels=1, num_classes=10)


def _random_archs(sp, count, seed=0):
  rng = np.random.default_rng(seed)
  return [tuple(int(rng.choice(np.flatnonzero(m))) for m in sp.candidate_mask())
          for _ in range(count)]


# ---------------------------------------------------------------------------------------
# MACs inside the jitted update.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('sp,hw,channels,classes,embedding', [
    (QUICKSTART_SPACE, (28, 28), 1, 10, None),
    (space.resnet_space('resnet18', 'block', 0.25, 'all'), (32, 32), 3, 10, None),
    (space.resnet_space('resnet20_wide', 'conv', 0.125, 'paper'), (32, 32), 3, 0, 64),
    (space.ir_space(18, 1 / 16), (32, 32), 3, 0, None),
])
def test_macs_model_equals_the_analytic_counts(sp, hw, channels, classes, embedding):
  macs = jax.jit(model_testing.macs_model(sp, hw, channels, classes, embedding))
  for arch in _random_archs(sp, 12) + [sp.baseline()]:
    exact = model_testing.count_architecture(sp, arch, hw, channels, classes, embedding).macs
    np.testing.assert_allclose(float(macs(jnp.asarray(arch))), exact, rtol=1e-6)


def test_macs_model_of_the_joint_space_counts_the_reductions_its_skips_need():
  sp = joint.joint_space(6, 8)
  macs = jax.jit(model_testing.macs_model(sp, (28, 28), 1, 10))
  mask = jnp.asarray(sp.candidate_mask())
  seen = set()
  for i in range(16):
    arch = tuple(int(a) for a in controller.uniform_sample_joint(jax.random.key(i), mask))
    exact = model_testing.count_architecture(sp, arch, (28, 28), 1, 10).macs
    seen.add(exact)
    np.testing.assert_allclose(float(macs(jnp.asarray(arch))), exact, rtol=1e-6)
  assert len(seen) > 8  # the architectures differ in their costs


# ---------------------------------------------------------------------------------------
# The cost-aware reward.
# ---------------------------------------------------------------------------------------


def test_cost_aware_reward_is_mnasnets_formula_on_hand_made_architectures():
  names = [['conv3x3'] * 16, ['sep3x3'] * 16, ['conv3x3'] * 8 + ['max3x3'] * 8,
           ['sep5x5', 'avg3x3'] * 8]
  archs = [QUICKSTART_SPACE.validate(n) for n in names]
  macs_of = model_testing.macs_model(QUICKSTART_SPACE, **MNIST)
  target, weight = 0.7 * model_testing.count_architecture(QUICKSTART_SPACE, archs[0], **MNIST).macs, -0.07
  accuracy = np.array([0.9, 0.8, 0.85, 0.7])
  exact_macs = np.array([model_testing.count_architecture(QUICKSTART_SPACE, a, **MNIST).macs
                         for a in archs], np.float64)
  expected = accuracy * np.power(exact_macs / target, weight)
  got = reinforce.cost_aware_reward(jnp.asarray(accuracy, jnp.float32),
                                    jax.vmap(macs_of)(jnp.asarray(archs)), target, weight)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5)
  # At the target the accuracy is kept; cheaper networks gain, dearer ones lose.
  np.testing.assert_allclose(reinforce.cost_aware_reward(0.5, target, target, weight), 0.5)
  assert expected[1] / accuracy[1] > 1 > expected[0] / accuracy[0]
  # MnasNet's hard constraint: no gain below the target, accuracy * T / MACs above it.
  hard = reinforce.cost_aware_reward(jnp.asarray(accuracy, jnp.float32),
                                     jnp.asarray(exact_macs, jnp.float32), target, -1.0, 0.0)
  expected_hard = np.where(exact_macs <= target, accuracy, accuracy * target / exact_macs)
  np.testing.assert_allclose(np.asarray(hard), expected_hard, rtol=1e-5)
  assert (exact_macs <= target).any() and (exact_macs > target).any()


def _planted_update(pol, reward_of, cost, lr=0.05, entropy_weight=0.0):
  tx = optax.adam(lr, b1=0.0, eps=1e-3)
  reward_fn = lambda variables, archs, images, targets: jax.vmap(reward_of)(archs)
  return tx, train.make_policy_update(pol, tx, reward_fn, entropy_weight=entropy_weight,
                                      baseline_decay=0.9, cost=cost)


def _quickstart_search(target_fraction):
  """``(policy, macs_of, cost)``: an ENAS policy over the quickstart space and MnasNet's
  soft constraint at ``target_fraction`` of the baseline's MACs."""
  pol = policy.operator_policy(QUICKSTART_SPACE.candidate_mask(), 1.5, 16)
  macs_of = model_testing.macs_model(QUICKSTART_SPACE, **MNIST)
  baseline_macs = float(macs_of(jnp.asarray(QUICKSTART_SPACE.baseline())))
  return pol, macs_of, reinforce.CostReward(macs_of, target_fraction * baseline_macs, -0.07, -0.07)


def test_the_update_rewards_each_sample_with_its_cost_factor():
  pol, _, cost = _quickstart_search(0.5)
  accuracy_of = lambda arch: jnp.mean(arch == 0).astype(jnp.float32)  # conv3x3 everywhere = 1
  tx, update = _planted_update(pol, accuracy_of, cost, entropy_weight=0.01)
  state = train.controller_state(pol.init(jax.random.key(0)), tx)
  dummy = jnp.zeros((8, 1))
  key = jax.random.key(3)
  _, metrics = update(state, None, dummy, dummy, key)
  # The same samples, drawn as the update draws them.
  samples = jax.vmap(lambda k: pol.sample(state.params, k))(jax.random.split(key, 8))
  archs = np.asarray(samples.arch)
  exact_macs = np.array([model_testing.count_architecture(QUICKSTART_SPACE, tuple(a), **MNIST).macs
                         for a in archs], np.float64)
  accuracy = np.mean(archs == 0, axis=1)
  expected = (accuracy * (exact_macs / cost.target_macs) ** cost.weight
              + 0.01 * np.asarray(samples.sample_entropy))
  np.testing.assert_allclose(metrics['reward'], expected.mean(), rtol=1e-5)
  np.testing.assert_allclose(metrics['valid_acc'], accuracy.mean(), rtol=1e-6)
  np.testing.assert_allclose(metrics['macs'], exact_macs.mean(), rtol=1e-6)


def test_the_cost_aware_reward_moves_a_planted_search_toward_cheaper_ops():
  """Every architecture is equally accurate: only the cost term can teach anything."""
  pol, macs_of, cost = _quickstart_search(0.7)
  dummy = jnp.zeros((20, 1))

  def mean_sampled_macs(cost):
    tx, update = _planted_update(pol, lambda arch: jnp.float32(0.9), cost)
    state = train.controller_state(pol.init(jax.random.key(0)), tx)
    for u in range(60):
      state, _ = update(state, None, dummy, dummy, jax.random.key(u))
    sampled = jax.vmap(lambda k: pol.sample(state.params, k).arch)(
        jax.random.split(jax.random.key(99), 200))
    return float(jnp.mean(jax.vmap(macs_of)(sampled)))

  untrained = jax.vmap(lambda k: pol.sample(pol.init(jax.random.key(0)), k).arch)(
      jax.random.split(jax.random.key(99), 200))
  start = float(jnp.mean(jax.vmap(macs_of)(untrained)))
  with_cost, without_cost = mean_sampled_macs(cost), mean_sampled_macs(None)
  assert with_cost < 0.8 * start, (with_cost, start)
  assert with_cost < 0.8 * without_cost, (with_cost, without_cost)


# ---------------------------------------------------------------------------------------
# The refinement prior: sampling near the base network.
# ---------------------------------------------------------------------------------------


def test_original_prior_gives_the_original_op_its_probability():
  mask = QUICKSTART_SPACE.candidate_mask().copy()
  mask[3] = False
  mask[3, ops.OP_NAMES.index('conv3x3')] = True           # a node with one candidate
  original = QUICKSTART_SPACE.baseline()
  prior = controller.original_prior(mask, original, 0.6)
  probs = jax.nn.softmax(jnp.where(mask, prior, -1e9), axis=-1)
  for j, op in enumerate(original):
    others = mask[j].sum() - 1
    expected = 1.0 if others == 0 else 0.6
    np.testing.assert_allclose(probs[j, op], expected, rtol=1e-5)
    if others:
      rest = np.asarray(probs[j])[mask[j]]
      np.testing.assert_allclose(np.sort(rest)[:-1], 0.4 / others, rtol=1e-5)
  # Below 1/K a node stays uniform; out-of-range probabilities are refused.
  np.testing.assert_array_equal(controller.original_prior(mask, original, 0.1), 0.0)
  with pytest.raises(ValueError, match='original_prob'):
    controller.original_prior(mask, original, 1.0)


def test_pretraining_and_the_untrained_controller_sample_near_the_base_network():
  mask = QUICKSTART_SPACE.candidate_mask()
  original = np.asarray(QUICKSTART_SPACE.baseline())
  pol = policy.operator_policy(mask, prior=controller.original_prior(mask, original, 0.6))
  keys = jax.random.split(jax.random.key(0), 2000)
  uniform = np.asarray(jax.vmap(pol.uniform)(keys))
  params = pol.init(jax.random.key(1))
  sampled = np.asarray(jax.vmap(lambda k: pol.sample(params, k).arch)(keys))
  for draws in (uniform, sampled):
    kept = np.mean(draws == original, axis=0)
    np.testing.assert_allclose(kept, 0.6, atol=0.06)       # every node, 2000 draws
  # The sampler and the scorer agree with the prior in place.
  s = pol.sample(params, keys[0])
  np.testing.assert_allclose(pol.score(params, s.arch).log_prob, s.log_prob, rtol=1e-5)
  # Without a prior the policy is exactly ENAS's (no offsets anywhere).
  plain = policy.operator_policy(mask)
  np.testing.assert_array_equal(plain.sample(params, keys[0]).arch,
                                controller.sample(params, keys[0], jnp.asarray(mask)).arch)


# ---------------------------------------------------------------------------------------
# Random search and the config.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def random_run(tmp_path_factory, compile_cache):
  workdir = str(tmp_path_factory.mktemp('random'))
  run_tiny(tiny_config(**{'search.method': 'random', 'search.cost.target_macs': 0.8,
                          'search.controller.original_prob': 0.5}), workdir)
  return workdir


def test_random_search_keeps_the_best_of_its_samples(random_run):
  derive = read_json(os.path.join(random_run, 'results', 'derive.json'))
  candidates = derive['candidates']
  assert all(c['source'].startswith('random_') for c in candidates)
  assert len({tuple(c['op_indices']) for c in candidates}) == len(candidates)
  best = max(candidates, key=lambda c: c['score'])
  assert derive['best'] == best
  # The score is the cost-aware reward of the candidate's accuracy and MACs.
  report = read_json(os.path.join(random_run, 'report.json'))
  target = report['search']['cost']['target_macs']
  for c in candidates:
    np.testing.assert_allclose(c['score'], c['valid_acc'] * (c['macs'] / target) ** -0.07,
                               rtol=1e-6)
  assert report['refined']['macs'] == best['macs']
  np.testing.assert_allclose(report['search']['cost']['refined_macs_over_target'],
                             best['macs'] / target)
  # No controller learns: no update is logged, the child epochs ran.
  metrics = read_metrics(random_run)
  assert not records(metrics, 'controller')
  assert len(records(metrics, 'search')) == tiny_config().search.epochs


@pytest.mark.parametrize('field,value,message', [
    ('search.method', 'grid', 'search.method'),
    ('search.cost.target_macs', -1.0, 'target_macs'),
    ('search.controller.original_prob', 1.0, 'original_prob'),
])
def test_bad_search_fields_are_named(field, value, message):
  c = tiny_config(**{field: value})
  with pytest.raises(ValueError, match=message):
    config_lib.validate(c)


def test_joint_space_refuses_the_prior_and_alternating_refuses_the_cost():
  c = tiny_config(**{'model.base': 'enas_macro', 'search.controller.original_prob': 0.5})
  with pytest.raises(ValueError, match='original_prob'):
    config_lib.validate(c)
  c = tiny_config(**{'model.base': 'enas_macro', 'search.method': 'alternating',
                     'search.cost.target_macs': 0.5})
  with pytest.raises(ValueError, match='cost'):
    config_lib.validate(c)
