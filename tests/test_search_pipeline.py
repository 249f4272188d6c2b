"""The paper's analysis as tools: the joint (NAS-Arch) search in the pipeline, the
controller diagnostics in ``metrics.jsonl``, the plot command on a real run, the
alternating search (eq. 9-11) and the transfer study (Table 1).

Speed: the pipeline runs use the real config files shrunk to a 3-layer ENAS macro
space with two candidate ops on the 16x16 ``synthetic`` data, and JAX's persistent
compilation cache in a temporary directory (as tests/test_pipeline.py).
"""

from __future__ import annotations

import json
import os
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import alternating, controller, data, joint, pipeline, plots, policy, space, train
from nar_jax import config as config_lib
from nar_jax import transfer
from nar_jax.models.macro import MacroNet
from nar_jax.ops import OP_NAMES
from nar_jax import families
from nar_jax.tasks import faces as face_task

from config_testing import load_config
import model_testing

K = len(OP_NAMES)
LAYERS = 3
UPDATES = 3
EPOCHS = 2


def tiny(c):
  """Shrinks a smoke config further: 3 layers, 2 ops, synthetic 16x16 data, 1 device."""
  c.dataset.name = 'synthetic'
  c.model.num_layers = LAYERS
  c.model.channels = c.model.retrain_channels = 4
  c.model.ops = 'conv3x3,max3x3'
  c.child.batch_size = 64
  c.search.epochs = EPOCHS
  c.search.controller.updates_per_epoch = UPDATES
  c.search.controller.num_aggregate = 4
  c.search.controller.valid_batch_size = 64
  c.derive.num_samples = 3
  c.retrain.epochs = 1
  c.retrain.batch_size = 64
  c.eval_batch_size = 128
  c.num_devices = 1
  return c


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def nasarch(tmp_path_factory, compile_cache):
  workdir = str(tmp_path_factory.mktemp('nasarch'))
  config = tiny(load_config('cifar_nasarch', 'smoke'))
  result = pipeline.run(config, workdir)
  with open(os.path.join(workdir, 'report.md')) as f:
    report_md = f.read()
  return types.SimpleNamespace(workdir=workdir, config=config, result=result, report_md=report_md,
                               arch=read_json(os.path.join(workdir, 'arch.json')),
                               metrics=read_metrics(workdir))


# ---------------------------------------------------------------------------------------
# NAS-Arch: the joint search through the pipeline.
# ---------------------------------------------------------------------------------------


def test_nasarch_smoke_writes_a_joint_architecture_and_report(nasarch):
  space = families.build_space(nasarch.config)
  assert space.name == f'enas_macro-{LAYERS}' and space.candidates == ('conv3x3', 'max3x3')
  arch = nasarch.arch
  flat = space.validate(arch['arch'])  # readable form: one {'op', 'skips'} per layer
  assert arch['op_indices'] == list(flat)
  assert [set(layer) for layer in arch['arch']] == [{'op', 'skips'}] * LAYERS
  assert arch['nodes'] == [f'layer{j}' for j in range(LAYERS)]
  refined = nasarch.result['refined']
  assert refined['arch'] == arch['arch']
  assert 0 <= refined['test_acc'] <= 1
  counts = model_testing.count_architecture(space, flat, (16, 16), 3, 10)
  assert (refined['params'], refined['macs']) == (counts.params, counts.macs)
  assert nasarch.result['baseline']['test_acc'] is None  # retrain.baseline is off
  md = nasarch.report_md
  assert md.startswith(f'# NAR report: enas_macro-{LAYERS}')
  for j, layer in enumerate(arch['arch']):
    row = next(line for line in md.splitlines() if line.startswith(f'| layer{j} |'))
    assert layer['op'] in row
    assert all(source in row.split('|')[3] for source in layer['skips'])
  assert '<-' in md  # the baseline chain has a skip at layer 1


