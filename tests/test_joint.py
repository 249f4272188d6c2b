"""Tests for the joint (operator + skip) search: nar_jax.joint, the joint controller, the
ENAS macro supernet / fixed network and the eq. 3-7 diagnostics.

Networks are small (6 layers of 8 channels on 8x8 images); their variables come from
``jax.eval_shape(init)`` filled with random values (as in test_models.py), so a wrong
branch, skip or statistic shows in the outputs.
"""

import dataclasses
import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import controller, joint, ops, reinforce
from nar_jax.models import macro, nodes

from model_testing import random_variables, leaf_paths, assert_gradients_follow_mask

K = len(ops.OP_NAMES)
NUM_CLASSES = 5
IMAGE_SHAPE = (4, 8, 8, 3)
TOL = dict(atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------
# Encoding and space.


def test_encoding_positions_by_hand():
  """L = 3: [op0, op1, S10, op2, S20, S21]."""
  assert joint.arch_length(3) == 6
  np.testing.assert_array_equal(joint.op_positions(3), [0, 1, 3])
  np.testing.assert_array_equal(joint.skip_pairs(3), [[1, 0], [2, 0], [2, 1]])
  np.testing.assert_array_equal(joint.skip_positions(3), [2, 4, 5])
  np.testing.assert_array_equal(joint.is_op_position(3), [1, 1, 0, 1, 0, 0])
  ops_, skips = joint.split(np.array([5, 4, 1, 3, 0, 1]), 3)
  np.testing.assert_array_equal(ops_, [5, 4, 3])
  np.testing.assert_array_equal(skips, [[0, 0, 0], [1, 0, 0], [0, 1, 0]])
  assert [joint.num_layers_of(n) for n in (1, 3, 6, 78)] == [1, 2, 3, 12]
  with pytest.raises(ValueError, match='L \\(L \\+ 1\\) / 2 entries'):
    joint.num_layers_of(5)
  with pytest.raises(ValueError, match='3 layers has 6 entries'):
    joint.split(np.zeros(5, np.int32), 3)


@pytest.mark.parametrize('num_layers', [1, 2, 5, 12])
def test_split_encode_round_trip_numpy_jax_batched(num_layers):
  rng = np.random.default_rng(num_layers)
  archs = rng.integers(0, 2, (3, joint.arch_length(num_layers)))
  archs[:, joint.op_positions(num_layers)] = rng.integers(0, K, (3, num_layers))
  ops_, skips = joint.split(archs, num_layers)
  chex.assert_shape([ops_, skips], [(3, num_layers), (3, num_layers, num_layers)])
  assert not np.triu(skips[0]).any()
  np.testing.assert_array_equal(joint.encode(ops_, skips), archs)
  j_ops, j_skips = jax.jit(lambda a: joint.split(a, num_layers))(jnp.asarray(archs))
  np.testing.assert_array_equal(j_ops, ops_)
  np.testing.assert_array_equal(j_skips, skips)
  np.testing.assert_array_equal(jax.jit(joint.encode)(j_ops, j_skips), archs)
  # Entries on and above the diagonal of skips are ignored by encode.
  np.testing.assert_array_equal(joint.encode(ops_, skips + np.triu(np.ones_like(skips[0]))),
                                archs)


def test_space_defaults_follow_enas():
  sp = joint.joint_space()
  assert (sp.num_layers, sp.channels, sp.candidates, sp.pool_layers) == (12, 36, ops.OP_NAMES,
                                                                         (3, 7))
  assert sp.arch_length == 78
  assert [sp.stage_of(j) for j in range(12)] == [0] * 4 + [1] * 4 + [2] * 4
  assert sp.stage_channels(2) == 36
  assert joint.joint_space(6, 8, widen=True).stage_channels(2) == 32
  assert joint.joint_space(2, 3).pool_layers == ()
  mask = joint.joint_space(4, 8, candidates=('max3x3', 'conv3x3')).candidate_mask()
  chex.assert_shape(mask, (4, K))
  assert [ops.OP_NAMES[k] for k in np.flatnonzero(mask[3])] == ['conv3x3', 'max3x3']


def test_baseline_is_a_residual_chain_and_names_round_trip():
  sp = joint.joint_space(6, 8)
  base = sp.baseline()
  assert sp.validate(base) == base
  names = sp.names(base)
  assert names == [
      {'op': 'conv3x3', 'skips': []}, {'op': 'conv3x3', 'skips': ['stem']},
      {'op': 'conv3x3', 'skips': []}, {'op': 'conv3x3', 'skips': ['layer1']},
      {'op': 'conv3x3', 'skips': []}, {'op': 'conv3x3', 'skips': ['layer3']}]
  assert sp.validate(names) == base
  assert sp.validate(np.asarray(base)) == base
  readable = [{'op': 'sep5x5', 'skips': []}, {'op': 2, 'skips': ['stem']},
              {'op': 'avg3x3', 'skips': ['layer0', 'stem']}]
  flat = joint.joint_space(3, 8).validate(readable)
  assert flat == (3, 2, 1, 5, 1, 1)


@pytest.mark.parametrize('bad,pattern', [
    ([0] * 20, r'has 20 entries .* needs 21'),
    ([6] + [0] * 20, r'op index 6 at layer 0 is out of range'),
    ([0, 0, 2] + [0] * 18, r'skip bit of layer 1 from stem \(position 2\) must be 0 or 1, got 2'),
    ([0] * 11 + [-1] + [0] * 9,
     r'skip bit of layer 4 from stem \(position 11\)'),
    ([0.0] + [0] * 20, r'entry 0.0 at position 0 is not an int'),
    ([True] + [0] * 20, r'entry True at position 0 is not an int'),
])
def test_validate_rejects_malformed_flat_architectures(bad, pattern):
  with pytest.raises(ValueError, match=pattern):
    joint.joint_space(6, 8).validate(bad)


def test_validate_rejects_bad_readable_architectures_and_non_candidates():
  sp = joint.joint_space(3, 8, candidates=('conv3x3', 'max3x3'))
  ok = [{'op': 'conv3x3', 'skips': []}, {'op': 'max3x3', 'skips': []},
        {'op': 'conv3x3', 'skips': ['stem']}]
  assert sp.validate(ok) == (0, 4, 0, 0, 1, 0)
  cases = [
      (ok[:2], 'lists 2 layers but'),
      ([ok[0], ok[1], {'op': 'conv3x3'}], "exactly the keys 'op' and 'skips'"),
      ([ok[0], ok[1], {'op': 'conv3x3', 'skips': ['layer1']}],
       "layer 2 cannot skip from 'layer1'; its skip sources are stem, layer0"),
      ([ok[0], {'op': 'conv3x3', 'skips': ['stem', 'stem']}, ok[2]], "'stem' twice"),
      ([ok[0], {'op': 'conv9x9', 'skips': []}, ok[2]], "unknown op 'conv9x9'"),
      ([ok[0], {'op': 'sep3x3', 'skips': []}, ok[2]],
       "op 'sep3x3' at layer 1 is not a candidate; candidates: conv3x3, max3x3"),
  ]
  for bad, pattern in cases:
    with pytest.raises(ValueError, match=pattern):
      sp.validate(bad)


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(num_layers=0), 'num_layers must be >= 1'),
    (dict(channels=7), 'channels must be even'),
    (dict(pool_layers=(3, 1)), 'strictly increasing'),
    (dict(pool_layers=(5,)), r'pool layers must lie in \[0, 4\]'),
    (dict(candidates=()), 'at least one op'),
    (dict(candidates=('conv7x7',)), "unknown op 'conv7x7'"),
    (dict(candidates=('max3x3',)), "baseline op 'conv3x3' is not a candidate"),
])
def test_joint_space_rejects_bad_arguments(kwargs, pattern):
  args = dict(num_layers=6, channels=8) | kwargs
  with pytest.raises(ValueError, match=pattern):
    joint.joint_space(**args)


