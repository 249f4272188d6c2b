"""Multi-process runs (README, "Many hosts"): two local processes with two CPU devices
each (``jax.distributed``, gloo collectives) against one process with four devices.

Each run is the tiny pipeline of tests/test_pipeline.py in subprocesses
(tests/multiprocess_worker.py), sharing one persistent compilation cache. Two runs (a
few minutes of CPU each, so one run serves every test): one process of four devices,
the reference, and two processes of two devices killed right after a search
checkpoint (process 1 dies; process 0 stops), then run again, which must end as the
uninterrupted reference ends.
"""

from __future__ import annotations

import json
import os
import pickle
import socket
import subprocess
import sys

import chex
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from nar_jax import distributed, train

from test_interruption import outcome
from test_pipeline import read_metrics

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multiprocess_worker.py')
TIMEOUT_S = 900
KILLED_AFTER = 1
"""A process dies after the run's first checkpoint: search epoch 1's (no pretraining)."""


@pytest.mark.parametrize('args, message', [
    (('localhost:1234', None, 0), 'needs --num_processes and --process_id'),
    (('localhost:1234', 2, None), 'needs --num_processes and --process_id'),
    (('localhost:1234', 2, 2), r'must be in \[0, --num_processes=2\)'),
    ((None, 2, 1), 'need --coordinator_address'),
])
def test_initialize_rejects_incomplete_flags(args, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(*args)


def test_a_single_process_is_the_whole_run():
  assert distributed.initialize() is False  # nothing asked: no jax.distributed
  assert distributed.is_main_process()
  assert distributed.process_rows(12) == slice(0, 12)
  mesh = train.make_mesh(4)
  batch = np.arange(8 * 3).reshape(8, 3)
  chex.assert_trees_all_equal(np.asarray(train.shard(mesh, batch)), batch)
  chex.assert_trees_all_equal(np.asarray(train.shard_whole(mesh, batch.T, 1)), batch.T)
  assert distributed.main_process_first(lambda: 7) == 7
  with pytest.raises(KeyError, match='raised here'):
    distributed.main_process_first(lambda: {}['raised here'])


def test_an_error_that_cannot_be_pickled_is_sent_as_its_message():
  class Local(Exception):  # not importable, so not unpicklable by another process
    pass
  copy = pickle.loads(distributed._pickled(Local('the message')))  # pylint: disable=protected-access
  assert isinstance(copy, RuntimeError) and 'process 0: Local: the message' in str(copy)
  copy = pickle.loads(distributed._pickled(ValueError('kept')))  # pylint: disable=protected-access
  assert type(copy) is ValueError and str(copy) == 'kept'


def test_a_process_that_does_not_see_the_lock_is_not_sharing_the_workdir(tmp_path):
  from nar_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  with pytest.raises(workdir_lib.WorkdirError, match='must share the workdir'):
    workdir_lib.check_shared(str(tmp_path))
  with workdir_lib.lock(str(tmp_path)):
    workdir_lib.check_shared(str(tmp_path))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def run_together(commands: list[list[str]], env: dict[str, str],
                 timeout: int) -> list[tuple[int, str]]:
  """Starts every command at once; returns each one's (status, output). Any still
  running when one times out is killed."""
  procs = [subprocess.Popen(c, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True) for c in commands]
  try:
    outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    return [(p.returncode, out) for p, out in zip(procs, outputs)]
  finally:
    for p in procs:
      p.kill()


def launch(workdir: str, cache: str, num_processes: int, devices: int,
           dies: int | None = None) -> list[tuple[int, str]]:
  """Runs the worker as ``num_processes`` processes; returns each one's (status, output).
  Process ``dies`` (if any) is killed after the run's :data:`KILLED_AFTER`-th checkpoint."""
  env = dict(os.environ, JAX_PLATFORMS='cpu', JAX_COMPILATION_CACHE_DIR=cache,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0',
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES='0')
  port = free_port()
  extra = lambda i: [str(KILLED_AFTER)] if i == dies else []
  return run_together([[sys.executable, WORKER, workdir, str(num_processes), str(i), str(port),
                        str(devices), *extra(i)] for i in range(num_processes)], env, TIMEOUT_S)


def check_finished(outputs: list[tuple[int, str]]) -> None:
  for i, (status, out) in enumerate(outputs):
    assert status == 0, f'process {i} exited with {status}:\n{out[-4000:]}'


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """Workdirs and outputs: ``one`` (one process), ``killed`` and ``two`` (the same
  two-process workdir: the run whose process 1 was killed, then the run that resumed it)."""
  cache = str(tmp_path_factory.mktemp('jax_cache'))
  one = str(tmp_path_factory.mktemp('one_process'))
  two = str(tmp_path_factory.mktemp('two_processes'))
  one_out = launch(one, cache, 1, 4)
  check_finished(one_out)
  killed_out = launch(two, cache, 2, 2, dies=1)
  resumed_out = launch(two, cache, 2, 2)
  check_finished(resumed_out)
  return {'one': (one, one_out), 'killed': (two, killed_out), 'two': (two, resumed_out)}


def final_search_state(workdir: str) -> dict:
  """The last search checkpoint's state on this process's first device (weights, BN
  statistics, optimizer, controller and its baseline)."""
  directory = os.path.join(workdir, 'checkpoints', 'search')
  step = max(int(d) for d in os.listdir(directory) if d.isdigit())
  path = os.path.join(directory, str(step), 'state')
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  with ocp.StandardCheckpointer() as ckpt:
    like = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                        ckpt.metadata(path).item_metadata.tree)
    state = ckpt.restore(path, like)
  return {'step': step, 'state': jax.device_get(state)}


