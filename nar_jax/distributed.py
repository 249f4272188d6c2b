"""Runs over many processes (one per host, or per GPU): ``jax.distributed``, each
process's rows of a global batch, and which process writes the run's files.

A multi-process run is the same program on every process (README, "Many hosts"). The
mesh spans every process's devices, ordered by process (:func:`nar_jax.train.make_mesh`),
so process ``p`` of ``P`` holds rows ``[p * B / P, (p + 1) * B / P)`` of every global
batch of ``B`` (:func:`process_rows`): it reads and decodes only those, and
:func:`nar_jax.train.shard` assembles the global array from them. Replicated state
(weights, optimizer, controller) is computed identically everywhere; Orbax writes
checkpoints from all processes together; process 0 alone writes ``config.json``,
``metrics.jsonl``, results, reports and progress lines (:func:`is_main_process`).

With one process (no ``--coordinator_address``, no cluster) every function here is the
identity of a single-process run: rows ``[0, B)``, process 0, nothing to wait for.
"""

from __future__ import annotations

import pickle
from typing import Callable, TypeVar

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils

T = TypeVar('T')


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, *, cluster: bool = False) -> bool:
  """Starts ``jax.distributed`` when asked; returns whether it did.

  Asked means a ``coordinator_address`` (then ``num_processes`` and ``process_id`` are
  required), or ``cluster``: a cluster JAX detects (SLURM, Open MPI, Cloud TPU, GKE)
  gives all three. Neither: nothing happens and the run is single-process. Must run
  before the first JAX computation. CPU collectives between processes use gloo.

  Raises:
    ValueError: a coordinator address without the process count or id, or an id
      outside ``[0, num_processes)``.
  """
  if coordinator_address is None and not cluster:
    if num_processes not in (None, 1) or process_id not in (None, 0):
      raise ValueError('--num_processes/--process_id need --coordinator_address=HOST:PORT '
                       '(or --distributed on a cluster JAX detects)')
    return False
  if coordinator_address is not None:
    if num_processes is None or process_id is None:
      raise ValueError(f'--coordinator_address={coordinator_address} needs --num_processes '
                       f'and --process_id (this process\'s index, 0 for the coordinator)')
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise ValueError(f'--process_id={process_id} must be in [0, --num_processes='
                       f'{num_processes})')
  # Only the CPU client reads it; GPU and TPU collectives are NCCL's and ICI's.
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)
  check_equal_local_devices()
  return True


def check_equal_local_devices() -> None:
  """Every process has the same number of local devices (each reads an equal share of
  every global batch: :func:`process_rows`), as far as this process can tell: its devices
  times the number of processes are all the run's devices.

  Raises:
    ValueError: naming this process's and the run's device counts.
  """
  local, total, count = jax.local_device_count(), jax.device_count(), jax.process_count()
  if local * count != total:
    raise ValueError(f'process {jax.process_index()} has {local} devices, but the {count} '
                     f'processes have {total} in all: give every process the same number')


def define_flags() -> None:
  """Defines the command lines' multi-process flags (:func:`initialize_from_flags`)."""
  flags.DEFINE_string('coordinator_address', None,
                      'HOST:PORT of process 0, for a multi-process run (README, "Many hosts").')
  flags.DEFINE_integer('num_processes', None, 'Processes of a multi-process run.')
  flags.DEFINE_integer('process_id', None, "This process's index in [0, num_processes).")
  flags.DEFINE_bool('distributed', False, 'Start jax.distributed from the cluster JAX detects '
                    '(SLURM, Open MPI, Cloud TPU, GKE) instead of the three flags above.')


def initialize_from_flags() -> bool:
  """:func:`initialize` with the flags of :func:`define_flags`."""
  f = flags.FLAGS
  return initialize(f.coordinator_address, f.num_processes, f.process_id, cluster=f.distributed)


def is_main_process() -> bool:
  """Whether this process writes the run's files and progress lines (process 0)."""
  return jax.process_index() == 0


def process_rows(global_size: int) -> slice:
  """This process's rows of a global batch of ``global_size`` (an equal, contiguous
  share: the mesh orders devices by process).

  Raises:
    ValueError: ``global_size`` is not divisible by the number of processes.
  """
  count, index = jax.process_count(), jax.process_index()
  if global_size % count:
    raise ValueError(f'a global batch of {global_size} does not split over {count} '
                     f'processes; use a multiple of {count}')
  share = global_size // count
  return slice(index * share, (index + 1) * share)


def main_process_first(fn: Callable[[], T]) -> T | None:
  """Runs ``fn()`` on process 0 while the other processes wait for it; returns its
  result on process 0 and None on the others.

  When ``fn`` raises on process 0, every process raises that error (the others a copy
  of it), so no process waits forever at a collective for one that stopped: a refused
  config or a busy workdir ends the whole run with the same message everywhere. With
  one process this is ``fn()``.
  """
  if jax.process_count() == 1:
    return fn()
  error, result = None, None
  if is_main_process():
    try:
      result = fn()
    except Exception as e:  # pylint: disable=broad-except
      error = e
  _raise_shared(error)
  return result


def _raise_shared(error: Exception | None) -> None:
  """Broadcasts process 0's ``error`` (None: none) and raises it on every process."""
  payload = b'' if error is None else _pickled(error)
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(payload))))
  if not size:
    return
  buffer = np.frombuffer(payload, np.uint8) if is_main_process() else np.zeros(size, np.uint8)
  payload = np.asarray(multihost_utils.broadcast_one_to_all(buffer)).tobytes()
  if is_main_process():
    raise error
  raise pickle.loads(payload)


def _pickled(error: Exception) -> bytes:
  """``error`` pickled; a RuntimeError with its message when it cannot be."""
  try:
    payload = pickle.dumps(error)
    pickle.loads(payload)
    return payload
  except Exception:  # pylint: disable=broad-except
    return pickle.dumps(RuntimeError(f'process 0: {type(error).__name__}: {error}'))