def test_needed_reductions_by_hand():
  """6 layers, pools after layers 1 and 3 (outputs x_0..x_2, then x_0..x_4 are reduced)."""
  skips = np.zeros((6, 6), np.int32)
  skips[3, 0] = 1   # layer 3 (between the pools) reads the stem: needed at pool 0 only
  skips[5, 1] = 1   # layer 5 reads x_1: needed at both pools
  needed = joint.needed_reductions(skips, (1, 3))
  np.testing.assert_array_equal(needed.astype(int), [[1, 1, 1, 0, 0, 0, 0],
                                                     [0, 1, 0, 0, 1, 0, 0]])
  np.testing.assert_array_equal(jax.jit(lambda s: joint.needed_reductions(s, (1, 3)))(skips),
                                needed)


# ---------------------------------------------------------------------------
# Joint controller.


def _peaked_joint(seed, num_ops=K, scale=10.0, hidden=64):
  return jax.tree.map(lambda p: scale * p, controller.init_joint(jax.random.key(seed), num_ops,
                                                                hidden))


def _mask(num_layers, seed=0):
  rng = np.random.default_rng(seed)
  mask = rng.random((num_layers, K)) < 0.6
  mask[np.arange(num_layers), rng.integers(0, K, num_layers)] = True
  return jnp.asarray(mask)


