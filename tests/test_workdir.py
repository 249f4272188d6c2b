"""The workdir contract (nar_jax.workdir): one config per workdir, one run at a time,
writable before training, checkpoints that survive a failed save.

The change detection is driven by the schema: every leaf of ``config.base_config()`` is
perturbed in turn, so a field added to the schema is covered without editing this file.
The command-line test runs ``nar_jax.main`` in subprocesses with the tiny search space
of tests/test_pipeline.py (and JAX's persistent compilation cache shared between them).
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys

import jax.numpy as jnp
import ml_collections
import pytest

from nar_jax import config as config_lib
from nar_jax import train
from nar_jax import workdir as workdir_lib
from nar_jax.checkpoint import PhaseCheckpoints
from nar_jax.workdir import WorkdirError
from test_pipeline import REPO, read_metrics, records, run_tiny, tiny_config

TESTS = os.path.dirname(os.path.abspath(__file__))


def perturbed(value):
  """A value of the same type as ``value`` that differs from it."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 0.5
  if isinstance(value, str):
    return value + ',x'
  raise TypeError(f'no perturbation for {value!r}')


def set_field(config: ml_collections.ConfigDict, name: str, value) -> None:
  *sections, leaf = name.split('.')
  for section in sections:
    config = config[section]
  config[leaf] = value


def write_stored(workdir, config=None) -> ml_collections.ConfigDict:
  config = config or config_lib.base_config()
  workdir_lib.write_config(config, str(workdir))
  return config


def touch(workdir, *paths) -> None:
  for path in paths:
    full = os.path.join(workdir, path)
    os.makedirs(os.path.dirname(full), exist_ok=True)
    with open(full, 'w') as f:
      f.write('{}')


def existing(workdir) -> set[str]:
  return {os.path.relpath(os.path.join(d, f), workdir)
          for d, _, files in os.walk(workdir) for f in files}


# ---------------------------------------------------------------------------------------
# Change detection over the schema.
# ---------------------------------------------------------------------------------------


def test_every_schema_field_is_a_change_unless_it_is_harmless():
  stored = config_lib.base_config()
  fields = workdir_lib.leaves(stored)
  assert len(fields) > 50  # the whole schema, nested sections included
  harmless = [name for name in fields if workdir_lib.is_harmless(name)]
  assert sorted(harmless) == sorted(workdir_lib.HARMLESS_FIELDS)  # each names a real field
  for name, value in fields.items():
    current = config_lib.base_config()
    set_field(current, name, perturbed(value))
    differences = workdir_lib.config_differences(stored, current)
    if name in harmless:
      assert differences == [], name
    else:
      assert differences == [(name, value, perturbed(value))], name


def test_a_field_only_one_config_has_is_a_change():
  stored, current = config_lib.base_config(), config_lib.base_config()
  current.model.new_field = 3
  assert workdir_lib.config_differences(stored, current) == [
      ('model.new_field', workdir_lib.ABSENT, 3)]


def test_an_older_config_json_gets_the_fields_the_schema_gained(tmp_path):
  config = config_lib.base_config()
  stored = config.to_dict()
  del stored['model']['choice']
  del stored['allow_changes']
  with open(tmp_path / workdir_lib.CONFIG_FILE, 'w') as f:
    json.dump(stored, f)
  assert workdir_lib.config_differences(workdir_lib.read_config(str(tmp_path)), config) == []


# ---------------------------------------------------------------------------------------
# The comparison at the start of a run.
# ---------------------------------------------------------------------------------------


def test_a_differing_config_stops_the_run_naming_fields_values_and_ways_out(tmp_path):
  write_stored(tmp_path)
  touch(tmp_path, 'results/derive.json', 'results/retrain_refined.json')
  before = existing(tmp_path)
  current = config_lib.base_config()
  current.model.width = 0.25
  current.seed = 3
  current.log_every_steps = 7  # harmless: not listed
  with pytest.raises(WorkdirError) as info:
    with workdir_lib.claim(current, str(tmp_path)):
      raise AssertionError('the run started')
  message = str(info.value)
  assert '2 field(s) differ' in message
  assert 'config.model.width: 1.0 (stored) != 0.25 (now)' in message
  assert 'config.seed: 0 (stored) != 3 (now)' in message
  assert 'log_every_steps' not in message
  assert 'new --workdir' in message and '--config.allow_changes=FIELDS' in message
  assert 'every phase depends on model.width, seed' in message
  assert existing(tmp_path) - {workdir_lib.LOCK_FILE} == before  # config.json untouched
  assert workdir_lib.read_config(str(tmp_path)).model.width == 1.0


