"""The face pipeline end to end, offline: synthetic faces in genuine insightface files.

``configs/face_lresnet50e_ir.py:smoke`` writes synthetic identities as real
``train.rec``/``train.idx``/``property`` and a ``.bin`` of pairs from identities that
are never trained on, searches a tiny IR-18 on the proxy task, retrains the refined
and the baseline network on every identity with ArcFace's margin, and verifies both
with insightface's protocol. JAX's persistent compilation cache (a temporary
directory) lets the later runs reuse the first run's executables.
"""

from __future__ import annotations

import dataclasses
import json
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import config as config_lib
from nar_jax import controller, pipeline, space, train, verification
from nar_jax.models.iresnet import IResNet
from nar_jax import families

from config_testing import load_config
import model_testing


def face_config(variant=None):
  """``configs/face_lresnet50e_ir.py:<variant>``."""
  return load_config('face_lresnet50e_ir', variant)


def smoke_config(**overrides):
  c = face_config('smoke')
  for name, value in overrides.items():
    *parents, leaf = name.split('.')
    section = config_lib.field(c, '.'.join(parents)) if parents else c
    section[leaf] = value
  return c


@pytest.fixture(scope='module', autouse=True)
def shared_compilation_cache(compile_cache):
  """Every test of this module uses the module's persistent compilation cache."""
  yield


def read_json(path):
  with open(path) as f:
    return json.load(f)


# The module's smoke run: the smoke config with two candidates per node (conv3x3, max3x3)
# instead of four, which halves the supernet it compiles; every phase still runs.
SMOKE_RUN = {'model.ops': 'conv3x3,max3x3'}


@pytest.fixture(scope='module')
def smoke_run(tmp_path_factory):
  workdir = tmp_path_factory.mktemp('smoke')
  return workdir, pipeline.run(smoke_config(**SMOKE_RUN), str(workdir))


def test_smoke_pipeline_reports_verification_of_both_networks(smoke_run):
  workdir, result = smoke_run
  for name in ('baseline', 'refined'):
    figures = result[name]['verification']['synthetic']
    assert 0.0 <= figures['accuracy'] <= 1.0 and figures['accuracy_std'] >= 0.0
    assert 0.0 <= figures['tar'] <= 1.0
    assert result[name]['test_acc'] is None  # Faces are tested by verification only.
  with open(os.path.join(workdir, 'report.md')) as f:
    markdown = f.read()
  assert '## Verification (retrained)' in markdown
  baseline = result['baseline']['verification']['synthetic']['accuracy']
  assert f'| synthetic | {baseline:.4f}' in markdown


def test_smoke_pipeline_counts_ir_networks_without_the_classifier(smoke_run):
  workdir, result = smoke_run
  config = smoke_config(**SMOKE_RUN)
  s = families.build_space(config)
  size = config.dataset.synthetic.image_size
  for name in ('baseline', 'refined'):
    counts = model_testing.count_architecture(s, result[name]['arch'], (size, size), 3, 0)
    assert (result[name]['params'], result[name]['macs']) == (counts.params, counts.macs)


def test_smoke_pipeline_stores_the_proxy_task_as_an_index(smoke_run):
  workdir, _ = smoke_run
  proxy = np.load(os.path.join(workdir, 'proxy_index.npz'))
  p = smoke_config().dataset.proxy
  assert len(proxy['identities']) == p.num_identities
  assert len(proxy['train_keys']) == p.num_identities * (p.images_per_identity -
                                                         p.valid_per_identity)
  assert len(proxy['valid_keys']) == p.num_identities * p.valid_per_identity
  assert not set(proxy['train_keys']) & set(proxy['valid_keys'])
  full = np.load(os.path.join(workdir, 'full_index.npz'))  # retraining: every identity
  assert len(full['identities']) == smoke_config().dataset.synthetic.num_identities


def test_smoke_rerun_skips_finished_phases(smoke_run, capsys):
  workdir, result = smoke_run
  again = pipeline.run(smoke_config(**SMOKE_RUN), str(workdir))
  out = capsys.readouterr().out
  for phase in ('derive', 'retrain_refined', 'retrain_baseline'):
    assert f'[{phase}] already done' in out
  assert again['refined']['verification'] == result['refined']['verification']


def test_arcface_generalises_to_identities_never_trained_on(tmp_path):
  """Open-set verification: 40 training identities, pairs from 10 unseen identities."""
  config = smoke_config(**{
      'arch': 'baseline', 'retrain.baseline': False, 'model.width': 0.125,
      'retrain.epochs': 8, 'retrain.optimizer.decay_epochs': '6',
      'dataset.synthetic.num_identities': 40})
  result = pipeline.run(config, str(tmp_path))
  accuracy = result['refined']['verification']['synthetic']['accuracy']
  assert accuracy >= 0.8, accuracy


