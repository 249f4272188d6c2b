"""End-to-end tests of nar_jax.pipeline and the command line, offline on synthetic data.

Speed. XLA:CPU needs tens of seconds to compile the steps of even a 0.0625-wide
ResNet-18 supernet, so the training runs here swap the config's search space for a
tiny 4-node ResNet (the ``resnet`` family with a tiny space; everything else is the real
config path), and the module enables JAX's persistent compilation cache in a
temporary directory: the first run compiles, the later runs (interrupted, resumed)
load the same executables instead of compiling them again. The error tests use the
real ``build_space``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import types

import numpy as np
import pytest

from nar_jax import config as config_lib
from nar_jax import data, ops, pipeline, train
from nar_jax.space import Node, SearchSpace, Stage
from nar_jax import families
from nar_jax.phases import retrain
import model_testing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CANDIDATES = ('conv3x3', 'max3x3')
CONTROLLER_UPDATES_PER_EPOCH = 3
SEARCH_EPOCHS = 2


def tiny_space(config=None) -> SearchSpace:
  del config
  nodes = (Node('stage1.block0.conv1', 4, 4, 1, 'conv3x3', CANDIDATES),
           Node('stage1.block0.conv2', 4, 4, 1, 'conv3x3', CANDIDATES),
           Node('stage2.block0.conv1', 4, 8, 2, 'conv3x3', CANDIDATES),
           Node('stage2.block0.conv2', 8, 8, 1, 'conv3x3', CANDIDATES))
  return SearchSpace('tiny', 'conv', 4, (Stage(1, 4, 1), Stage(1, 8, 2)), nodes)


def tiny_config(**overrides):
  c = config_lib.base_config()
  c.dataset.name = 'synthetic'
  c.dataset.crop_padding = 2
  c.dataset.flip = False
  c.model.width = 0.0625
  c.child.batch_size = 64
  c.pretrain.epochs = 1
  c.search.epochs = SEARCH_EPOCHS
  c.search.controller.updates_per_epoch = CONTROLLER_UPDATES_PER_EPOCH
  c.search.controller.num_aggregate = 4
  c.search.controller.valid_batch_size = 64
  c.derive.num_samples = 3
  c.retrain.epochs = 1
  c.retrain.batch_size = 64
  c.eval_batch_size = 128
  c.log_every_steps = 4
  c.num_devices = 1
  for name, value in overrides.items():
    section = c
    *parts, field = name.split('.')
    for part in parts:
      section = section[part]
    section[field] = value
  return c


@contextlib.contextmanager
def tiny_space_family():
  """The ``resnet`` family with :func:`tiny_space` as its space, registered while inside."""
  families.register(families.resnet.FAMILY._replace(space=tiny_space))
  try:
    yield
  finally:
    families.register(families.resnet.FAMILY)


def run_tiny(config, workdir):
  """``pipeline.run`` with the tiny search space."""
  with tiny_space_family():
    return pipeline.run(config, str(workdir))


def read_json(path):
  with open(path) as f:
    return json.load(f)


def read_metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


def records(metrics, phase, **fields) -> list[dict]:
  return [m for m in metrics
          if m['phase'] == phase and all(m.get(k) == v for k, v in fields.items())]


def checkpoint_steps(workdir, phase) -> list[int]:
  directory = os.path.join(workdir, 'checkpoints', phase)
  return sorted(int(d) for d in os.listdir(directory) if d.isdigit())


@pytest.fixture(scope='module')
def finished(tmp_path_factory, compile_cache):
  """One uninterrupted run; its files as written (later tests may rerun in its workdir)."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  result = run_tiny(tiny_config(), workdir)
  with open(os.path.join(workdir, 'report.md')) as f:
    report_md = f.read()
  return types.SimpleNamespace(
      workdir=workdir, result=result, report=read_json(os.path.join(workdir, 'report.json')),
      arch=read_json(os.path.join(workdir, 'arch.json')), metrics=read_metrics(workdir),
      derive=read_json(os.path.join(workdir, 'results', 'derive.json')), report_md=report_md)


# ---------------------------------------------------------------------------------------
# A whole run.
# ---------------------------------------------------------------------------------------