_sample_joint = jax.jit(controller.sample_joint)
_log_prob_joint = jax.jit(controller.log_prob_joint)
_log_probs_joint = jax.jit(controller.log_probs_joint)


def test_init_joint_shapes_and_range():
  params = controller.init_joint(jax.random.key(0), K)
  shapes = {k: v.shape for k, v in params.items()}
  assert shapes == {'lstm_kernel': (128, 256), 'start_embedding': (64,), 'op_embedding': (K, 64),
                    'softmax_kernel': (64, K), 'attn_w1': (64, 64), 'attn_w2': (64, 64),
                    'attn_v': (64,)}
  for name, p in params.items():
    assert float(jnp.max(jnp.abs(p))) <= 0.1, name
  assert float(jnp.max(jnp.abs(params['attn_w1']))) > 0.099
  assert not np.allclose(params['attn_w1'], params['attn_w2'])
  assert sorted(params) == sorted(n for g in controller.JOINT_PARAM_GROUPS.values() for n in g)


@pytest.mark.parametrize('seed', [0, 1])
def test_sample_joint_and_log_prob_joint_agree(seed):
  """The teacher-forced score of a sampled arch equals what sampling returned (all fields)."""
  num_layers = 7
  mask = _mask(num_layers, seed)
  params = _peaked_joint(seed)
  sp = joint.joint_space(num_layers, 8)
  for i in range(3):
    s = _sample_joint(params, jax.random.key(10 * seed + i), mask)
    chex.assert_shape(s.arch, (joint.arch_length(num_layers),))
    assert s.arch.dtype == jnp.int32
    chex.assert_shape([s.entropy, s.skip_entropy], [(num_layers,)] * 2)
    assert sp.validate(np.asarray(s.arch))  # ops and bits are in range
    assert np.asarray(mask)[np.arange(num_layers), np.asarray(joint.split(s.arch, 7)[0])].all()
    chex.assert_trees_all_close(s, _log_prob_joint(params, s.arch, mask), atol=1e-5)
    chex.assert_trees_all_close(s.log_prob, s.op_log_prob + s.skip_log_prob, atol=1e-6)
    assert float(s.op_log_prob) < 0 and float(s.skip_log_prob) < 0


def _reference_log_prob(params, arch, mask, tanh_constant=1.5):
  """ENAS's macro sampler written out as a Python loop (no scan): returns the summed
  op and skip log-probabilities of ``arch``."""
  num_layers = mask.shape[0]
  ops_, skips = joint.split(np.asarray(arch), num_layers)
  hidden = params['start_embedding'].shape[0]
  h = c = jnp.zeros(hidden)
  x = params['start_embedding']
  anchors, op_lp, skip_lp = [], 0.0, 0.0

  def cell(x, h, c):
    i, f, o, g = jnp.split(jnp.concatenate([x, h]) @ params['lstm_kernel'], 4)
    c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
    return jax.nn.sigmoid(o) * jnp.tanh(c), c

  for j in range(num_layers):
    h, c = cell(x, h, c)
    logits = jnp.where(mask[j], tanh_constant * jnp.tanh(h @ params['softmax_kernel']), -jnp.inf)
    op_lp += jax.nn.log_softmax(logits)[ops_[j]]
    h, c = cell(params['op_embedding'][ops_[j]], h, c)
    if j == 0:
      x = params['start_embedding']
    else:
      selected = []
      for t in range(j):
        q = params['attn_v'] @ jnp.tanh(anchors[t] @ params['attn_w1'] + h @ params['attn_w2'])
        p_skip = jax.nn.softmax(tanh_constant * jnp.tanh(jnp.stack([-q, q])))
        skip_lp += jnp.log(p_skip[skips[j, t]])
        if skips[j, t]:
          selected.append(anchors[t])
      x = sum(selected, jnp.zeros(hidden)) / (1 + len(selected))
    anchors.append(h)
  return op_lp, skip_lp


@pytest.mark.parametrize('seed', [0, 1])
def test_log_prob_joint_matches_a_python_loop_reference(seed):
  """Attention over anchors, 2-way skip logits, next input = mean of selected anchors."""
  num_layers = 4
  mask = _mask(num_layers, seed)
  params = _peaked_joint(seed, scale=5.0, hidden=8)
  arch = _sample_joint(params, jax.random.key(seed), mask).arch
  assert np.asarray(joint.split(arch, num_layers)[1]).sum() >= 2  # skips exercise the mean
  scored = _log_prob_joint(params, arch, mask)
  op_lp, skip_lp = _reference_log_prob(params, arch, mask)
  np.testing.assert_allclose([scored.op_log_prob, scored.skip_log_prob], [op_lp, skip_lp],
                             rtol=1e-5, atol=1e-5)


