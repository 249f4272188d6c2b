"""Diverged training stops the run cleanly: a non-finite step is never applied, the loop
stops at the next logging interval naming phase, epoch and step, nothing non-finite is
saved, and a re-run with a saner learning rate continues from the last good state."""

from __future__ import annotations

import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from nar_jax import data, policy, train, verification
from nar_jax.checkpoint import PhaseCheckpoints
from nar_jax.errors import NonFiniteError
from nar_jax.models.resnet import ResNet
from nar_jax.phases import loop, search
from nar_jax.progress import Log, Progress
from test_pipeline import run_tiny, tiny_config, tiny_space

MESH = train.make_mesh(1)


def _fixed_step(tx):
  sp = tiny_space()
  model = ResNet(sp, 3, arch=sp.baseline(), bn_axis_name=train.DATA_AXIS)
  state = train.replicate(MESH, train.create_train_state(jax.random.key(0), model, (8, 8, 3),
                                                          tx, None))
  step = train.make_train_step(model, tx, MESH, mean=(0.5,) * 3, std=(0.25,) * 3,
                               crop_padding=0, flip=False, sample_arch=None)
  images = train.shard(MESH, np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), np.uint8))
  labels = train.shard(MESH, np.array([0, 1, 2, 0], np.int32))
  return state, lambda s: step(s, images, labels, jax.random.key(1), None)


def test_a_step_with_non_finite_updates_is_not_applied():
  state, step = _fixed_step(optax.scale(jnp.nan))
  new, metrics = step(state)
  assert not bool(metrics['finite'])
  chex.assert_trees_all_equal(new.params, state.params)
  chex.assert_trees_all_equal(new.batch_stats, state.batch_stats)
  state, step = _fixed_step(optax.sgd(0.1))
  new, metrics = step(state)
  assert bool(metrics['finite']) and np.isfinite(float(metrics['grad_norm']))
  assert not all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(new.params),
                                                      jax.tree.leaves(state.params)))


def test_a_controller_update_with_a_non_finite_reward_is_not_applied():
  mask = np.ones((3, 2), bool)
  pol = policy.operator_policy(mask)
  tx = optax.adam(0.1)
  state = train.controller_state(pol.init(jax.random.key(0)), tx)
  nan_reward = lambda variables, archs, images, targets: jnp.full(archs.shape[0], jnp.nan)
  update = train.make_policy_update(pol, tx, nan_reward, entropy_weight=0.0, baseline_decay=0.9)
  new, metrics = update(state, None, jnp.zeros((4, 1)), jnp.zeros((4, 1)), jax.random.key(1))
  assert not bool(metrics['finite'])
  chex.assert_trees_all_equal(new.params, state.params)
  assert float(new.baseline) == float(state.baseline)


def _planted_step(bad_from: int):
  """A step function whose ``finite`` turns False from global step ``bad_from`` (1-based)."""

  def step(state, images, labels, key, sampler_params):
    n = state + 1
    return n, {'loss': jnp.float32(1.0 / n), 'accuracy': jnp.float32(0.5),
               'finite': jnp.asarray(n < bad_from)}

  return step


@pytest.mark.parametrize('scan', [False, True])
def test_train_epoch_stops_naming_phase_epoch_step_and_last_finite_values(scan):
  split = data.Split(np.zeros((40, 2, 2, 3), np.uint8), np.zeros(40, np.int32))
  progress = Progress(Log('', verbose=False), 'search', 10)
  step = _planted_step(7)
  if scan:  # train.scan_epoch scans a jittable step over the epoch's batches
    step = jax.jit(step)
  with pytest.raises(NonFiniteError) as error:
    loop.train_epoch(step, 0, split, 4, 2, None, None, progress, mesh=MESH, seed=0,
                     log_every_steps=4, scan=scan, advice='a lower learning rate (x=1)')
  message = str(error.value)
  assert '[search] non-finite loss or gradient norm at epoch 3 step 7' in message
  assert 'loss 0.1667' in message  # step 6, the last finite one
  assert 'x=1' in message and 'resumes from the last checkpoint' in message
  state, stats = loop.train_epoch(_planted_step(11), 0, split, 4, 0, None, None, progress,
                                  mesh=MESH, seed=0, log_every_steps=4)
  assert int(state) == 10 and np.isfinite(stats['loss'])