def test_run_writes_report_with_counted_params_and_macs(finished):
  report = finished.report
  assert report == json.loads(json.dumps(finished.result))  # what run() returned
  space = tiny_space()
  splits = data.load_splits('synthetic')
  for name in ('baseline', 'refined'):
    entry = report[name]
    assert isinstance(entry['arch'], list) and len(entry['arch']) == space.num_nodes
    assert all(op in CANDIDATES for op in entry['arch'])
    assert isinstance(entry['params'], int) and isinstance(entry['macs'], int)
    assert isinstance(entry['valid_acc'], float) and 0 <= entry['valid_acc'] <= 1
    assert isinstance(entry['test_acc'], float) and 0 <= entry['test_acc'] <= 1
    counts = model_testing.count_architecture(space, entry['arch'], splits.image_shape[:2],
                                         splits.image_shape[2], splits.num_classes)
    assert (entry['params'], entry['macs']) == (counts.params, counts.macs)
  assert report['baseline']['arch'] == ['conv3x3'] * space.num_nodes
  assert report['dataset'] == 'synthetic' and report['space'] == 'tiny'

  # arch.json is the derived architecture: the best-scoring candidate of derive.
  arch = finished.arch
  assert arch['arch'] == report['refined']['arch']
  assert arch['op_indices'] == [ops.OP_NAMES.index(op) for op in arch['arch']]
  assert arch['nodes'] == [n.name for n in space.nodes]
  candidates = finished.derive['candidates']
  assert 1 <= len(candidates) <= 1 + 3  # most likely + num_samples, duplicates dropped
  assert len({tuple(c['arch']) for c in candidates}) == len(candidates)
  best = max(c['valid_acc'] for c in candidates)
  assert arch['valid_acc'] == report['refined']['valid_acc'] == best
  assert arch['source'] in [c['source'] for c in candidates if c['valid_acc'] == best]

  md = finished.report_md
  assert md.startswith('# NAR report: tiny')
  for name in ('baseline', 'refined'):
    assert f'{report[name]["params"]:,}' in md and f'{report[name]["macs"]:,}' in md
  assert '## Search' in md


def test_run_logs_every_phase_and_checkpoints(finished):
  metrics = finished.metrics
  assert all(isinstance(m.get('phase'), str) for m in metrics)
  phases = {m['phase'] for m in metrics}
  assert {'pretrain', 'search', 'controller', 'retrain_refined'} <= phases
  refined_differs = finished.report['refined']['arch'] != finished.report['baseline']['arch']
  assert ('retrain_baseline' in phases) == refined_differs
  assert [m['epoch'] for m in records(metrics, 'pretrain')] == [1]
  assert [m['epoch'] for m in records(metrics, 'search')] == list(range(1, SEARCH_EPOCHS + 1))
  updates = [(m['epoch'], m['update']) for m in records(metrics, 'controller')]
  assert updates == [(e, u) for e in range(1, SEARCH_EPOCHS + 1)
                     for u in range(1, CONTROLLER_UPDATES_PER_EPOCH + 1)]
  for m in records(metrics, 'controller'):
    assert all(np.isfinite(m[k]) for k in ('reward', 'baseline', 'controller_loss', 'entropy'))
  for m in records(metrics, 'search') + records(metrics, 'pretrain'):
    assert np.isfinite(m['train_loss']) and 0 <= m['train_acc'] <= 1
  test_lines = [m for m in records(metrics, 'retrain_refined') if 'test_acc' in m]
  assert [m['test_acc'] for m in test_lines] == [finished.report['refined']['test_acc']]

  assert checkpoint_steps(finished.workdir, 'pretrain') == [1]
  assert checkpoint_steps(finished.workdir, 'search') == [1, 2]
  assert checkpoint_steps(finished.workdir, 'retrain_refined') == [1]
  assert os.path.exists(os.path.join(finished.workdir, 'results', 'retrain_refined.json'))


def test_run_writes_tensorboard_events_of_its_records_config_and_report(finished):
  event_accumulator = pytest.importorskip(
      'tensorboard.backend.event_processing.event_accumulator')
  acc = event_accumulator.EventAccumulator(
      os.path.join(finished.workdir, 'tensorboard'), size_guidance={
          event_accumulator.SCALARS: 0, event_accumulator.IMAGES: 0,
          event_accumulator.TENSORS: 0})
  acc.Reload()
  tags = acc.Tags()
  assert {'pretrain/train_loss', 'search/train_loss', 'search/train_acc', 'controller/reward',
          'controller/baseline', 'controller/entropy', 'controller/grad_norm_ops',
          'retrain_refined/train_loss', 'retrain_refined/test_acc'} <= set(tags['scalars'])
  rewards = [(m['epoch'], m['update'], m['reward'])
             for m in records(finished.metrics, 'controller')]
  got = [(e.step, e.value) for e in acc.Scalars('controller/reward')]
  assert [s for s, _ in got] == list(range(1, len(rewards) + 1))
  np.testing.assert_allclose([v for _, v in got], [r for _, _, r in rewards], rtol=1e-6)
  assert [e.step for e in acc.Scalars('search/train_loss')] == list(range(1, SEARCH_EPOCHS + 1))
  assert 'controller/op_probs' in tags['images']
  assert len(acc.Images('controller/op_probs')) == len(rewards)
  report = acc.Tensors('report/text_summary')[0].tensor_proto.string_val[0].decode()
  assert report == finished.report_md
  assert 'config/text_summary' in tags['tensors']


