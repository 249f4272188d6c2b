"""Does the controller learn? Planted-target searches, the entropy bonus and ENAS's defaults.

Every search config's default controller must find a planted per-node target within
its own update budget, through the update the pipeline runs
(``train.make_policy_update`` with ``Networks.policy``'s policy and the
config's optimizer, entropy weight, baseline decay and samples per update). The
entropy bonus must enter the rewards with its sign; ``config.enas_controller()``
must stay ENAS's recipe and kind ``'enas'`` the original controller's numerics.
"""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from config_testing import load_config

from nar_jax import config as config_lib
from nar_jax import controller, families, joint, planted, policy, space, tasks, train
from nar_jax.phases.context import Networks

SEARCH_CONFIGS = [
    ('quickstart', None), ('cifar_resnet18', None), ('cifar_resnet18', 'pretrain'),
    ('cifar_resnet18_block', None), ('cifar_resnet18_block', 'pretrain'),
    ('face_lresnet50e_ir', None), ('face_lresnet50e_ir', 'proxy'),
    ('face_lresnet50e_ir', 'pretrain'), ('cifar_nasarch', None), ('cifar_alternating', None),
]
"""Every config file and variant that searches with its full budget (the smoke variants
shrink the search to a few updates to exercise the pipeline, not to find anything)."""


def _controller_search(name, variant):
  """``(policy, args, budget, controller config)`` of a config's search, built as the
  pipeline builds them; the alternating search's operator phase with its per-phase
  budget, forced to the baseline's skips as its first phase is."""
  cfg = load_config(name, variant)
  family = families.family_for(cfg)
  nets = Networks(cfg, family, tasks.task_for(cfg, family), family.space(cfg), None)
  c = cfg.search.controller
  if cfg.search.method == 'alternating':
    return (nets.policy('operators'), (jnp.asarray(nets.space.baseline(), jnp.int32),),
            cfg.alternating.epochs_per_phase * c.updates_per_epoch, c)
  return nets.policy(), (), cfg.search.epochs * c.updates_per_epoch, c


def _dedupe(configs):
  """One ``(name, variant)`` per distinct (policy, mask, budget, controller settings)."""
  seen, kept = set(), []
  for name, variant in configs:
    pol, args, budget, c = _controller_search(name, variant)
    cfg = load_config(name, variant)
    signature = (pol.kind, pol.search, families.build_space(cfg).candidate_mask().tobytes(),
                 budget, tuple(sorted(c.items())))
    if signature not in seen:
      seen.add(signature)
      kept.append((name, variant))
  return kept


@pytest.mark.parametrize('name,variant', _dedupe(SEARCH_CONFIGS),
                         ids=lambda x: x or 'default')
def test_default_controller_finds_a_planted_per_node_target_within_its_budget(name, variant):
  """A per-node random target: the greedy decode matches >= 90% of the nodes before the
  config's search would end."""
  pol, args, budget, c = _controller_search(name, variant)
  mask = families.build_space(load_config(name, variant)).candidate_mask()
  result = planted.planted_search(
      pol, train.controller_optimizer(c), planted.random_target(mask, seed=0), budget=budget,
      num_aggregate=c.num_aggregate, entropy_weight=c.entropy_weight,
      baseline_decay=c.baseline_decay, args=args)
  assert result.updates is not None, (
      f'{name}: greedy decode matches {result.match:.0%} of the nodes after {budget} updates')
  assert result.match >= 0.9


# ---------------------------------------------------------------------------
# The entropy bonus.

_MASK = space.resnet_space('resnet18', 'conv', 0.125, 'paper').candidate_mask()
_POLICY = policy.operator_policy(_MASK)


@jax.jit
def _sample_entropies(params, keys):
  """float (K,) ``sample_entropy`` of one architecture drawn with each of ``keys`` (K,);
  jitted once for the module (an eager vmap of the sampler's scan compiles at every call)."""
  return jax.vmap(lambda k: _POLICY.sample(params, k))(keys).sample_entropy


def _constant_reward(value):
  return lambda variables, archs, images, targets: jnp.full(archs.shape[:1], value)


def _bonus_after(entropy_weight, updates=10, num_aggregate=10):
  """Mean ENAS entropy bonus (``sample_entropy``: ``sum_j -p(a_j) log p(a_j)`` of the
  sampled ops) of fresh samples after ``updates`` updates on a zero accuracy, so the
  bonus is the only reward."""
  tx = train.controller_optimizer(_settings(lr=0.05))
  state = train.controller_state(_POLICY.init(jax.random.key(0)), tx)
  if updates:
    update = train.make_policy_update(_POLICY, tx, _constant_reward(0.0),
                                      entropy_weight=entropy_weight, baseline_decay=0.9)
    slots = jnp.zeros((num_aggregate, 1))
    for step in range(updates):
      state, _ = update(state, None, slots, slots, jax.random.key(step))
  return float(jnp.mean(_sample_entropies(state.params, jax.random.split(jax.random.key(99), 200))))


def _settings(**overrides):
  c = config_lib.enas_controller()
  c.update(overrides)
  return c