def test_joint_sampling_distribution_equals_scored_distribution():
  """2 layers, 2 ops: 8 joint architectures; sampled frequencies match exp(log_prob)."""
  params = controller.init_joint(jax.random.key(0), 2, hidden=8, init_range=1.0)
  mask = jnp.ones((2, 2), bool)
  archs = jax.jit(jax.vmap(lambda k: controller.sample_joint(params, k, mask).arch))(
      jax.random.split(jax.random.key(1), 20_000))
  codes = np.asarray(archs) @ np.array([4, 2, 1])
  freq = np.bincount(codes, minlength=8) / codes.size
  exact = np.array([np.exp(float(_log_prob_joint(params, jnp.asarray(a), mask).log_prob))
                    for a in itertools.product(range(2), repeat=3)])
  np.testing.assert_allclose(exact.sum(), 1.0, atol=1e-5)
  np.testing.assert_allclose(freq, exact, atol=0.01)
  assert exact.max() > 0.2  # a non-uniform policy, so the match is informative


def test_skip_penalty_hand_value():
  """ENAS: p = sigmoid(logits) on [-l, l], KL to [0.6, 0.4] summed over a layer's sources,
  averaged over layers 1..L-1."""
  kl = lambda l: sum(p * math.log(p / r) for p, r in
                     ((1 / (1 + math.exp(l)), 0.6), (1 / (1 + math.exp(-l)), 0.4)))
  logits = np.zeros((3, 3, 2), np.float32)
  for (j, t), l in {(1, 0): 0.5, (2, 0): -1.0, (2, 1): 1.2}.items():
    logits[j, t] = [-l, l]
  logits[0, 0] = logits[1, 2] = [3.0, -3.0]  # not skips: ignored
  want = (kl(0.5) + kl(-1.0) + kl(1.2)) / 2
  np.testing.assert_allclose(controller.skip_penalty(jnp.asarray(logits)), want, rtol=1e-6)
  # By hand: p = (0.37754, 0.62246); 0.37754 ln(0.37754/0.6) + 0.62246 ln(0.62246/0.4).
  np.testing.assert_allclose(kl(0.5), 0.100364, atol=1e-6)
  assert float(controller.skip_penalty(jnp.zeros((1, 1, 2)))) == 0.0
  # target 0.4 and l = logit(0.4) / 1 -> sigmoid(l) = 0.4: zero penalty.
  l = math.log(0.4 / 0.6)
  np.testing.assert_allclose(controller.skip_penalty(jnp.asarray([[[0, 0], [0, 0]],
                                                                  [[-l, l], [0, 0]]])), 0.0,
                             atol=1e-7)


def test_sampled_skip_penalty_matches_the_teacher_forced_skip_probabilities():
  """The sample's skip_penalty recomputed from log_probs_joint's p(S=1) = sigmoid(2l)."""
  mask = _mask(5, 3)
  params = _peaked_joint(3, scale=3.0)
  s = _sample_joint(params, jax.random.key(0), mask)
  _, p1 = _log_probs_joint(params, s.arch, mask)
  p1 = np.asarray(p1, np.float64)
  total = 0.0
  for j in range(1, 5):
    for t in range(j):
      l = 0.5 * math.log(p1[j, t] / (1 - p1[j, t]))
      q = 1 / (1 + math.exp(-l))
      total += (1 - q) * math.log((1 - q) / 0.6) + q * math.log(q / 0.4)
  np.testing.assert_allclose(s.skip_penalty, total / 4, rtol=1e-4)
  assert not np.triu(p1).any()
  assert np.all((p1[np.tril_indices(5, -1)] > 0) & (p1[np.tril_indices(5, -1)] < 1))


def test_most_likely_joint_is_greedy():
  mask = _mask(6, 4)
  params = _peaked_joint(4)
  s = jax.jit(controller.most_likely_joint)(params, mask)
  ops_, skips = joint.split(np.asarray(s.arch), 6)
  op_log_p, p1 = _log_probs_joint(params, s.arch, mask)
  np.testing.assert_array_equal(ops_, np.argmax(op_log_p, -1))
  lower = np.tril(np.ones((6, 6), bool), -1)
  np.testing.assert_array_equal(skips.astype(bool), (np.asarray(p1) > 0.5) & lower)
  chex.assert_trees_all_close(s, _log_prob_joint(params, s.arch, mask), atol=1e-5)


