"""One process of a test's multi-process run: the tiny pipeline of tests/test_pipeline.py.

  python tests/multiprocess_worker.py WORKDIR NUM_PROCESSES PROCESS_ID PORT DEVICES [EXIT_AFTER]

Runs ``pipeline.run`` of ``tiny_config`` (no pretraining, two derive samples, no baseline
retraining: the least that still searches, derives and retrains) with the tiny space on
``DEVICES`` CPU devices of this process, as process ``PROCESS_ID`` of ``NUM_PROCESSES``
(``jax.distributed`` on ``localhost:PORT``; one process: no ``jax.distributed``).
``EXIT_AFTER=k``: the process dies (``os._exit(17)``, no cleanup, as a killed job) right
after the run's k-th checkpoint is on disk.
"""

import os
import sys

workdir, num_processes, process_id, port, devices = sys.argv[1:6]
exit_after = int(sys.argv[6]) if len(sys.argv) > 6 else None
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={devices}')
TESTS = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(TESTS), TESTS]  # nar_jax from this checkout; the test helpers

from nar_jax import checkpoint, distributed, train  # noqa: E402
from test_pipeline import run_tiny, tiny_config  # noqa: E402

train.add_cpu_xla_flags()
if int(num_processes) > 1:
  distributed.initialize(f'localhost:{port}', int(num_processes), int(process_id))

if exit_after is not None:
  saves = []
  save = checkpoint.PhaseCheckpoints.save

  def save_then_die(self, step, state, meta):
    save(self, step, state, meta)
    saves.append(step)
    if len(saves) == exit_after:
      print(f'process {process_id}: killed after checkpoint {len(saves)}', flush=True)
      os._exit(17)

  checkpoint.PhaseCheckpoints.save = save_then_die

run_tiny(tiny_config(num_devices=0, **{"pretrain.epochs": 0, "derive.num_samples": 2,
                                      "retrain.baseline": False}), workdir)