def test_every_controller_update_logs_the_diagnostics(nasarch):
  updates = [m for m in nasarch.metrics if m['phase'] == 'controller']
  assert [(m['epoch'], m['update']) for m in updates] == [
      (e, u) for e in range(1, EPOCHS + 1) for u in range(1, UPDATES + 1)]
  lower = np.tril(np.ones((LAYERS, LAYERS), bool), -1)
  allowed = np.array([op in ('conv3x3', 'max3x3') for op in OP_NAMES])
  for m in updates:
    chex.assert_shape([np.asarray(m[k]) for k in ('op_probs', 'op_rewards', 'op_entropy',
                                                  'skip_probs', 'skip_rewards', 'skip_entropy')],
                      [(LAYERS, K), (LAYERS, K), (LAYERS,), (LAYERS, LAYERS),
                       (LAYERS, LAYERS, 2), (LAYERS,)])
    assert m['grad_norm_ops'] > 0 and m['grad_norm_skips'] > 0
    probs = np.asarray(m['op_probs'])
    np.testing.assert_allclose(probs.sum(-1), 1, atol=1e-5)
    assert np.all(probs[:, ~allowed] < 1e-6)
    # Eq. 6 / 7 hand every node (skip) the rewards of the samples that chose each option:
    # summed over the options they give the mean reward of the update.
    np.testing.assert_allclose(np.sum(m['op_rewards'], -1), m['reward'], atol=1e-5)
    skip_sums = np.sum(m['skip_rewards'], -1)
    np.testing.assert_allclose(skip_sums[lower], m['reward'], atol=1e-5)
    assert np.all(skip_sums[~lower] == 0)
    assert np.all(np.asarray(m['op_entropy']) <= np.log(2) + 1e-5)
    np.testing.assert_allclose(m['skip_entropy'][0], 0, atol=1e-7)  # layer 0 has no skips


def test_plot_command_renders_figure_1_from_the_real_run(nasarch, capsys):
  written = plots.write_plots(nasarch.workdir)
  names = sorted(os.path.basename(p) for p in written)
  assert names == ['grad_norms.json', 'grad_norms.png', 'op_probs.png']
  for path in written:
    assert os.path.getsize(path) > 0
  summary = read_json(os.path.join(nasarch.workdir, 'grad_norms.json'))
  ops_norms = [m['grad_norm_ops'] for m in nasarch.metrics if m['phase'] == 'controller']
  assert summary['operators'] == pytest.approx(plots.variability(ops_norms))
  assert set(summary) == {'operators', 'skip connections'}
  with capsys.disabled():
    print('\nFigure-1 variability of the tiny NAS-Arch run:',
          {k: {s: round(v, 4) for s, v in stats.items()} for k, stats in summary.items()})


def test_rerun_of_the_nasarch_workdir_trains_nothing(nasarch, monkeypatch):
  for name in ('make_train_step', 'make_controller_update', 'create_train_state'):
    monkeypatch.setattr(train, name, lambda *a, **k: pytest.fail('a finished phase ran again'))
  assert pipeline.run(nasarch.config, nasarch.workdir) == nasarch.result


# ---------------------------------------------------------------------------------------
# Pieces of the joint pipeline.
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize('widen', [False, True])
def test_joint_counts_equal_the_fixed_network_parameters(widen):
  space = joint.joint_space(6, 8, widen=widen)
  mask = jnp.asarray(space.candidate_mask())
  for seed in range(4):
    arch = tuple(int(a) for a in controller.uniform_sample_joint(jax.random.key(seed), mask))
    shapes = jax.eval_shape(lambda: MacroNet(space, 7, arch=arch).init(
        jax.random.key(0), jnp.zeros((1, 12, 10, 1)), train=False))
    params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes['params']))
    assert model_testing.count_architecture(space, arch, (12, 10), 1, 7).params == params