def test_verification_reward_equals_the_protocol_on_each_architecture():
  """The controller's verification reward = insightface's 10-fold accuracy (numpy), on the
  first unit of IR-18's first two stages (every face candidate at each of its four nodes)."""
  ir18 = space.ir_space(18, width=0.0625)
  s = dataclasses.replace(
      ir18, stages=tuple(dataclasses.replace(st, num_blocks=1) for st in ir18.stages[:2]),
      nodes=tuple(n for n in ir18.nodes if n.name.startswith(('stage1.unit0.', 'stage2.unit0.'))))
  model = IResNet(s, num_classes=5, bn_axis_name=train.DATA_AXIS)
  variables = jax.jit(lambda k, x: model.init(k, x, jnp.asarray(s.baseline()), train=False))(
      jax.random.PRNGKey(0), jnp.zeros((1, 16, 16, 3)))
  mesh = train.make_mesh(2)
  reward_fn = train._verification_reward(model, mesh, (0.5,) * 3, (0.5,) * 3, True)
  rng = np.random.default_rng(0)
  num_pairs = 20
  issame = np.tile([True, False], num_pairs // 2)  # every fold holds both kinds
  templates = rng.integers(0, 256, (num_pairs, 16, 16, 3))
  noise = lambda: rng.integers(-40, 40, templates.shape)
  other = rng.integers(0, 256, templates.shape)
  second = np.where(issame[:, None, None, None], templates + noise(), other)
  pairs = np.stack([templates, second], 1).reshape(-1, 16, 16, 3).clip(0, 255).astype(np.uint8)
  archs = np.stack([controller.uniform_sample(k, jnp.asarray(s.candidate_mask()))
                    for k in jax.random.split(jax.random.PRNGKey(1), 2)])
  rewards = reward_fn(variables, jnp.asarray(archs),
                      train.shard(mesh, np.stack([pairs, pairs]), 1),
                      train.replicate(mesh, np.stack([issame, issame])))
  chex.assert_shape(rewards, (2,))
  single_device = IResNet(s, num_classes=5)  # BatchNorm over the whole (unsharded) batch
  for arch, reward in zip(archs, np.asarray(rewards)):
    def embed(x, arch=arch):
      x = (x.astype(np.float32) / 255 - 0.5) / 0.5
      return train.predict(single_device, variables, jnp.asarray(x), jnp.asarray(arch), True,
                           embed=True)
    expected = verification.verify(embed, pairs, issame, batch_size=len(pairs))
    np.testing.assert_allclose(reward, expected.accuracy_mean, atol=1e-6)


def test_face_config_errors_are_clear(tmp_path):
  with pytest.raises(ValueError, match='reward_pairs'):
    config_lib.validate(smoke_config(**{'search.reward': 'verification'}))
  with pytest.raises(ValueError, match="model.base='ir18' does not fit .*face networks"):
    config_lib.validate(smoke_config(**{'dataset.name': 'mnist5k'}))
  with pytest.raises(ValueError, match='scan_epoch'):
    config_lib.validate(smoke_config(scan_epoch=True))
  with pytest.raises(ValueError, match='data_dir'):
    config_lib.validate(smoke_config(**{'dataset.name': 'faces'}))
  with pytest.raises(ValueError, match="'ir18', 'ir34'"):
    families.build_space(smoke_config(**{'model.base': 'irx'}))


def test_face_variants_build_and_validate():
  for variant in (None, 'proxy', 'pretrain', 'smoke'):
    c = face_config(variant)
    if c.dataset.name == 'faces':
      c.dataset.data_dir = '/data/faces_emore'
    config_lib.validate(c)
  assert families.build_space(c).num_nodes == 16  # smoke: IR-18
  full = face_config()
  assert families.build_space(full).num_nodes == 48
  with pytest.raises(ValueError, match='unknown variant'):
    face_config('nope')


def test_bf16_face_training_tracks_float32():
  """The face configs train in bfloat16 with float32 parameters (margin head in float32)."""
  s = space.ir_space(18, width=0.0625)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (32, 16, 16, 3)).astype(np.uint8)
  labels = rng.integers(0, 10, 32).astype(np.int32)
  mesh = train.make_mesh(1)
  losses, states = {}, {}
  for dtype in (jnp.float32, jnp.bfloat16):
    model = IResNet(s, 10, arch=s.baseline(), dtype=dtype, bn_axis_name=train.DATA_AXIS)
    tx = train.child_optimizer(config_lib.base_config().child.optimizer, 10)
    state = train.replicate(mesh, train.create_train_state(
        jax.random.PRNGKey(0), model, images.shape[1:], tx, None))
    step = train.make_train_step(model, tx, mesh, mean=(0.5,) * 3, std=(0.5,) * 3,
                                 crop_padding=0, flip=True, sample_arch=None)
    losses[dtype] = []
    for _ in range(2):
      state, metrics = step(state, train.shard(mesh, images), train.shard(mesh, labels),
                            jax.random.PRNGKey(1), None)
      losses[dtype].append(float(metrics['loss']))
    states[dtype] = state
  # bf16's 8-bit mantissa: the first (forward-only) loss agrees to 1%, the next to 6%.
  np.testing.assert_allclose(losses[jnp.bfloat16][0], losses[jnp.float32][0], rtol=0.01)
  np.testing.assert_allclose(losses[jnp.bfloat16], losses[jnp.float32], rtol=0.06)
  for leaf in jax.tree.leaves((states[jnp.bfloat16].params, states[jnp.bfloat16].opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32


def test_step_decay_schedule_of_the_face_recipe():
  """ArcFace's recipe: lr x0.1 after each listed epoch, epochs counted in steps."""
  cfg = face_config().retrain.optimizer
  cfg.decay_epochs = '1.5,3'
  cfg.momentum, cfg.weight_decay = 0.0, 0.0  # then an update is -lr * gradient
  tx = train.child_optimizer(cfg, steps_per_epoch=4)
  params = {'w': jnp.ones(())}
  state = tx.init(params)
  lrs = []
  for _ in range(14):
    updates, state = tx.update({'w': jnp.ones(())}, state, params)
    lrs.append(-float(updates['w']))
  np.testing.assert_allclose(lrs, [0.1] * 6 + [0.01] * 6 + [0.001] * 2, rtol=1e-6)
  cfg.schedule = 'linear'
  with pytest.raises(ValueError, match="'cosine' or 'step'"):
    train.child_optimizer(cfg, 4)