def test_two_processes_compute_what_one_process_computes(runs):
  one, two = runs['one'][0], runs['two'][0]
  a, b = final_search_state(one), final_search_state(two)
  assert a['step'] == b['step']
  # Parameters, BatchNorm statistics, momentum, controller parameters, Adam state, baseline.
  chex.assert_trees_all_close(b['state'], a['state'], rtol=1e-4, atol=1e-5)
  # The controller's updates (rewards, entropies, op probabilities) and the sampled
  # architectures derive scored.
  ctrl = lambda w: [m for m in read_metrics(w) if m['phase'] == 'controller']
  assert len(ctrl(one)) == len(ctrl(two)) > 0
  for x, y in zip(ctrl(one), ctrl(two)):
    assert x.keys() == y.keys()
    for k, v in x.items():
      if isinstance(v, str):
        assert y[k] == v, k
      else:
        np.testing.assert_allclose(np.asarray(y[k], float), np.asarray(v, float), rtol=1e-4,
                                   atol=1e-5, err_msg=k)
  derive_one, derive_two = (outcome(w)['results']['derive.json'] for w in (one, two))
  assert ([c['arch'] for c in derive_two['candidates']]
          == [c['arch'] for c in derive_one['candidates']])
  assert outcome(two)['arch'] == outcome(one)['arch']
  np.testing.assert_allclose(outcome(two)['report']['refined']['test_acc'],
                             outcome(one)['report']['refined']['test_acc'], atol=1e-6)


def test_killed_two_process_run_resumed_from_its_checkpoint(runs):
  (main_status, main_died), (status, died) = runs['killed'][1]
  assert status == 17 and f'killed after checkpoint {KILLED_AFTER}' in died, died[-2000:]
  # Process 0 stops at its next collective: the peer is gone.
  assert main_status != 0 and 'JaxRuntimeError' in main_died, main_died[-2000:]
  main_out = runs['two'][1][0][1]
  assert '[search] resumed from' in main_out
  # It ends as the uninterrupted run: test_two_processes_compute_what_one_process_computes.


def test_only_process_zero_writes_logs_and_reports(runs):
  one, two = runs['one'][0], runs['two'][0]
  (_, main_out), (_, other_out) = runs['two'][1]
  assert '[search]' in main_out and 'report:' in main_out
  assert '[search]' not in other_out and 'report:' not in other_out, other_out[-2000:]
  # Every record once, as in the single-process run.
  phases = lambda w: [m['phase'] for m in read_metrics(w)]
  assert phases(two) == phases(one)
  with open(os.path.join(two, 'config.json')) as f, open(os.path.join(one, 'config.json')) as g:
    assert json.load(f) == json.load(g)


# Calls that fail or write files, in two processes of a few seconds (no pipeline) ----------

CALLS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'multiprocess_calls.py')
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def call_in_processes(call: str, workdir: str, devices=(1, 1), timeout=120):
  """Runs tests/multiprocess_calls.py's ``call`` as ``len(devices)`` processes (process i
  with ``devices[i]`` CPU devices); returns each one's (status, output)."""
  port = free_port()
  return run_together([[sys.executable, CALLS, call, workdir, str(len(devices)), str(i),
                        str(port), str(n)] for i, n in enumerate(devices)],
                      dict(os.environ, JAX_PLATFORMS='cpu'), timeout)


def test_an_error_of_process_zero_is_raised_on_every_process(tmp_path):
  outputs = call_in_processes('main_process_first_error', str(tmp_path))
  for status, out in outputs:
    assert status == 2 and 'error: ValueError: refused on process 0' in out, out[-2000:]


def test_processes_with_different_device_counts_are_refused(tmp_path):
  outputs = call_in_processes('initialize', str(tmp_path), devices=(1, 2))
  for i, (status, out) in enumerate(outputs):
    assert status == 2, out[-2000:]
    assert f'process {i} has {i + 1} devices, but the 2 processes have 3 in all' in out


def test_process_zero_writes_the_face_data_and_index_the_others_read(tmp_path):
  outputs = call_in_processes('face_splits', str(tmp_path))
  (status0, out0), (status1, out1) = outputs
  assert status0 == status1 == 0, out0[-2000:] + out1[-2000:]
  labels = lambda out: next(l for l in out.splitlines() if l.startswith('labels '))
  assert labels(out0) == labels(out1)
  assert os.path.exists(tmp_path / 'data' / 'property')
  assert os.path.exists(tmp_path / 'proxy_index.npz')
  assert not [n for n in os.listdir(tmp_path) if '.tmp' in n]


def test_the_launcher_stops_every_process_when_the_workdir_is_busy(tmp_path):
  from nar_jax import workdir as workdir_lib  # pylint: disable=g-import-not-at-top
  env = dict(os.environ, NAR_PYTHON=sys.executable, NAR_PORT=str(free_port()),
             PYTHONPATH=os.pathsep.join(p for p in (REPO, os.environ.get('PYTHONPATH')) if p))
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with workdir_lib.lock(str(workdir)):  # another run holds it
    done = subprocess.run(['bash', os.path.join(REPO, 'launch', 'multiprocess_local.sh'), '2',
                           'configs/quickstart.py', str(workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=180)
  assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
  assert 'is in use by' in done.stderr
  with open(workdir / 'process_1.log') as f:
    assert 'is in use by' in f.read()