def test_joint_macs_by_hand():
  """One layer, no pools: stem 3x3 (3->4), branch 1x1 (4->4), conv3x3 (4->4), head 4->2."""
  space = joint.joint_space(1, 4, pool_layers=())
  counts = model_testing.count_architecture(space, [0], (5, 5), 3, 2)
  hw = 25
  macs = 27 * 4 * hw + 16 * hw + 36 * 4 * hw + 8
  params = 27 * 4 + 8 + 16 + 8 + 36 * 4 + 8 + 8 + 2
  assert (counts.params, counts.macs) == (params, macs)


def test_config_arch_forms_of_the_joint_space(tmp_path):
  config = tiny(load_config('cifar_nasarch', 'smoke'))
  config.arch = 'baseline'
  _, nets = pipeline.setup(config, str(tmp_path))
  space = nets.space
  arch = (4, 0, 1, 0, 1, 1)
  names = space.names(arch)
  path = tmp_path / 'arch.json'
  path.write_text(json.dumps({'arch': names}))
  assert nets.parse_arch('baseline') == space.baseline()
  assert nets.parse_arch(str(path)) == arch
  assert nets.parse_arch(json.dumps(names)) == arch
  assert nets.parse_arch('4,0,1,0,1,1') == arch
  with pytest.raises(ValueError, match='comma-separated integers'):
    nets.parse_arch('conv3x3,max3x3')
  with pytest.raises(ValueError, match='does not exist'):
    nets.parse_arch(str(tmp_path / 'missing.json'))
  with pytest.raises(ValueError, match='0 or 1'):
    nets.parse_arch('4,0,2,0,1,1')


def test_alternating_needs_the_joint_space():
  config = load_config('cifar_alternating', 'smoke')
  config_lib.validate(config)
  config.model.base = 'resnet18'
  with pytest.raises(ValueError, match="needs config.model.base='enas_macro'"):
    config_lib.validate(config)
  config = load_config('cifar_alternating', 'smoke')
  config.alternating.max_rounds = 0
  with pytest.raises(ValueError, match=r'config\.alternating\.max_rounds'):
    config_lib.validate(config)


def test_face_classification_splits_are_disjoint_and_cover_every_identity():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(5, dtype=np.int32), 6)
  rng.shuffle(labels)
  images = np.arange(len(labels), dtype=np.uint8)[:, None, None, None] * np.ones(
      (1, 2, 2, 3), np.uint8)
  train_split = data.Split(images, labels)
  test = data.Split(np.zeros((5, 2, 2, 3), np.uint8), np.arange(5, dtype=np.int32))
  splits = data.Splits(train_split, test, test, 5, (0.5,) * 3, (0.25,) * 3)
  out = face_task.identity_splits(splits, 2)
  assert out.test is test
  train_ids, valid_ids = out.train.images[:, 0, 0, 0], out.valid.images[:, 0, 0, 0]
  assert not set(train_ids) & set(valid_ids)
  assert sorted(np.concatenate([train_ids, valid_ids])) == list(range(len(labels)))
  np.testing.assert_array_equal(np.bincount(out.valid.labels), [2] * 5)
  np.testing.assert_array_equal(labels[train_ids], out.train.labels)
  with pytest.raises(ValueError, match='no training image'):
    face_task.identity_splits(splits, 6)


# ---------------------------------------------------------------------------------------
# Policies and forced decisions.
# ---------------------------------------------------------------------------------------


SPACE = joint.joint_space(4, 4, candidates=('conv3x3', 'sep3x3', 'max3x3'))