def test_a_continuable_difference_suggests_the_override(tmp_path):
  write_stored(tmp_path)
  current = config_lib.base_config()
  current.retrain.epochs = 300
  current.search.epochs = 10
  with pytest.raises(WorkdirError) as info:
    with workdir_lib.claim(current, str(tmp_path)):
      pass
  assert 'config.retrain.epochs: 200 (stored) != 300 (now)' in str(info.value)
  assert ('new --workdir, or continue this run deliberately with the new values: '
          '--config.allow_changes=retrain.epochs,search.epochs') in str(info.value)


def test_harmless_differences_run(tmp_path):
  write_stored(tmp_path)
  current = config_lib.base_config()
  current.log_every_steps = 7
  current.retrain.verify_every_epochs = 2
  with workdir_lib.claim(current, str(tmp_path)) as phase:
    assert phase is None


ALL_PHASE_FILES = ('results/derive.json', 'results/retrain_refined.json',
                   'results/retrain_baseline.json', 'arch.json', 'report.json', 'report.md',
                   'evaluation/shared_scores.json', 'evaluation/retrain_random_00.json',
                   'evaluation/evaluation.json', 'checkpoints/pretrain/2/x',
                   'checkpoints/search/8/x', 'checkpoints/retrain_refined/6/x',
                   'checkpoints/retrain_random_00/6/x')


@pytest.mark.parametrize('field, value, phase, kept', [
    ('retrain.epochs', 201, 'retrain',
     {'results/derive.json', 'arch.json', 'evaluation/shared_scores.json',
      'checkpoints/pretrain/2/x', 'checkpoints/search/8/x', 'checkpoints/retrain_refined/6/x',
      'checkpoints/retrain_random_00/6/x'}),
    ('derive.num_samples', 20, 'derive',
     {'evaluation/shared_scores.json', 'checkpoints/pretrain/2/x', 'checkpoints/search/8/x'}),
    ('search.epochs', 151, 'search', {'checkpoints/pretrain/2/x', 'checkpoints/search/8/x'}),
    ('child.optimizer.lr_max', 0.1, 'pretrain', {'checkpoints/pretrain/2/x'}),
])
def test_an_allowed_change_recomputes_from_the_first_phase_that_uses_it(
    tmp_path, field, value, phase, kept, capsys):
  write_stored(tmp_path)
  touch(tmp_path, *ALL_PHASE_FILES)
  current = config_lib.base_config()
  set_field(current, field, value)
  current.allow_changes = field
  with workdir_lib.claim(current, str(tmp_path)) as continued:
    assert continued.name == phase
  assert existing(tmp_path) == kept | {workdir_lib.CONFIG_FILE, workdir_lib.LOCK_FILE}
  assert f'recomputing from {phase}' in capsys.readouterr().out


def test_allow_changes_lets_only_the_listed_fields_differ(tmp_path):
  write_stored(tmp_path)
  current = config_lib.base_config()
  current.retrain.epochs = 300
  current.retrain.optimizer.lr_max = 0.2
  current.seed = 1
  current.allow_changes = 'retrain'  # a section: every retrain.* field
  with pytest.raises(WorkdirError) as info:
    with workdir_lib.claim(current, str(tmp_path)):
      pass
  message = str(info.value)
  assert '1 field(s) differ' in message and 'config.seed' in message
  assert 'retrain.epochs' not in message


@pytest.mark.parametrize('field, value, allow, match', [
    ('model.width', 0.5, 'model.width', r'every phase depends on it.*new --workdir'),
    ('retrain.epochs', 100, 'retrain.epochs', r'cannot go down from 200 to 100'),
    ('retrain.epochs', 300, 'retrain.epoch', r"names 'retrain.epoch', which is not a config"),
])
def test_allow_changes_refuses_what_cannot_continue(tmp_path, field, value, allow, match):
  write_stored(tmp_path)
  touch(tmp_path, *ALL_PHASE_FILES)
  before = existing(tmp_path)
  current = config_lib.base_config()
  set_field(current, field, value)
  current.allow_changes = allow
  with pytest.raises(WorkdirError, match=match):
    with workdir_lib.claim(current, str(tmp_path)):
      pass
  assert existing(tmp_path) - {workdir_lib.LOCK_FILE} == before


def test_a_workdir_without_config_json_keeps_its_results(tmp_path, capsys):
  touch(tmp_path, *ALL_PHASE_FILES)
  before = existing(tmp_path)
  with workdir_lib.claim(config_lib.base_config(), str(tmp_path)) as phase:
    assert phase is None
  assert existing(tmp_path) == before | {workdir_lib.LOCK_FILE}
  assert 'no config.json' in capsys.readouterr().out


# ---------------------------------------------------------------------------------------
# The lock.
# ---------------------------------------------------------------------------------------