def test_uniform_sample_joint_respects_mask_and_skip_rate():
  mask = _mask(6, 5)
  archs = np.asarray(jax.jit(jax.vmap(controller.uniform_sample_joint, (0, None, None)),
                             static_argnums=2)(jax.random.split(jax.random.key(0), 2000), mask, 0.3))
  ops_, skips = joint.split(archs, 6)
  assert np.asarray(mask)[np.arange(6), ops_].all()
  assert not skips[:, np.triu_indices(6)[0], np.triu_indices(6)[1]].any()
  np.testing.assert_allclose(skips[:, np.tril_indices(6, -1)[0], np.tril_indices(6, -1)[1]].mean(),
                             0.3, atol=0.02)


# ---------------------------------------------------------------------------
# Supernet and fixed network.


def _apply_both_modes(net, variables, images, *arch):
  eval_logits = net.apply(variables, images, *arch, train=False)
  train_logits, updates = net.apply(variables, images, *arch, train=True, mutable=['batch_stats'])
  return eval_logits, train_logits, updates['batch_stats']


@dataclasses.dataclass
class Setup:
  space: joint.JointSpace
  net: macro.MacroNet
  variables: dict
  images: jax.Array
  run: callable
  archs: list
  supernet_out: list
  fixed_out: list


@pytest.fixture(scope='module')
def setup() -> Setup:
  """6 layers (pools after layers 1 and 3, channels 8-16-32), every op at every layer."""
  sp = joint.joint_space(6, 8, widen=True)
  net = macro.MacroNet(sp, NUM_CLASSES)
  images = jnp.asarray(np.random.default_rng(0).standard_normal(IMAGE_SHAPE), jnp.float32)
  base = jnp.asarray(sp.baseline(), jnp.int32)
  shapes = jax.eval_shape(lambda x, a: net.init(jax.random.key(0), x, a, train=False),
                          images, base)
  variables = random_variables(shapes, seed=1)
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def run(variables, images, arch):
    return _apply_both_modes(net, variables, images, arch)

  run = jax.jit(run)
  mask = jnp.asarray(sp.candidate_mask())
  archs = [sp.baseline(), tuple(int(a) for a in controller.uniform_sample_joint(
      jax.random.key(3), mask))]
  supernet_out, fixed_out = [], []
  for arch in archs:
    supernet_out.append(run(variables, images, jnp.asarray(arch, jnp.int32)))
    fixed = macro.MacroNet(sp, NUM_CLASSES, arch=arch)
    fixed_run = jax.jit(lambda v, x, fixed=fixed: _apply_both_modes(fixed, v, x))
    fixed_out.append(fixed_run(macro.select_branches(variables, arch, sp), images))
  return Setup(sp, net, variables, images, run, archs, supernet_out, fixed_out)


def test_fixed_network_holds_only_the_chosen_ops_and_needed_reductions(setup):
  sp = setup.space
  for arch in setup.archs:
    fixed = macro.MacroNet(sp, NUM_CLASSES, arch=arch)
    shapes = jax.eval_shape(lambda x: fixed.init(jax.random.key(0), x, train=False),
                            setup.images)
    selected = macro.select_branches(setup.variables, arch, sp)
    chex.assert_trees_all_equal_shapes(selected, shapes)
    ops_, skips = joint.split(np.asarray(arch), sp.num_layers)
    params = selected['params']
    for j in range(sp.num_layers):
      assert list(params[f'node{j:02d}']) == [ops.OP_NAMES[ops_[j]]]
    needed = joint.needed_reductions(skips, sp.pool_layers)
    reductions = {k for k in params if k.startswith('reduce')}
    assert reductions == {f'reduce{k}_from{t:02d}' for k, t in zip(*np.nonzero(needed))}
  # The baseline by hand: x_2 at pool 0 (input of layer 2, skipped by layer 3), x_4 at pool 1.
  base = macro.select_branches(setup.variables, sp.baseline(), sp)['params']
  assert sorted(k for k in base if k.startswith('reduce')) == ['reduce0_from02', 'reduce1_from04']
  # The stage widths double: 8 -> 16 -> 32.
  assert base['reduce1_from04']['path1_conv']['kernel'].shape == (1, 1, 16, 16)
  assert base['head']['kernel'].shape == (32, NUM_CLASSES)


def test_supernet_equals_fixed(setup):
  """Eval logits, train logits and (restricted) updated BN statistics agree."""
  for arch, sup, fix in zip(setup.archs, setup.supernet_out, setup.fixed_out):
    chex.assert_shape(sup[0], (IMAGE_SHAPE[0], NUM_CLASSES))
    chex.assert_trees_all_close(sup[0], fix[0], **TOL, custom_message=str(arch))
    chex.assert_trees_all_close(sup[1], fix[1], **TOL, custom_message=str(arch))
    chex.assert_trees_all_close(macro.select_branches(sup[2], arch, setup.space), fix[2], **TOL)
  logits = [sup[0] for sup in setup.supernet_out]
  for a, b in itertools.combinations(range(len(logits)), 2):
    assert not np.allclose(logits[a], logits[b], atol=1e-3)