def test_forced_sampling_keeps_the_forced_half_and_scores_like_log_prob_joint():
  params = jax.tree.map(lambda p: 10 * p, controller.init_joint(jax.random.key(0), K, 16))
  mask = jnp.asarray(SPACE.candidate_mask())
  incumbent = jnp.asarray(SPACE.validate([2, 4, 1, 4, 0, 1, 0, 1, 1, 0]), jnp.int32)
  ops_in, skips_in = joint.split(incumbent, SPACE.num_layers)
  for seed in range(5):
    key = jax.random.key(seed)
    free = controller.sample_joint(params, key, mask)
    op_half = controller.sample_joint(params, key, mask, fixed_skips=skips_in)
    skip_half = controller.sample_joint(params, key, mask, fixed_ops=ops_in)
    np.testing.assert_array_equal(joint.split(op_half.arch, SPACE.num_layers)[1], skips_in)
    np.testing.assert_array_equal(joint.split(skip_half.arch, SPACE.num_layers)[0], ops_in)
    for s in (free, op_half, skip_half):
      scored = controller.log_prob_joint(params, s.arch, mask)
      chex.assert_trees_all_close((s.log_prob, s.op_log_prob, s.skip_log_prob, s.skip_penalty),
                                  (scored.log_prob, scored.op_log_prob, scored.skip_log_prob,
                                   scored.skip_penalty), atol=1e-5)
    # The entropy bonus counts only the sampled decisions.
    op_p = jnp.exp(jnp.take_along_axis(
        controller.log_probs_joint(params, op_half.arch, mask)[0],
        joint.split(op_half.arch, SPACE.num_layers)[0][:, None], 1))
    np.testing.assert_allclose(op_half.sample_entropy, jnp.sum(-jnp.log(op_p) * op_p), rtol=1e-5)
  both = controller.most_likely_joint(params, mask, fixed_ops=ops_in, fixed_skips=skips_in)
  np.testing.assert_array_equal(both.arch, incumbent)
  assert float(both.sample_entropy) == 0


def test_policy_losses_pick_their_terms():
  params = controller.init_joint(jax.random.key(1), K, 8)
  archs = jax.vmap(lambda k: controller.sample_joint(params, k, jnp.asarray(
      SPACE.candidate_mask())).arch)(jax.random.split(jax.random.key(2), 3))
  advantages = jnp.asarray([0.5, -1.0, 0.25])
  pols = {s: policy.joint_policy(SPACE, hidden=8, search=s) for s in policy.SEARCHES}
  scored = jax.jit(jax.vmap(lambda a: pols['joint'].score(params, a)))(archs)
  mean = lambda x: jnp.mean(-x * advantages)
  penalty = 0.8 * jnp.mean(scored.skip_penalty)
  np.testing.assert_allclose(pols['joint'].loss(scored, advantages),
                             mean(scored.log_prob) + penalty, rtol=1e-6)
  np.testing.assert_allclose(pols['operators'].loss(scored, advantages), mean(scored.op_log_prob),
                             rtol=1e-6)
  np.testing.assert_allclose(pols['skips'].loss(scored, advantages),
                             mean(scored.skip_log_prob) + penalty, rtol=1e-6)
  assert [pols[s].num_args for s in policy.SEARCHES] == [0, 1, 1]
  with pytest.raises(ValueError, match="unknown search 'both'"):
    policy.joint_policy(SPACE, search='both')


def test_operator_policy_keeps_the_controller_numerics():
  mask = np.ones((5, K), bool)
  mask[:, 3] = False
  pol = policy.operator_policy(mask, 1.5, 16)
  params = pol.init(jax.random.key(3))
  chex.assert_trees_all_equal(params, controller.init(jax.random.key(3), K, 16))
  key = jax.random.key(4)
  chex.assert_trees_all_equal(pol.sample(params, key),
                              controller.sample(params, key, jnp.asarray(mask), 1.5))
  chex.assert_trees_all_equal(pol.most_likely(params),
                              controller.most_likely(params, jnp.asarray(mask), 1.5))


def planted_update(pol, reward_of):
  """A real controller update whose reward is ``reward_of(arch)`` (no network)."""
  tx = optax.adam(0.05, b1=0.0, eps=1e-3)
  reward_fn = lambda variables, archs, images, targets: jax.vmap(reward_of)(archs)
  return tx, train.make_policy_update(pol, tx, reward_fn, entropy_weight=0.0,
                                      baseline_decay=0.9)


