"""One process of a test's multi-process call, without a pipeline (seconds, no compiling).

  python tests/multiprocess_calls.py CALL WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES

Starts ``jax.distributed`` on ``localhost:PORT`` as process ``PROCESS_ID`` with ``DEVICES``
CPU devices, then makes ``CALL``:

- ``initialize``: nothing more (``distributed.initialize`` checks the device counts).
- ``face_splits``: the face smoke config's proxy task, from synthetic faces written into
  ``WORKDIR/data`` on first use (by process 0); prints a digest of its labels.
- ``main_process_first_error``: process 0 raises ``ValueError('refused on process 0')``.

An error is printed as ``error: <type>: <message>`` with exit status 2.
"""

import hashlib
import os
import sys

call, workdir, num_processes, process_id, port, devices = sys.argv[1:7]
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={devices}')
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]  # nar_jax from this checkout; the test helpers

from nar_jax import distributed  # noqa: E402


def refuse():
  raise ValueError('refused on process 0')


try:
  distributed.initialize(f'localhost:{port}', int(num_processes), int(process_id))
  if call == 'face_splits':
    from config_testing import load_config  # pylint: disable=g-import-not-at-top
    from nar_jax.tasks import faces  # pylint: disable=g-import-not-at-top
    splits = faces.proxy_splits(load_config('face_lresnet50e_ir', 'smoke'), workdir)
    digest = hashlib.sha256(splits.train.labels.tobytes() + splits.valid.labels.tobytes())
    print(f'labels {digest.hexdigest()} classes {splits.num_classes}', flush=True)
  elif call == 'main_process_first_error':
    distributed.main_process_first(refuse)
    print('not refused', flush=True)
  elif call != 'initialize':
    raise SystemExit(f'unknown call {call}')
except ValueError as error:
  print(f'error: {type(error).__name__}: {error}', flush=True)
  sys.exit(2)
print('done', flush=True)