def test_controller_updates_stop_on_a_non_finite_update():
  ctx = types_ctx(updates_per_epoch=3)
  reward = search.tasks.RewardData('accuracy', np.zeros((50, 2, 2, 3), np.uint8),
                                   np.zeros(50, np.int32))
  calls = []

  def update(ctrl, variables, images, targets, key):
    calls.append(1)
    bad = len(calls) == 2
    return ctrl, {'finite': jnp.asarray(not bad), 'reward': jnp.float32(np.nan if bad else 0.5),
                  'controller_loss': jnp.float32(0.0)}

  with pytest.raises(NonFiniteError, match=r'\[controller\] non-finite .* epoch 4 update 2'):
    search.controller_updates(ctx, update, None, None, reward, 3, jax.random.key(0))
  calls.clear()
  ok = lambda *a: (None, {'finite': jnp.asarray(True), 'reward': jnp.float32(0.5),
                          'controller_loss': jnp.float32(0.0)})
  _, metrics = search.controller_updates(ctx, ok, None, None, reward, 3, jax.random.key(0))
  assert len(metrics) == 3 and all('finite' not in m for m in metrics)  # records unchanged


def types_ctx(updates_per_epoch):
  from nar_jax.phases.context import Context  # noqa: PLC0415
  config = tiny_config(**{'search.controller.updates_per_epoch': updates_per_epoch,
                          'search.controller.num_aggregate': 2,
                          'search.controller.valid_batch_size': 4})
  return Context(config, '', MESH, Log('', verbose=False), jax.random.key(0))


def test_non_finite_scores_and_embeddings_are_errors():
  with pytest.raises(NonFiniteError, match='non-finite validation loss'):
    loop.check_finite_scores('derive', 'validation loss', {'loss': float('nan'), 'accuracy': 0.1})
  loop.check_finite_scores('derive', 'validation loss', {'loss': 1.0, 'accuracy': 0.1})
  images = np.zeros((20, 4, 4, 3), np.uint8)
  issame = np.arange(10) % 2 == 0
  with pytest.raises(NonFiniteError, match='non-finite embedding'):
    verification.verify(lambda x: np.full((len(x), 3), np.nan, np.float32), images, issame,
                        batch_size=4)
  assert issubclass(NonFiniteError, ValueError)  # the command line exits 2 with the message


def _all_checkpoints_finite(workdir: str) -> list[str]:
  """The phases with a checkpoint, after checking every saved array is finite."""
  phases = sorted(os.listdir(os.path.join(workdir, 'checkpoints')))
  for phase in phases:
    ckpt = PhaseCheckpoints(workdir, phase)
    try:
      for step in ckpt._manager.all_steps():
        state = ckpt._manager.restore(step).state
        assert all(np.all(np.isfinite(np.asarray(x))) for x in jax.tree.leaves(state)
                   if np.issubdtype(np.asarray(x).dtype, np.floating)), (phase, step)
    finally:
      ckpt.close()
  return phases


def test_a_diverged_pipeline_stops_and_resumes_with_a_sane_learning_rate(tmp_path, compile_cache):
  workdir = str(tmp_path)
  # The shared weights diverge in pretraining: nothing is saved, no phase is recorded.
  with pytest.raises(NonFiniteError, match=r'\[pretrain\] .*child.optimizer.lr_max is 1e\+08'):
    run_tiny(tiny_config(**{'child.optimizer.lr_max': 1e8}), workdir)
  assert not os.path.exists(os.path.join(workdir, 'results'))
  assert PhaseCheckpoints(workdir, 'pretrain').latest_step() is None
  # Sane shared weights, a diverging retraining: the search's results and checkpoints stay.
  # (Changing a learning rate of a workdir's run is a deliberate continuation.)
  with pytest.raises(NonFiniteError, match=r'\[retrain_refined\] .*retrain.optimizer.lr_max'):
    run_tiny(tiny_config(**{'retrain.optimizer.lr_max': 1e8, 'allow_changes':
                            'child.optimizer.lr_max,retrain.optimizer.lr_max'}), workdir)
  assert os.path.exists(os.path.join(workdir, 'results', 'derive.json'))
  assert {'pretrain', 'search'} <= set(_all_checkpoints_finite(workdir))
  # A sane re-run skips the finished search and retrains.
  report = run_tiny(tiny_config(**{'allow_changes': 'retrain.optimizer.lr_max'}), workdir)
  assert np.isfinite(report['refined']['test_acc']) and np.isfinite(report['baseline']['test_acc'])