def test_rerun_of_a_finished_workdir_trains_nothing(finished, monkeypatch, capsys):
  def must_not_train(*args, **kwargs):
    raise AssertionError('a finished phase was run again')

  for name in ('create_train_state', 'make_train_step', 'make_controller_update',
               'make_eval_step'):
    monkeypatch.setattr(train, name, must_not_train)
  capsys.readouterr()
  result = run_tiny(tiny_config(), finished.workdir)
  out = capsys.readouterr().out
  assert '[derive] already done' in out and '[retrain_refined] already done' in out
  assert result == finished.result
  assert read_json(os.path.join(finished.workdir, 'report.json')) == finished.report
  assert read_json(os.path.join(finished.workdir, 'arch.json')) == finished.arch
  assert read_metrics(finished.workdir) == finished.metrics  # nothing new was logged


def test_retraining_trains_on_train_and_valid_once_per_epoch(tmp_path, monkeypatch):
  """Retraining (the paper: on train + valid) feeds its train steps every train and every
  valid example once per epoch, and no test example. The steps are recorded, not run."""
  with tiny_space_family():
    ctx, nets = pipeline.setup(tiny_config(**{'retrain.epochs': 2}), str(tmp_path))
  seen = []

  def recording_step(*args, **kwargs):
    del args, kwargs

    def step(state, images, labels, key, sampler_params):
      del key, sampler_params
      seen.append((np.asarray(images), np.asarray(labels)))
      zero = np.float32(0)
      return state, {'loss': zero, 'accuracy': zero, 'finite': np.bool_(True)}
    return step

  monkeypatch.setattr(train, 'make_train_step', recording_step)
  result = retrain.run(ctx, nets, 'refined', nets.space.baseline())
  splits = nets.splits
  rows = lambda images: {bytes(x) for x in images.reshape(len(images), -1)}
  train_and_valid = len(splits.train) + len(splits.valid)
  per_epoch = data.num_batches(data.merge(splits.train, splits.valid), 64)
  assert per_epoch == train_and_valid // 64 > data.num_batches(splits.train, 64)
  assert len(seen) == 2 * per_epoch
  for epoch in range(2):
    images = np.concatenate([b[0] for b in seen[epoch * per_epoch:(epoch + 1) * per_epoch]])
    labels = np.concatenate([b[1] for b in seen[epoch * per_epoch:(epoch + 1) * per_epoch]])
    assert len(rows(images)) == len(images) == train_and_valid  # each example once
    assert rows(images) == rows(splits.train.images) | rows(splits.valid.images)
    np.testing.assert_array_equal(np.sort(labels), np.sort(np.concatenate(
        [splits.train.labels, splits.valid.labels])))
    assert not rows(images) & rows(splits.test.images)
  assert result['test_acc'] is not None


# ---------------------------------------------------------------------------------------
# Resume.
# ---------------------------------------------------------------------------------------