def test_operator_update_logs_eq6_diagnostics_with_a_planted_reward():
  mask = np.ones((3, K), bool)
  pol = policy.operator_policy(mask, 1.5, 16)
  tx, update = planted_update(pol, lambda arch: jnp.mean(arch == 2).astype(jnp.float32))
  state = train.controller_state(pol.init(jax.random.key(0)), tx)
  dummy = jnp.zeros((8, 1))
  state, m = update(state, None, dummy, dummy, jax.random.key(1))
  assert {'grad_norm_ops', 'op_probs', 'op_rewards', 'op_entropy'} <= set(m)
  assert 'grad_norm_skips' not in m
  np.testing.assert_allclose(m['op_rewards'].sum(-1), m['reward'], atol=1e-6)
  np.testing.assert_allclose(m['grad_norm_ops'], m['grad_norm'], rtol=1e-5)


# ---------------------------------------------------------------------------------------
# The alternating search on a planted reward.
# ---------------------------------------------------------------------------------------


TARGET = SPACE.validate([
    {'op': 'sep3x3', 'skips': []},
    {'op': 'max3x3', 'skips': []},
    {'op': 'sep3x3', 'skips': ['stem', 'layer0']},
    {'op': 'conv3x3', 'skips': ['layer1']},
])


def planted_reward(arch):
  """Fraction of the flat vector's entries (ops and skip bits) that match TARGET."""
  return jnp.mean(arch == jnp.asarray(TARGET)).astype(jnp.float32)


def planted_phases(updates_per_phase=15, num_samples=6):
  """``run_phase`` for :func:`alternating.alternate`: real controller updates of the
  forced policies with the planted reward; candidates scored by the same reward."""
  pols = {s: policy.joint_policy(SPACE, hidden=16, search=s) for s in alternating.PHASES}
  tx = optax.adam(0.05, b1=0.0, eps=1e-3)
  updates = {s: planted_update(pols[s], planted_reward)[1] for s in alternating.PHASES}
  state = {'ctrl': train.controller_state(pols['operators'].init(jax.random.key(0)), tx)}
  dummy = jnp.zeros((8, 1))
  seen = []

  def run_phase(search, incumbent, round_, index):
    fixed = jnp.asarray(incumbent, jnp.int32)
    ctrl = state['ctrl']
    for u in range(updates_per_phase):
      ctrl, _ = updates[search](ctrl, None, dummy, dummy, jax.random.key(100 * index + u), fixed)
    state['ctrl'] = ctrl
    proposals = alternating.propose(pols[search], ctrl.params, incumbent,
                                    jax.random.key(7 + index), num_samples)
    candidates = []
    for source, s in proposals:
      arch = [int(a) for a in s.arch]
      candidates.append({'source': source, 'arch': SPACE.names(arch), 'op_indices': arch,
                         'valid_acc': float(planted_reward(jnp.asarray(arch)))})
    seen.append((search, incumbent, candidates))
    return candidates

  return run_phase, seen


def test_alternating_loop_on_a_planted_reward_never_decreases_and_stops():
  run_phase, seen = planted_phases()
  logged = []
  out = alternating.alternate(SPACE.baseline(), run_phase, tolerance=0.0, max_rounds=4,
                              on_phase=lambda entry, history: logged.append(entry['er']))
  history = out['history']
  ers = [h['er'] for h in history]
  assert logged == ers and len(ers) == len(seen)
  assert all(b >= a for a, b in zip(ers, ers[1:])), ers
  assert ers[0] >= float(planted_reward(jnp.asarray(SPACE.baseline())))
  assert ers[-1] > ers[0] or not history[0]['improved']
  assert out['stopped'] in ('converged', 'max_rounds') and len(history) <= 8
  if out['stopped'] == 'converged':
    assert not history[-1]['improved'] and not history[-2]['improved']
  assert [h['phase'] for h in history] == [alternating.PHASES[i % 2] for i in range(len(history))]
  assert any(h['improved'] for h in history)  # the controller found better architectures
  # Each phase searched only its half: the other half is the incumbent's in every candidate.
  for search, incumbent, candidates in seen:
    ops_in, skips_in = joint.split(np.asarray(incumbent), SPACE.num_layers)
    for c in candidates:
      ops_c, skips_c = joint.split(np.asarray(c['op_indices']), SPACE.num_layers)
      np.testing.assert_array_equal(skips_c if search == 'operators' else ops_c,
                                    skips_in if search == 'operators' else ops_in)
  assert out['arch'] == tuple(history[-1]['op_indices'])