def test_one_trace_serves_many_joint_architectures(setup):
  mask = jnp.asarray(setup.space.candidate_mask())
  archs = [controller.uniform_sample_joint(jax.random.key(50 + i), mask, 0.7) for i in range(4)]
  no_skips = jnp.asarray(joint.encode(np.full(6, 4), np.zeros((6, 6), int)))
  outputs = [setup.run(setup.variables, setup.images, a) for a in archs + [no_skips]]
  for out in outputs:
    chex.assert_tree_all_finite(out)
  assert not np.allclose(outputs[0][0], outputs[1][0], atol=1e-3)


def test_fixed_network_builds_the_sampled_dag(setup):
  """Dropping one skip (j, t) leaves layers < j unchanged and changes layer j; adding the
  skip back by hand reproduces layer j's pre-BN sum."""
  sp = setup.space
  arch = np.asarray(setup.archs[1])
  ops_, skips = joint.split(arch, sp.num_layers)
  skips[:] = 0
  skips[4, 2] = 1   # layer 4 reads x_2 (reduced at both pools) ...
  skips[2, 0] = 1   # ... and layer 2 reads the stem (reduced at pool 0)
  with_skip = tuple(joint.encode(ops_, skips))
  skips[4, 2] = 0
  without = tuple(joint.encode(ops_, skips))

  def layers(a):
    fixed = macro.MacroNet(sp, NUM_CLASSES, arch=a)
    _, state = fixed.apply(macro.select_branches(setup.variables, a, sp), setup.images,
                           train=False, mutable=['intermediates'])
    return {k: v[0] for k, v in state['intermediates'].items()}

  a, b = layers(with_skip), layers(without)
  for j in range(4):
    np.testing.assert_array_equal(a[f'layer{j:02d}'], b[f'layer{j:02d}'])
  assert not np.allclose(a['layer04'], b['layer04'], atol=1e-3)
  # Layer 4's BN (eval mode) is affine: the two outputs differ by the BN's scale times the
  # added source, x_2 = layer 1's output reduced at both pools.
  params, stats = setup.variables['params'], setup.variables['batch_stats']
  normalise = lambda y, s: (y - s['mean']) / jnp.sqrt(s['var'] + ops.BN_EPSILON)

  def reduce(name, x):
    p = params[name]
    h1, h2 = macro.factorized_inputs(x)
    y = jnp.concatenate([ops.conv2d(h1, p['path1_conv']['kernel']),
                         ops.conv2d(h2, p['path2_conv']['kernel'])], -1)
    return normalise(y, stats[name]['bn']) * p['bn']['scale'] + p['bn']['bias']

  x2 = reduce('reduce1_from02', reduce('reduce0_from02', a['layer01']))
  scale = params['layer04_bn']['scale'] / jnp.sqrt(stats['layer04_bn']['var'] + ops.BN_EPSILON)
  np.testing.assert_allclose(a['layer04'] - b['layer04'], x2 * scale, atol=1e-4)


def test_branch_mask_matches_select_branches(setup):
  sp = setup.space
  jit_mask = jax.jit(lambda t, a: macro.branch_mask(t, a, sp))
  for arch in setup.archs:
    for collection in ('params', 'batch_stats'):
      tree = setup.variables[collection]
      mask = jit_mask(tree, jnp.asarray(arch))
      chex.assert_trees_all_equal_structs(mask, tree)
      true_paths = {jax.tree_util.keystr(p)
                    for p, m in jax.tree_util.tree_leaves_with_path(mask) if bool(m)}
      assert true_paths == leaf_paths(macro.select_branches(tree, arch, sp))
  # resnet.branch_mask on the op indices alone freezes the op branches the same way.
  arch = jnp.asarray(setup.archs[1])
  ops_only = nodes.branch_mask(setup.variables['params'], joint.split(arch, 6)[0])
  full = macro.branch_mask(setup.variables['params'], arch, sp)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ops_only), jax.tree.leaves(full)):
    if 'reduce' not in jax.tree_util.keystr(path):
      assert bool(a) == bool(b), path