def test_resume_after_interrupt_in_search_gives_the_uninterrupted_result(
    finished, tmp_path, monkeypatch, capsys, compile_cache):
  interrupt_at = CONTROLLER_UPDATES_PER_EPOCH + 2  # the 2nd update of search epoch 2
  calls = []
  real_make = train.make_controller_update

  def make_interruptible(*args, **kwargs):
    update = real_make(*args, **kwargs)

    def interruptible(*a, **k):
      calls.append(1)
      if len(calls) == interrupt_at:
        raise KeyboardInterrupt
      return update(*a, **k)

    return interruptible

  workdir = str(tmp_path / 'run')
  with monkeypatch.context() as mp:
    mp.setattr(train, 'make_controller_update', make_interruptible)
    with pytest.raises(KeyboardInterrupt):
      run_tiny(tiny_config(), workdir)
  assert len(calls) == interrupt_at

  # Interrupted in epoch 2: pretrain and search epoch 1 are checkpointed, nothing after.
  assert checkpoint_steps(workdir, 'pretrain') == [1]
  assert checkpoint_steps(workdir, 'search') == [1]
  assert not os.path.exists(os.path.join(workdir, 'results', 'derive.json'))
  assert not os.path.exists(os.path.join(workdir, 'report.json'))
  before = read_metrics(workdir)
  assert [m['epoch'] for m in records(before, 'controller')] == [1] * CONTROLLER_UPDATES_PER_EPOCH

  capsys.readouterr()
  result = run_tiny(tiny_config(), workdir)
  out = capsys.readouterr().out
  assert '[pretrain] resumed from' in out and '[search] resumed from' in out
  assert 'after epoch 1' in out

  after = read_metrics(workdir)
  assert after[:len(before)] == before
  new = after[len(before):]
  assert not records(new, 'pretrain')  # pretraining was restored, not run again
  assert [m['epoch'] for m in records(new, 'search')] == [2]  # only epoch 2 is redone
  assert [m['epoch'] for m in records(new, 'controller')] == [2] * CONTROLLER_UPDATES_PER_EPOCH
  assert checkpoint_steps(workdir, 'search') == [1, 2]

  # The same result as the uninterrupted run with the same seed.
  assert read_json(os.path.join(workdir, 'arch.json'))['arch'] == finished.arch['arch']
  assert result['refined']['arch'] == finished.report['refined']['arch']
  derive = read_json(os.path.join(workdir, 'results', 'derive.json'))
  assert [c['arch'] for c in derive['candidates']] == [
      c['arch'] for c in finished.derive['candidates']]
  np.testing.assert_allclose([c['valid_acc'] for c in derive['candidates']],
                             [c['valid_acc'] for c in finished.derive['candidates']], atol=1e-6)
  for name in ('baseline', 'refined'):
    for key in ('params', 'macs'):
      assert result[name][key] == finished.report[name][key]
    assert result[name]['test_acc'] == pytest.approx(finished.report[name]['test_acc'], abs=1e-6)
  resumed_controller = records(after, 'controller', epoch=2)
  finished_controller = records(finished.metrics, 'controller', epoch=2)
  for mine, theirs in zip(resumed_controller, finished_controller):
    assert mine['reward'] == pytest.approx(theirs['reward'], abs=1e-6)
    assert mine['baseline'] == pytest.approx(theirs['baseline'], abs=1e-6)


# ---------------------------------------------------------------------------------------
# Two devices, a given architecture.
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope='module')
def two_devices(finished, tmp_path_factory):
  """Retrains the finished run's refined architecture (``config.arch``) on 2 devices."""
  workdir = str(tmp_path_factory.mktemp('two_devices'))
  config = tiny_config(num_devices=2, arch=','.join(finished.arch['arch']),
                       **{'retrain.baseline': False})
  result = run_tiny(config, workdir)
  return types.SimpleNamespace(workdir=workdir, result=result, metrics=read_metrics(workdir),
                               arch=read_json(os.path.join(workdir, 'arch.json')))


def test_config_arch_on_two_devices_retrains_like_one_device(finished, two_devices):
  """No search; the same phase key and data, so the 2-device retrain is the 1-device one."""
  result, metrics = two_devices.result, two_devices.metrics
  assert {m['phase'] for m in metrics} == {'retrain_refined'}
  assert not os.path.exists(os.path.join(two_devices.workdir, 'checkpoints', 'search'))
  assert two_devices.arch['source'] == 'config.arch'
  assert two_devices.arch['valid_acc'] is None and result['refined']['valid_acc'] is None
  assert 'search' not in result
  assert result['refined']['arch'] == finished.report['refined']['arch']
  assert result['refined']['params'] == finished.report['refined']['params']
  mine = records(metrics, 'retrain_refined', epoch=1)
  theirs = records(finished.metrics, 'retrain_refined', epoch=1)
  assert mine[0]['train_loss'] == pytest.approx(theirs[0]['train_loss'], rel=1e-4)
  mine_test, = [m for m in records(metrics, 'retrain_refined') if 'test_loss' in m]
  theirs_test, = [m for m in records(finished.metrics, 'retrain_refined') if 'test_loss' in m]
  assert mine_test['test_loss'] == pytest.approx(theirs_test['test_loss'], rel=1e-3)
  assert abs(mine_test['test_acc'] - theirs_test['test_acc']) <= 2 / 256


def test_report_does_not_claim_an_untrained_baseline_accuracy(two_devices):
  result = two_devices.result
  if result['refined']['arch'] == result['baseline']['arch']:
    # The refined network is the baseline: its one retrain serves both rows.
    assert result['baseline']['test_acc'] == result['refined']['test_acc']
  else:
    assert result['baseline']['test_acc'] is None
    assert result['change_percent']['test_acc'] is None


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------