def test_alternating_stops_after_two_phases_without_improvement():
  calls = []

  def constant(search, incumbent, round_, index):
    calls.append(search)
    other = list(incumbent)
    other[0] = 1 - other[0] if other[0] in (0, 1) else 0
    return [{'source': 'incumbent', 'arch': [], 'op_indices': list(incumbent), 'valid_acc': 0.5},
            {'source': 'sample_0', 'arch': [], 'op_indices': other, 'valid_acc': 0.5}]

  out = alternating.alternate(SPACE.baseline(), constant, tolerance=0.0, max_rounds=5)
  assert calls == ['operators', 'skips'] and out['stopped'] == 'converged'
  assert out['arch'] == SPACE.baseline()  # ties keep the incumbent
  out = alternating.alternate(SPACE.baseline(), constant, tolerance=0.0, max_rounds=1)
  assert out['stopped'] == 'converged' and len(out['history']) == 2


def test_alternating_tolerance_and_bad_input():
  def better_by(gain):
    def run_phase(search, incumbent, round_, index):
      other = list(incumbent)
      other[0] = 1 - other[0] if other[0] in (0, 1) else 0
      base = 0.1 * index
      return [{'source': 'incumbent', 'arch': [], 'op_indices': list(incumbent),
               'valid_acc': base},
              {'source': 'sample_0', 'arch': [], 'op_indices': other, 'valid_acc': base + gain}]
    return run_phase

  out = alternating.alternate(SPACE.baseline(), better_by(0.05), tolerance=0.01, max_rounds=2)
  assert out['stopped'] == 'max_rounds' and [h['improved'] for h in out['history']] == [True] * 4
  out = alternating.alternate(SPACE.baseline(), better_by(0.005), tolerance=0.01, max_rounds=2)
  assert out['stopped'] == 'converged' and len(out['history']) == 2
  with pytest.raises(ValueError, match='max_rounds'):
    alternating.alternate(SPACE.baseline(), better_by(0), tolerance=0, max_rounds=0)
  with pytest.raises(ValueError, match='incumbent must be among'):
    alternating.select('operators', 1, (0, 0), [{'source': 's', 'arch': [], 'op_indices': [1],
                                                  'valid_acc': 1.0}], 0.0)


# ---------------------------------------------------------------------------------------
# The alternating search and the transfer study through the pipeline.
# ---------------------------------------------------------------------------------------


def test_alternating_smoke_pipeline_logs_the_er_sequence(tmp_path, compile_cache):
  config = tiny(load_config('cifar_alternating', 'smoke'))
  config.model.num_layers = 2  # no pool layers: the smallest programs to compile
  config.alternating.max_rounds = 1
  config.alternating.num_samples = 2
  config.search.controller.updates_per_epoch = 2
  result = pipeline.run(config, str(tmp_path))
  alt = result['alternating']
  assert [h['phase'] for h in alt['history']] == ['operators', 'skips']
  assert alt['stopped'] in ('converged', 'max_rounds')
  metrics = read_metrics(tmp_path)
  logged = [m for m in metrics if m['phase'] == 'alternating']
  assert [m['er'] for m in logged] == [h['er'] for h in alt['history']]
  assert [m['step'] for m in logged] == [1, 2]
  for h in alt['history']:
    assert h['er'] >= h['incumbent_reward']
  updates = [m for m in metrics if m['phase'] == 'controller']
  assert [(m['search'], m['round']) for m in updates] == [('operators', 1)] * 2 + [('skips', 1)] * 2
  assert all('grad_norm_skips' in m and 'op_rewards' in m for m in updates)
  kept = alt['history'][-1]
  assert result['refined']['arch'] == kept['arch']
  md = (tmp_path / 'report.md').read_text()
  assert '## Alternating search (eq. 9-11)' in md
  assert f'{kept["er"]:.4f}' in md
  assert os.path.isdir(tmp_path / 'checkpoints' / 'alternating')