def test_entropy_bonus_is_maximised_with_a_positive_weight_and_minimised_with_a_negative():
  """With no accuracy signal the bonus is the only reward: a positive weight raises it
  above the initial policy's and above what a negative weight leaves.

  ENAS's bonus is not the entropy: its expectation ``sum_k p_k^2 (-log p_k)`` is larger
  for two ops at 1/2 (0.35) than for five uniform ops (0.32), so raising it can lower
  the entropy, and near the uniform softmax a negative weight barely moves it."""
  raised, lowered = _bonus_after(1.0), _bonus_after(-1.0)
  assert raised > _bonus_after(1.0, updates=0) + 0.05
  assert raised > lowered + 0.05


def test_reported_reward_is_accuracy_plus_weighted_sample_entropy(entropy_weight=0.5):
  """``reward`` = mean(accuracy + weight x sample entropy) of the update's own samples."""
  tx = train.controller_optimizer(_settings())
  update = train.make_policy_update(_POLICY, tx, _constant_reward(0.25),
                                    entropy_weight=entropy_weight, baseline_decay=0.99)
  state = train.controller_state(_POLICY.init(jax.random.key(1)), tx)
  key, num_aggregate = jax.random.key(2), 8
  slots = jnp.zeros((num_aggregate, 1))
  _, metrics = update(state, None, slots, slots, key)
  entropies = _sample_entropies(state.params, jax.random.split(key, num_aggregate))
  chex.assert_trees_all_close(metrics['valid_acc'], 0.25)
  chex.assert_trees_all_close(
      metrics['reward'], 0.25 + entropy_weight * jnp.mean(entropies), rtol=1e-5)
  assert float(jnp.mean(entropies)) > 0.1


# ---------------------------------------------------------------------------
# ENAS's controller.


def test_enas_controller_is_enas_recipe():
  c = config_lib.enas_controller()
  assert c.to_dict() == dict(kind='enas', hidden=64, init_range=0.1, tanh_constant=1.5,
                             entropy_weight=1e-4, baseline_decay=0.99, lr=1e-3, beta1=0.0,
                             eps=1e-3, num_aggregate=20)
  base = config_lib.base_config().search.controller
  assert {k: base[k] for k in c} == c.to_dict()


# Drawn with the controller before variants existed (commit 6f903af): ``init(key(0), 6)``
# then ``sample(params, key(1), _MASK)``, and ``init_joint(key(0), 6)`` then
# ``sample_joint(params, key(1), 6 x 6 all-allowed mask)``.
_ENAS_ARCH = [5, 4, 5, 2, 5, 5, 2, 0, 2, 2, 0, 3, 5, 4, 0, 2]
_ENAS_LOG_PROB, _ENAS_SAMPLE_ENTROPY = -25.723430633544922, 5.153543949127197
_ENAS_JOINT_ARCH = [5, 4, 1, 5, 0, 0, 2, 0, 0, 0, 5, 0, 1, 0, 1, 5, 0, 1, 1, 1, 1]
_ENAS_JOINT_LOG_PROB = -21.157516479492188


def test_kind_enas_reproduces_the_original_controller_numerics():
  pol = policy.operator_policy(_MASK, controller_kind='enas')
  params = pol.init(jax.random.key(0))
  assert set(params) == {'lstm_kernel', 'start_embedding', 'op_embedding', 'softmax_kernel'}
  drawn = pol.sample(params, jax.random.key(1))
  np.testing.assert_array_equal(drawn.arch, _ENAS_ARCH)
  np.testing.assert_allclose(drawn.log_prob, _ENAS_LOG_PROB, rtol=1e-6)
  np.testing.assert_allclose(drawn.sample_entropy, _ENAS_SAMPLE_ENTROPY, rtol=1e-6)


def test_kind_enas_reproduces_the_original_joint_controller_numerics():
  pol = policy.joint_policy(joint.joint_space(6, 8), controller_kind='enas')
  params = pol.init(jax.random.key(0))
  drawn = pol.sample(params, jax.random.key(1))
  np.testing.assert_array_equal(drawn.arch, _ENAS_JOINT_ARCH)
  np.testing.assert_allclose(drawn.log_prob, _ENAS_JOINT_LOG_PROB, rtol=1e-6)


def test_node_aware_adds_node_parameters_and_starts_from_enas_weights():
  """Same ENAS weights for the same key, plus a node embedding and a zero logit bias."""
  enas = policy.operator_policy(_MASK).init(jax.random.key(0))
  aware = policy.operator_policy(_MASK, controller_kind='node_aware').init(jax.random.key(0))
  chex.assert_trees_all_equal({k: aware[k] for k in enas}, enas)
  chex.assert_shape(aware['node_embedding'], (_MASK.shape[0], 64))
  chex.assert_trees_all_equal(aware['node_bias'], jnp.zeros(_MASK.shape))


def test_unknown_controller_kind_is_rejected_naming_the_field():
  cfg = config_lib.base_config()
  cfg.search.controller.kind = 'lstm2'
  with pytest.raises(ValueError, match='search.controller.kind'):
    config_lib.validate(cfg)
  with pytest.raises(ValueError, match='lstm2'):
    policy.operator_policy(_MASK, controller_kind='lstm2')


def test_config_kinds_are_the_controller_variants():
  assert set(config_lib.CONTROLLER_KINDS) == set(controller.VARIANTS)