def test_config_arch_with_an_unknown_op_is_rejected(tmp_path):
  config = tiny_config()
  num_nodes = families.build_space(config).num_nodes
  config.arch = ','.join(['conv3x3'] * (num_nodes - 1) + ['conv7x7'])
  with pytest.raises(ValueError, match=r"unknown op 'conv7x7'.*conv3x3"):
    pipeline.run(config, str(tmp_path))
  assert not os.path.exists(tmp_path / 'arch.json')


def test_config_arch_of_the_wrong_length_is_rejected(tmp_path):
  config = tiny_config(arch='conv3x3,sep3x3')
  num_nodes = families.build_space(config).num_nodes
  with pytest.raises(ValueError, match=rf'has 2 entries .* has {num_nodes} nodes'):
    pipeline.run(config, str(tmp_path))


def test_config_arch_with_a_disallowed_op_is_rejected(tmp_path):
  config = tiny_config()
  space = families.build_space(config)
  node = next(i for i, n in enumerate(space.nodes) if 'conv5x5' not in n.candidates)
  arch = ['conv3x3'] * space.num_nodes
  arch[node] = 'conv5x5'
  config.arch = ','.join(arch)
  with pytest.raises(ValueError, match=rf"'conv5x5' is not a candidate of node {node}"):
    pipeline.run(config, str(tmp_path))


def test_space_validate_rejects_out_of_range_indices():
  space = families.build_space(tiny_config())
  good = list(space.baseline())
  assert space.validate(good) == tuple(good)
  assert space.validate(np.asarray(good)) == tuple(good)
  for bad in (len(ops.OP_NAMES), -1, 99):
    with pytest.raises(ValueError, match=rf'op index {bad} at node 3 .*out of range'):
      space.validate(good[:3] + [bad] + good[4:])
  with pytest.raises(ValueError, match='neither an op name nor an index'):
    space.validate(good[:-1] + [True])
  with pytest.raises(ValueError, match=rf'{space.num_nodes + 1} entries'):
    space.validate(good + [0])


def test_batch_size_not_divisible_by_the_devices_is_rejected(tmp_path):
  config = tiny_config(num_devices=2, **{'child.batch_size': 63})
  with pytest.raises(ValueError, match=r'config\.child\.batch_size 63 .*device count 2'):
    pipeline.run(config, str(tmp_path))
  config = tiny_config(num_devices=2, eval_batch_size=125)
  with pytest.raises(ValueError, match=r'config\.eval_batch_size 125 .*device count 2'):
    pipeline.run(config, str(tmp_path))


def test_bad_config_fields_are_named(tmp_path):
  with pytest.raises(ValueError, match=r'config\.dataset\.name'):
    pipeline.run(tiny_config(**{'dataset.name': 'imagenet'}), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.search\.epochs'):
    pipeline.run(tiny_config(**{'search.epochs': -1}), str(tmp_path))
  with pytest.raises(ValueError, match=r'config\.child\.batch_size=1024 exceeds'):
    pipeline.run(tiny_config(**{'child.batch_size': 1024}), str(tmp_path))


def test_cifar10_not_prepared_is_a_clear_error(tmp_path):
  empty = tmp_path / 'tfds'
  empty.mkdir()
  config = tiny_config(**{'dataset.name': 'cifar10', 'dataset.data_dir': str(empty)})
  with pytest.raises(data.DatasetNotPreparedError) as info:
    pipeline.run(config, str(tmp_path / 'run'))
  message = str(info.value)
  assert str(empty) in message and 'README' in message
  assert 'cifar10' in message
  assert not os.listdir(empty)  # nothing was written into the data dir


def test_cli_reports_a_missing_dataset_without_a_traceback(tmp_path):
  empty = tmp_path / 'tfds'
  empty.mkdir()
  workdir = tmp_path / 'run'
  proc = subprocess.run(
      [sys.executable, '-m', 'nar_jax.main', '--config=configs/quickstart.py',
       f'--workdir={workdir}', '--config.dataset.name=cifar10',
       f'--config.dataset.data_dir={empty}'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': REPO})
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  error_lines = [line for line in proc.stderr.splitlines() if line.startswith('error: ')]
  assert len(error_lines) == 1, proc.stderr
  assert str(empty) in error_lines[0] and 'cifar10' in error_lines[0]
  assert 'README' in proc.stderr
  assert not os.path.exists(workdir / 'report.json')