def test_transfer_study_small_version_writes_its_table(tmp_path, compile_cache):
  study = load_config('transfer_study', 'smoke')
  study.num_devices = 1
  study.nas_arch = json.dumps(joint.joint_space(3, 4).names([2, 0, 1, 4, 0, 1]))
  study.nas_arch_channels = 4
  study.resnet_width = 0.0625
  study.tasks.A.name = 'synthetic'
  study.tasks.B.synthetic.update(num_identities=6, images_per_identity=12, image_size=16,
                                 num_pairs=20, verification_identities=4)
  study.tasks.B.proxy.update(num_identities=6, images_per_identity=12, valid_per_identity=2)
  study.retrain.epochs = 1
  study.eval_batch_size = 64
  result = transfer.run(study, str(tmp_path))
  rows = {(r['network'], r['task']): r for r in result['rows']}
  assert set(rows) == {(n, t) for n in transfer.NETWORKS for t in transfer.TASKS}
  assert result['tasks'] == {'A': 'synthetic', 'B': 'synthetic_faces'}
  for (network, task), row in rows.items():
    assert row['params'] > 0 and row['macs'] > 0
    report = read_json(os.path.join(row['workdir'], 'report.json'))
    assert report['refined']['test_acc'] == row['test_acc']
    if task == 'A':
      assert 0 <= row['test_acc'] <= 1 and row['verification'] == {}
    else:
      # Face networks: ArcFace on every synthetic identity, verified on synthetic.bin
      # (pairs of identities unseen in training), as the IR networks.
      assert report['dataset'] == 'synthetic_faces'
      assert set(row['verification']) == {'synthetic'}
      assert report['refined']['verification'] == row['verification']
      v = row['verification']['synthetic']
      assert 0 <= v['accuracy'] <= 1 and v['accuracy_std'] >= 0
  assert rows['nas_arch', 'A']['params'] == model_testing.count_architecture(
      joint.joint_space(3, 4), [2, 0, 1, 4, 0, 1], (16, 16), 3, 10).params
  # Task B counts the face head without its classifier (64-feature embedding).
  assert rows['nas_arch', 'B']['params'] == model_testing.count_architecture(
      joint.joint_space(3, 4), [2, 0, 1, 4, 0, 1], (16, 16), 3, 0, 64).params
  resnet20 = space.resnet_space('resnet20_wide', 'conv', 0.0625)
  assert rows['resnet20_wide', 'B']['params'] == model_testing.count_architecture(
      resnet20, resnet20.baseline(), (16, 16), 3, 0, 64).params
  assert read_json(tmp_path / 'transfer.json') == json.loads(json.dumps(result))
  md = (tmp_path / 'transfer.md').read_text()
  for network in transfer.NETWORKS:
    line = next(line for line in md.splitlines() if line.startswith(f'| {network} |'))
    assert f'{rows[network, "A"]["test_acc"]:.4f}' in line
    v = rows[network, 'B']['verification']['synthetic']
    assert f'synthetic {v["accuracy"]:.4f} +- {v["accuracy_std"]:.4f}' in line
  # face_head=False keeps task B as softmax classification of the proxy identities.
  study.face_head = False
  assert transfer.run_config(study, 'resnet20_wide', 'B').model.head == 'softmax'
  assert transfer.run_config(study, 'resnet20_wide', 'A').model.head == 'softmax'
  with pytest.raises(ValueError, match='config.nas_arch must name'):
    transfer.run_config(load_config('transfer_study'), 'nas_arch', 'A')
  with pytest.raises(ValueError, match="unknown network 'vgg'"):
    transfer.networks(types.SimpleNamespace(networks='vgg'))