def test_supernet_gradients_vanish_exactly_outside_the_mask():
  """3 layers, 2 ops: selected leaves get the fixed network's gradient, the others zero."""
  sp = joint.joint_space(3, 4, candidates=('conv3x3', 'max3x3'))
  net = macro.MacroNet(sp, NUM_CLASSES)
  images = jnp.asarray(np.random.default_rng(5).standard_normal(IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(lambda x, a: net.init(jax.random.key(0), x, a, train=False),
                          images, jnp.asarray(sp.baseline()))
  variables = random_variables(shapes, seed=6)
  target = jax.nn.one_hot(jnp.arange(IMAGE_SHAPE[0]) % NUM_CLASSES, NUM_CLASSES)

  def loss(model, params, stats, *arch):
    logits, _ = model.apply({'params': params, 'batch_stats': stats}, images, *arch, train=True,
                            mutable=['batch_stats'])
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), -1))

  grad = jax.jit(jax.grad(lambda p, a: loss(net, p, variables['batch_stats'], a)))
  # Pools after layers 0 and 1. Layer 2 skips x_1 (layer 0's output); nothing reads the
  # stem after the first pool, so its reductions are unused.
  arch = (0, 4, 0, 0, 0, 1)
  grads = grad(variables['params'], jnp.asarray(arch))
  fixed = macro.MacroNet(sp, NUM_CLASSES, arch=arch)
  fixed_vars = macro.select_branches(variables, arch, sp)
  fixed_grads = jax.jit(jax.grad(lambda p: loss(fixed, p, fixed_vars['batch_stats'])))(
      fixed_vars['params'])
  chex.assert_trees_all_close(macro.select_branches({'params': grads}, arch, sp)['params'],
                              fixed_grads, **TOL)
  used = macro.branch_mask(grads, jnp.asarray(arch), sp)
  assert not bool(used['reduce0_from00']['path1_conv']['kernel'])
  assert_gradients_follow_mask(grads, used, must_move=lambda path: 'kernel' in path)


def test_architecture_argument_only_for_the_supernet(setup):
  arch = setup.archs[0]
  fixed = macro.MacroNet(setup.space, NUM_CLASSES, arch=arch)
  with pytest.raises(ValueError, match='pass the architecture to the supernet'):
    fixed.apply(macro.select_branches(setup.variables, arch, setup.space), setup.images,
                jnp.asarray(arch), train=False)
  with pytest.raises(ValueError, match='pass the architecture to the supernet'):
    setup.net.apply(setup.variables, setup.images, train=False)
  bad = list(arch)
  bad[2] = 2
  with pytest.raises(ValueError, match='skip bit of layer 1'):
    macro.MacroNet(setup.space, NUM_CLASSES, arch=tuple(bad)).init(
        jax.random.key(0), setup.images, train=False)


# ---------------------------------------------------------------------------
# Diagnostics (eq. 3-7, Figure 1).


def test_assigned_skip_rewards_by_hand():
  """M = 2, L = 3: R_S[j, t, n] = sum_i [S^i_jt == n] R^i / M."""
  skips = np.zeros((2, 3, 3), np.int32)
  skips[0, 1, 0] = 1
  skips[0, 2, 1] = skips[1, 2, 1] = 1
  rewards = jnp.asarray([0.2, 0.6])
  got = np.asarray(reinforce.assigned_skip_rewards(jnp.asarray(skips), rewards))
  want = np.zeros((3, 3, 2))
  want[1, 0] = [0.6 / 2, 0.2 / 2]
  want[2, 0] = [0.8 / 2, 0.0]
  want[2, 1] = [0.0, 0.8 / 2]
  np.testing.assert_allclose(got, want, atol=1e-7)


def test_term_and_group_gradient_norms_by_hand():
  params = {'a': jnp.asarray([1.0, 2.0]), 'b': jnp.asarray(3.0)}
  terms = lambda p: (jnp.sum(p['a'] ** 2), p['a'][0] * p['b'])
  # d/dp of term 0: a -> (2, 4), b -> 0; term 1: a -> (3, 0), b -> 1.
  np.testing.assert_allclose(reinforce.term_gradient_norms(terms, params),
                             [math.sqrt(20), math.sqrt(10)], rtol=1e-6)
  norms = reinforce.group_gradient_norms({'a': jnp.asarray([3.0, 4.0]), 'b': jnp.asarray(12.0)},
                                         {'x': ('a',), 'y': ('b',)})
  np.testing.assert_allclose([norms['x'], norms['y']], [5.0, 12.0])
  with pytest.raises(ValueError, match='do not partition'):
    reinforce.group_gradient_norms({'a': jnp.ones(1), 'b': jnp.ones(1)}, {'x': ('a',)})


