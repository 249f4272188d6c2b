"""Tests of nar_jax.evaluate: the search-quality evaluation of a finished run.

One tiny finished run (the 4-node space of tests/test_pipeline.py, persistent
compilation cache), evaluated with K=3 random architectures: first interrupted after
one random retrain, then resumed; the tests read what the resumed evaluation wrote.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types

import jax
import ml_collections
import numpy as np
import pytest
import scipy.stats

from nar_jax import config as config_lib
from nar_jax import data, evaluate, families, joint, pipeline, tasks
from nar_jax.phases import context, retrain, supernet
from config_testing import load_config
from test_configs import VARIANTS
from test_pipeline import REPO, read_json, run_tiny, tiny_config, tiny_space, tiny_space_family
import model_testing

NUM_RANDOM = 3
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def tiny_run_config():
  return tiny_config(**{'search.epochs': 1})


def evaluate_tiny(workdir, num_random=NUM_RANDOM, config=None):
  with tiny_space_family():
    return evaluate.evaluate(workdir, num_random, config)


class Interrupted(Exception):
  pass


@pytest.fixture(scope='module')
def evaluated(tmp_path_factory, compile_cache):
  """A finished tiny run, evaluated: interrupted after the first random retrain, resumed."""
  workdir = str(tmp_path_factory.mktemp('run'))
  run_tiny(tiny_run_config(), workdir)
  retrained = []
  real_run_retrain = retrain.run

  def interrupt_second_random(ctx, nets, name, arch):
    if name.startswith('random_') and len(retrained) == 1:
      raise Interrupted(name)
    retrained.append(name)
    return real_run_retrain(ctx, nets, name, arch)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(retrain, 'run', interrupt_second_random)
    with pytest.raises(Interrupted):
      evaluate_tiny(workdir)
  interrupted = list(retrained)
  retrained.clear()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(retrain, 'run', lambda *a: retrained.append(a[2]) or real_run_retrain(*a))
    result = evaluate_tiny(workdir)
  directory = os.path.join(workdir, evaluate.EVALUATION_DIR)
  with open(os.path.join(directory, 'evaluation.md')) as f:
    md = f.read()
  return types.SimpleNamespace(
      workdir=workdir, result=result, md=md, interrupted=interrupted, resumed=list(retrained),
      json=read_json(os.path.join(directory, 'evaluation.json')),
      report=read_json(os.path.join(workdir, 'report.json')),
      arch=read_json(os.path.join(workdir, 'arch.json')))


def _types(config: ml_collections.ConfigDict, prefix=''):
  """``{field path: type}`` of every leaf of ``config``."""
  out = {}
  for name, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_types(value, f'{prefix}{name}.'))
    else:
      out[prefix + name] = type(value)
  return out


def test_config_json_round_trips_every_field_and_type(evaluated):
  loaded = evaluate.load_run_config(evaluated.workdir)
  original = tiny_run_config()
  assert loaded.to_dict() == original.to_dict()
  assert _types(loaded) == _types(original)


def test_evaluation_files_agree_and_are_measured(evaluated):
  result, rows = evaluated.json, evaluated.json['rows']
  assert result == json.loads(json.dumps(evaluated.result))
  assert result['metric'] == 'test accuracy' and result['num_random'] == NUM_RANDOM
  assert [r['source'] for r in rows] == ['baseline', 'refined'] + [
      f'random_{i:02d}' for i in range(NUM_RANDOM)]
  baseline, refined, *randoms = rows
  # Baseline and refined: the run's own retrained test accuracies and derive score.
  assert baseline['accuracy'] == evaluated.report['baseline']['test_acc']
  assert refined['accuracy'] == evaluated.report['refined']['test_acc']
  assert refined['op_indices'] == evaluated.arch['op_indices']
  assert refined['valid_acc'] == pytest.approx(evaluated.arch['valid_acc'], abs=1e-6)
  assert baseline['valid_acc'] == pytest.approx(evaluated.report['baseline']['valid_acc'],
                                                abs=1e-6)
  # Random architectures: distinct, neither baseline nor refined, of the space.
  vectors = [tuple(r['op_indices']) for r in rows]
  assert len(set(vectors[2:])) == NUM_RANDOM and not set(vectors[2:]) & set(vectors[:2])
  splits = data.load_splits('synthetic')
  for r in rows:
    counts = model_testing.count_architecture(tiny_space(), r['op_indices'], splits.image_shape[:2],
                                         splits.image_shape[2], splits.num_classes)
    assert (r['params'], r['macs']) == (counts.params, counts.macs)
    assert 0 <= r['valid_acc'] <= 1 and 0 <= r['accuracy'] <= 1
  for i, r in enumerate(randoms):
    cached = read_json(os.path.join(evaluated.workdir, 'evaluation', f'retrain_random_{i:02d}.json'))
    assert cached['retrained']['test_acc'] == r['accuracy']

  # The statistics, recomputed from the rows.
  s = result['summary']
  distinct = list({tuple(r['op_indices']): r for r in rows[::-1]}.values())
  tau, p_value = scipy.stats.kendalltau([r['valid_acc'] for r in distinct],
                                        [r['accuracy'] for r in distinct])
  assert s['kendall']['num_architectures'] == len(set(vectors))
  if np.isnan(tau):
    assert s['kendall']['tau'] is None
  else:
    assert s['kendall']['tau'] == pytest.approx(tau) and s['kendall']['p_value'] == pytest.approx(
        p_value)
  accuracy = np.array([r['accuracy'] for r in randoms])
  assert s['random']['percentile'] == pytest.approx(100 * np.mean(accuracy <= refined['accuracy']))
  assert s['random']['median_accuracy'] == pytest.approx(np.median(accuracy))
  cheaper = np.array([r['macs'] <= refined['macs'] for r in randoms])
  group = s['random_at_most_refined_macs']
  assert group['count'] == int(cheaper.sum())
  if cheaper.any():
    assert group['percentile'] == pytest.approx(
        100 * np.mean(accuracy[cheaper] <= refined['accuracy']))
  else:
    assert group['percentile'] is None

  # The markdown shows the same numbers.
  md = evaluated.md
  for r in rows:
    assert (f'| {r["source"]} | {",".join(r["arch"])} | {r["params"]:,} | {r["macs"]:,} | '
            f'{r["valid_acc"]:.4f} | {r["accuracy"]:.4f} |') in md
  assert f'{s["random"]["percentile"]:.1f}%' in md
  if s['kendall']['tau'] is not None:
    assert f'{s["kendall"]["tau"]:.3f} (p = {s["kendall"]["p_value"]:.3g})' in md
  assert 'test accuracy' in md and 'at most the refined network' in md

  with open(os.path.join(evaluated.workdir, 'evaluation', 'evaluation.png'), 'rb') as f:
    png = f.read()
  assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_interrupted_evaluation_resumes_without_redoing_a_finished_retrain(evaluated):
  assert evaluated.interrupted == ['random_00']
  assert evaluated.resumed == ['random_01', 'random_02']


def test_rerun_of_a_finished_evaluation_measures_nothing(evaluated, monkeypatch):
  def must_not_measure(*args, **kwargs):
    raise AssertionError('a finished evaluation measured again')

  monkeypatch.setattr(retrain, 'run', must_not_measure)
  monkeypatch.setattr(supernet, 'eval_step', must_not_measure)
  os.remove(os.path.join(evaluated.workdir, 'evaluation', 'evaluation.md'))
  assert evaluate_tiny(evaluated.workdir) == evaluated.result
  with open(os.path.join(evaluated.workdir, 'evaluation', 'evaluation.md')) as f:
    assert f.read() == evaluated.md


def test_a_run_without_config_json_takes_its_config_file(evaluated, monkeypatch):
  monkeypatch.setattr(retrain, 'run', None)  # nothing is retrained
  path = os.path.join(evaluated.workdir, pipeline.CONFIG_FILE)
  os.remove(path)
  with pytest.raises(ValueError, match=r'predates config\.json.*--config='):
    evaluate_tiny(evaluated.workdir)
  assert evaluate_tiny(evaluated.workdir, config=tiny_run_config()) == evaluated.result
  assert os.path.exists(path)  # written again, as every run writes it
  with pytest.raises(ValueError, match=r"--config differs from the run's .*config\.json"):
    evaluate_tiny(evaluated.workdir, config=tiny_config())


@pytest.mark.parametrize('name,variant', [(name, variant) for name, variants in VARIANTS.items()
                                          for variant in [None, *variants]])
def test_every_config_file_round_trips_through_config_json(tmp_path, name, variant):
  config = load_config(name, variant)
  pipeline.write_config(config, str(tmp_path))
  loaded = evaluate.load_run_config(str(tmp_path))
  assert loaded.to_dict() == config.to_dict()
  assert _types(loaded) == _types(config)


def test_random_architectures_are_a_prefix_of_a_longer_draw(evaluated):
  with tiny_space_family():
    ctx, nets = pipeline.setup(evaluate.load_run_config(evaluated.workdir), evaluated.workdir)
  exclude = (nets.space.baseline(), tuple(evaluated.arch['op_indices']))
  five = evaluate.random_architectures(ctx, nets, 5, exclude)
  assert [list(a) for a in five[:NUM_RANDOM]] == [r['op_indices']
                                                  for r in evaluated.json['rows'][2:]]
  assert len(set(five)) == 5 and not set(five) & set(exclude)
  available = nets.family.space_size(nets.space) - len(set(exclude))
  assert nets.family.space_size(nets.space) == 2 ** 4
  with pytest.raises(ValueError, match=f'exceeds the {available} architectures'):
    evaluate.random_architectures(ctx, nets, available + 1, exclude)


def test_random_architectures_of_a_joint_space():
  config = tiny_config(**{'model.base': 'enas_macro', 'model.num_layers': 3})
  space = joint.joint_space(3, 4)
  ctx = context.Context(config, None, None, None, jax.random.PRNGKey(0))
  nets = context.Networks(config, families.macro.FAMILY, tasks.task_for(config), space, None)
  assert nets.family.space_size(space) == 6 ** 3 * 2 ** 3
  archs = evaluate.random_architectures(ctx, nets, 6, (space.baseline(),))
  assert len(set(archs)) == 6 and space.baseline() not in archs
  assert all(space.validate(a) == a and len(a) == space.arch_length for a in archs)
  assert archs == evaluate.random_architectures(ctx, nets, 6, (space.baseline(),))


def test_random_retrains_get_distinct_deterministic_keys():
  ctx = context.Context(None, None, None, None, jax.random.PRNGKey(0))
  keys = [jax.random.key_data(ctx.key(f'retrain_random_{i:02d}')).tolist() for i in range(3)]
  named = [jax.random.key_data(ctx.key(p)).tolist() for p in context.PHASE_KEYS]
  assert len({str(k) for k in keys + named}) == len(keys) + len(named)
  assert jax.random.key_data(ctx.key('retrain_random_01')).tolist() == keys[1]
  with pytest.raises(KeyError):
    ctx.key('retrain_random_x')


# ---------------------------------------------------------------------------------------
# Bad input.
# ---------------------------------------------------------------------------------------


def test_a_run_without_config_json_is_a_clear_error(tmp_path):
  with pytest.raises(ValueError, match=r'predates config\.json.*--config='):
    evaluate.evaluate(str(tmp_path), NUM_RANDOM)


def test_an_unfinished_run_and_a_bad_num_random_are_rejected(tmp_path):
  with pytest.raises(ValueError, match='has no report.json: finish the run first'):
    evaluate.evaluate(str(tmp_path), NUM_RANDOM, config=tiny_run_config())
  for bad in (0, -2):
    with pytest.raises(ValueError, match='must be a positive integer'):
      evaluate.evaluate(str(tmp_path), bad, config=tiny_run_config())


def test_cli_reports_a_missing_config_json_without_a_traceback(tmp_path):
  proc = subprocess.run(
      [sys.executable, '-m', 'nar_jax.evaluate', f'--workdir={tmp_path}', '--num_random=3'],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 2, proc.stderr
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.startswith('error: ') and 'predates config.json' in proc.stderr


def test_a_field_added_to_the_schema_after_the_run_takes_its_default(tmp_path):
  """An older run's config.json lacks fields the schema gained since; they are the
  defaults the run used."""
  config = config_lib.base_config()
  stored = config.to_dict()
  del stored['model']['choice']
  del stored['search']['cost']
  stored['seed'] = 7
  with open(tmp_path / pipeline.CONFIG_FILE, 'w') as f:
    json.dump(stored, f)
  loaded = evaluate.load_run_config(str(tmp_path))
  assert loaded.seed == 7
  assert loaded.model.choice == config.model.choice
  assert loaded.search.cost.to_dict() == config.search.cost.to_dict()