HOLD = ('import sys; from nar_jax import workdir\n'
        'with workdir.lock(sys.argv[1]):\n'
        '  print("held", flush=True); sys.stdin.read()\n')


def hold_lock(workdir) -> subprocess.Popen:
  """A process holding ``workdir``'s lock until its stdin closes (or it is killed)."""
  proc = subprocess.Popen([sys.executable, '-c', HOLD, str(workdir)], cwd=REPO,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                          env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert proc.stdout.readline() == 'held\n'
  return proc


def test_a_second_run_is_refused_naming_the_holder_then_runs_once_it_ends(tmp_path):
  proc = hold_lock(tmp_path)
  try:
    with pytest.raises(WorkdirError, match=rf'in use by pid {proc.pid} on .*one run per workdir'):
      with workdir_lib.claim(config_lib.base_config(), str(tmp_path)):
        raise AssertionError('the run started')
  finally:
    proc.communicate('')  # releases the lock and exits
  with workdir_lib.claim(config_lib.base_config(), str(tmp_path)):
    pass


def test_the_lock_of_a_killed_process_is_taken_over(tmp_path, capsys):
  proc = hold_lock(tmp_path)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  proc.stdout.close()
  proc.stdin.close()
  lock_file = tmp_path / workdir_lib.LOCK_FILE
  assert json.loads(lock_file.read_text())['pid'] == proc.pid  # left behind by the dead run
  with workdir_lib.lock(str(tmp_path)):
    assert json.loads(lock_file.read_text())['pid'] == os.getpid()
  assert f'named pid {proc.pid}' in capsys.readouterr().out
  assert lock_file.read_text() == ''  # released


def test_the_lock_is_released_after_an_exception(tmp_path):
  with pytest.raises(RuntimeError):
    with workdir_lib.lock(str(tmp_path)):
      with pytest.raises(WorkdirError, match=rf'in use by pid {os.getpid()}'):
        with workdir_lib.lock(str(tmp_path)):
          pass
      raise RuntimeError('the run failed')
  with workdir_lib.lock(str(tmp_path)):
    pass


# ---------------------------------------------------------------------------------------
# An unwritable or full workdir; a failed checkpoint save.
# ---------------------------------------------------------------------------------------


@pytest.fixture
def no_training(monkeypatch):
  def must_not_train(*args, **kwargs):
    raise AssertionError('training started')

  monkeypatch.setattr(train, 'create_train_state', must_not_train)


@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only directories')
def test_a_read_only_workdir_is_a_clear_error_before_training(tmp_path, no_training):
  workdir = tmp_path / 'run'
  workdir.mkdir()
  workdir.chmod(0o500)
  try:
    with pytest.raises(WorkdirError, match=rf'{workdir} cannot be written .*Permission denied'):
      run_tiny(tiny_config(), workdir)
  finally:
    workdir.chmod(0o700)


def test_a_workdir_inside_a_file_is_a_clear_error_before_training(tmp_path, no_training):
  (tmp_path / 'file').write_text('')
  workdir = tmp_path / 'file' / 'run'
  with pytest.raises(WorkdirError, match=r'cannot be written .*Not a directory.*another --workdir'):
    run_tiny(tiny_config(), workdir)


def test_a_full_workdir_is_a_clear_error_before_training(tmp_path, monkeypatch, no_training):
  def no_space(fd):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(workdir_lib.os, 'fsync', no_space)
  with pytest.raises(WorkdirError, match=r'\.write_probe\.\d+: No space left on device'):
    run_tiny(tiny_config(), tmp_path)
  assert os.listdir(tmp_path) == []  # the probe was removed


FAILED_SAVE = (
    'import errno, os, sys\n'
    'import jax.numpy as jnp, orbax.checkpoint as ocp\n'
    'from nar_jax.checkpoint import PhaseCheckpoints\n'
    'ckpt = PhaseCheckpoints(sys.argv[1], "phase")\n'
    'for step in (1, 2):\n'
    '  ckpt.save(step, {"w": jnp.full(3, float(step))}, {"epoch": step})\n'
    'def no_space(*args, **kwargs):\n'
    '  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n'
    'ocp.JsonCheckpointHandler.async_save = no_space  # the meta item fails mid-save\n'
    'try:\n'
    '  ckpt.save(3, {"w": jnp.full(3, 3.0)}, {"epoch": 3})\n'
    'except ValueError as error:\n'
    '  print(type(error).__name__, error, flush=True)\n'
    'os._exit(0)  # as a run stops at the error (Orbax waits minutes for the failed save)\n')


def test_a_failed_checkpoint_save_keeps_the_previous_checkpoint(tmp_path):
  proc = subprocess.run([sys.executable, '-c', FAILED_SAVE, str(tmp_path)], cwd=REPO,
                        capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'PYTHONPATH': REPO, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.startswith('WorkdirError checkpoint step 3 could not be written to '
                                f'{tmp_path}/checkpoints/phase'), proc.stdout
  assert 'No space left on device' in proc.stdout
  assert 'the previous checkpoint (step 2) is kept' in proc.stdout
  resumed = PhaseCheckpoints(str(tmp_path), 'phase')
  assert resumed.latest_step() == 2
  for step in (1, 2):
    state, meta = resumed.restore(step, {'w': jnp.zeros(3)})
    assert meta == {'epoch': step}
    assert state['w'].tolist() == [float(step)] * 3
  resumed.save(3, {'w': jnp.full(3, 3.0)}, {'epoch': 3})  # the run resumes and saves again
  assert resumed.latest_step() == 3
  resumed.close()


# ---------------------------------------------------------------------------------------
# The command line.
# ---------------------------------------------------------------------------------------

SMOKE = ('--config.dataset.name=synthetic', '--config.model.width=0.0625',
         '--config.arch=baseline', '--config.retrain.epochs=1', '--config.retrain.batch_size=64',
         '--config.eval_batch_size=128', '--config.log_every_steps=4', '--config.num_devices=1')
"""The quickstart at smoke size: test_pipeline.tiny_config's sizes, and the baseline
retrained without a search (a search would triple the compile time; the phases a
continuation recomputes are tested above)."""

MAIN = ('import sys, test_pipeline\n'
        'from nar_jax import families, main\n'
        'families.register(families.resnet.FAMILY._replace(space=test_pipeline.tiny_space))\n'
        'main.cli()\n')
"""``nar_jax.main`` with test_pipeline's tiny search space."""


def run_main(workdir, cache_dir, *flags) -> subprocess.CompletedProcess:
  return subprocess.run(
      [sys.executable, '-c', MAIN, '--config=configs/quickstart.py', f'--workdir={workdir}',
       *SMOKE, *flags], cwd=REPO, capture_output=True, text=True, timeout=300,
      env={**os.environ, 'PYTHONPATH': os.pathsep.join([REPO, TESTS]), 'JAX_PLATFORMS': 'cpu',
           'JAX_COMPILATION_CACHE_DIR': str(cache_dir),
           'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
           'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'})


def contents(workdir) -> dict[str, bytes]:
  out = {}
  for path in sorted(existing(workdir)):
    with open(os.path.join(workdir, path), 'rb') as f:
      out[path] = f.read()
  return out


def test_cli_refuses_another_config_and_continues_an_allowed_one(tmp_path):
  workdir, cache = tmp_path / 'run', tmp_path / 'jax_cache'
  first = run_main(workdir, cache)
  assert first.returncode == 0, first.stderr
  before = contents(workdir)

  other = run_main(workdir, cache, '--config.model.width=0.25')
  assert other.returncode == 2, other.stderr
  assert 'Traceback' not in other.stderr
  assert other.stderr.startswith(f'error: {workdir} holds a run of another config')
  assert 'config.model.width: 0.0625 (stored) != 0.25 (now)' in other.stderr
  assert 'new --workdir' in other.stderr and 'every phase depends on model.width' in other.stderr
  assert contents(workdir) == before  # nothing written

  more = run_main(workdir, cache, '--config.retrain.epochs=2',
                  '--config.allow_changes=retrain.epochs')
  assert more.returncode == 0, more.stderr
  assert 'recomputing from retrain' in more.stdout
  assert '[retrain_refined] resumed from' in more.stdout and 'after epoch 1' in more.stdout
  metrics = read_metrics(workdir)
  new = metrics[len(read_metrics_bytes(before['metrics.jsonl'])):]
  assert [m.get('epoch') for m in records(new, 'retrain_refined') if 'train_loss' in m] == [2]
  assert workdir_lib.read_config(str(workdir)).retrain.epochs == 2
  assert json.loads((workdir / 'report.json').read_text())['refined']['test_acc'] == (
      records(new, 'retrain_refined')[-1]['test_acc'])  # the report is the continued run's

  # A workdir from before config.json: its results are trusted, config.json is written.
  os.remove(workdir / workdir_lib.CONFIG_FILE)
  old = run_main(workdir, cache, '--config.retrain.epochs=2')
  assert old.returncode == 0, old.stderr
  assert 'no config.json' in old.stdout and '[retrain_refined] already done' in old.stdout
  assert workdir_lib.read_config(str(workdir)).retrain.epochs == 2


def read_metrics_bytes(data: bytes) -> list[dict]:
  return [json.loads(line) for line in data.decode().splitlines()]