def test_joint_loss_adds_the_weighted_mean_penalty():
  got = reinforce.joint_loss(jnp.asarray([-1.0, -2.0]), jnp.asarray([0.5, -1.0]),
                             jnp.asarray([0.1, 0.3]), 0.8)
  np.testing.assert_allclose(got, (0.5 - 2.0) / 2 + 0.8 * 0.2, rtol=1e-6)


def test_joint_update_diagnostics_on_a_toy_batch():
  """Every field against an independent computation on 4 sampled archs of 4 layers."""
  num_layers, m = 3, 4
  mask = _mask(num_layers, 8)
  params = _peaked_joint(8, scale=3.0, hidden=8)
  archs = jax.vmap(controller.sample_joint, (None, 0, None))(
      params, jax.random.split(jax.random.key(2), m), mask).arch
  rewards = jnp.asarray([0.1, 0.5, 0.9, 0.3])
  _, advantages = reinforce.ema_advantages(jnp.float32(0.4), rewards, 0.9)
  diag = jax.jit(reinforce.joint_update_diagnostics, static_argnums=5)(
      params, archs, rewards, advantages, mask, 1.5)

  @jax.jit
  def reference(params):
    score = lambda p: jax.vmap(controller.log_prob_joint, (None, 0, None))(p, archs, mask)
    grad = lambda field: jax.grad(lambda p: jnp.mean(-getattr(score(p), field) * advantages))
    op_log_p, skip_p = jax.vmap(controller.log_probs_joint, (None, 0, None))(params, archs, mask)
    return (optax.tree.norm(grad('op_log_prob')(params)),
            optax.tree.norm(grad('skip_log_prob')(params)), jnp.exp(op_log_p), skip_p,
            score(params))

  ops_norm, skips_norm, op_p, skip_p, scored = reference(params)
  np.testing.assert_allclose([diag['grad_norm_ops'], diag['grad_norm_skips']],
                             [ops_norm, skips_norm], rtol=1e-4)
  assert float(diag['grad_norm_ops']) > 0 and float(diag['grad_norm_skips']) > 0
  np.testing.assert_allclose(diag['op_probs'], op_p.mean(0), atol=1e-5)
  np.testing.assert_allclose(diag['skip_probs'], skip_p.mean(0), atol=1e-5)
  np.testing.assert_allclose(diag['op_probs'].sum(-1), 1.0, atol=1e-5)
  np.testing.assert_allclose(diag['op_entropy'], scored.entropy.mean(0), atol=1e-5)
  np.testing.assert_allclose(diag['skip_entropy'], scored.skip_entropy.mean(0), atol=1e-5)
  ops_, skips = joint.split(np.asarray(archs), num_layers)
  want_op = np.zeros((num_layers, K))
  want_skip = np.zeros((num_layers, num_layers, 2))
  for i in range(m):
    for j in range(num_layers):
      want_op[j, ops_[i, j]] += float(rewards[i]) / m
      for t in range(j):
        want_skip[j, t, skips[i, j, t]] += float(rewards[i]) / m
  np.testing.assert_allclose(diag['op_rewards'], want_op, atol=1e-6)
  np.testing.assert_allclose(diag['skip_rewards'], want_skip, atol=1e-6)


def test_operator_update_diagnostics_on_a_toy_batch():
  num_nodes = 5
  mask = _mask(num_nodes, 9)
  params = jax.tree.map(lambda p: 5 * p, controller.init(jax.random.key(9), K, 16))
  archs = jax.vmap(controller.uniform_sample, (0, None))(jax.random.split(jax.random.key(1), 3),
                                                          mask)
  rewards = jnp.asarray([0.2, 0.7, 0.4])
  advantages = rewards - 0.4
  diag = jax.jit(reinforce.operator_update_diagnostics, static_argnums=5)(
      params, archs, rewards, advantages, mask, 1.5)

  @jax.jit
  def reference(params):
    grads = jax.grad(lambda p: reinforce.reinforce_loss(
        jax.vmap(controller.log_prob, (None, 0, None))(p, archs, mask).log_prob, advantages))
    return (optax.tree.norm(grads(params)),
            jax.vmap(controller.log_probs, (None, 0, None))(params, archs, mask))

  grad_norm, log_p = reference(params)
  np.testing.assert_allclose(diag['grad_norm_ops'], grad_norm, rtol=1e-5)
  np.testing.assert_allclose(diag['op_probs'], jnp.mean(jnp.exp(log_p), 0), atol=1e-6)
  np.testing.assert_allclose(diag['op_rewards'],
                             reinforce.assigned_operator_rewards(archs, rewards, K), atol=1e-7)
  chex.assert_shape(diag['op_entropy'], (num_nodes,))
