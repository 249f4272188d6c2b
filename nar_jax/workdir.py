"""The workdir contract: one config per workdir, one run at a time, writable before training.

A workdir belongs to the config of its first run, recorded in ``<workdir>/config.json``
(:data:`CONFIG_FILE`). A later run in it compares its config with that record,
field by field over the schema's leaves (:func:`config_differences`): every field
changes the experiment unless it is one of the few :data:`HARMLESS_FIELDS`, so a field
added to the schema is compared by default. A differing field stops the run before it
does anything (:func:`mismatch_message`), unless ``config.allow_changes`` lists it: a
deliberate continuation (:func:`continuation`), which recomputes the phases that depend
on the changed fields (:data:`PHASES`).

:func:`claim` is the entry point of a run: it checks that the workdir can be written,
holds its lock (:func:`lock`) for the run and applies the comparison.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import json
import os
import shutil
import socket
import sys
from typing import Any, Iterator, NamedTuple

import jax
import ml_collections

from nar_jax import config as config_lib
from nar_jax import distributed, files

CONFIG_FILE = 'config.json'
"""The resolved config of a run, in its workdir (written by ``pipeline.setup``)."""

LOCK_FILE = '.lock'
"""The lock of a workdir (:func:`lock`): held by the run using it."""

HARMLESS_FIELDS = ('log_every_steps', 'retrain.verify_every_epochs', 'allow_changes')
"""Fields (or sections, by prefix) that may differ between runs of one workdir: they
change what is logged, not what is trained, measured or selected. ``log_every_steps``
groups the logged step metrics; ``retrain.verify_every_epochs`` adds verifications
during retraining (the final one is the same); ``allow_changes`` is the override.

Not here, because they change numbers: ``eval_batch_size`` (derive scores
architectures with each batch's own BN statistics, ``search.batch_statistics``),
``num_devices`` (dropout keys are folded with the device index; reductions change
order), ``scan_epoch`` and ``model.choice`` (other programs, equal only up to rounding),
``dataset.data_dir`` (other data)."""

PROBE_BYTES = 1 << 20
"""The size of the probe file :func:`check_writable` writes and removes."""

ABSENT = '<absent>'
"""The value :func:`config_differences` gives a field one of the two configs lacks."""


class WorkdirError(ValueError):
  """The workdir cannot be used as asked: another run holds it, it cannot be written, it
  holds another config's run, or a checkpoint could not be written. A ``ValueError``, so
  the command line prints it as ``error: ...`` and exits with status 2."""


class Phase(NamedTuple):
  """A stage of the pipeline as the workdir stores it.

  ``results``: globs (relative to the workdir) of the files that record the finished
  phase and are recomputed when it continues; ``checkpoints``: globs of its directories
  under ``checkpoints/``, which a continuing phase resumes from.
  """

  name: str
  sections: tuple[str, ...]
  results: tuple[str, ...]
  checkpoints: tuple[str, ...]


PHASES = (
    Phase('pretrain', ('pretrain', 'child'), (), ('pretrain',)),
    Phase('search', ('search', 'alternating', 'eval_batch_size'),
          ('evaluation/shared_scores.json',), ('search', 'alternating')),
    Phase('derive', ('derive',), ('results/derive.json', 'arch.json'), ()),
    Phase('retrain', ('retrain',),
          ('results/retrain_*.json', 'evaluation/retrain_random_*.json', 'evaluation/evaluation.*',
           'report.json', 'report.md'),
          ('retrain_*',)),
)
"""The pipeline's phases in order and the config sections each one is the first to use
(``child`` is the shared-weight recipe of pretraining and search; ``eval_batch_size``
scores architectures with the search's weights). Continuing from a phase recomputes its
results and those of every later phase; it resumes from its own checkpoints and removes
those of every later phase (they were trained from what it is about to change: a
re-derived architecture is retrained from scratch). The sections of no phase (dataset,
model, margin, seed, arch, num_devices, scan_epoch) change every phase: they cannot be
continued."""


# ---------------------------------------------------------------------------------------
# config.json.
# ---------------------------------------------------------------------------------------


def write_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  """Writes ``config`` as readable JSON to ``<workdir>/config.json`` (:data:`CONFIG_FILE`);
  ``ml_collections.ConfigDict(json.load(f))`` reads it back with every field and type."""
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, CONFIG_FILE),
                   config.to_json_best_effort(indent=2) + '\n')


def with_defaults(defaults: ml_collections.ConfigDict,
                  stored: dict[str, Any]) -> ml_collections.ConfigDict:
  """``stored`` (a run's ``config.json``) over the current schema's ``defaults``: a field
  the schema gained after the run takes its default, which is what the run used."""
  for name, value in stored.items():
    if isinstance(value, dict) and isinstance(defaults.get(name), ml_collections.ConfigDict):
      with_defaults(defaults[name], value)
    else:
      defaults[name] = value
  return defaults


def read_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The config recorded in ``<workdir>/config.json``, or None when there is none. A
  pipeline config (every top-level field in the schema) gets the fields added to the
  schema since (:func:`with_defaults`)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    stored = json.load(f)
  defaults = config_lib.base_config()
  if set(stored) <= set(defaults):
    return with_defaults(defaults, stored)
  return ml_collections.ConfigDict(stored)


# ---------------------------------------------------------------------------------------
# Comparing configs.
# ---------------------------------------------------------------------------------------


def leaves(config: ml_collections.ConfigDict | dict) -> dict[str, Any]:
  """Every leaf of ``config`` by dotted name (``{'model.width': 0.125, ...}``), with the
  values ``config.json`` holds (a JSON round trip: tuples become lists)."""
  tree = config if isinstance(config, dict) else json.loads(config.to_json_best_effort())
  out = {}
  for name, value in tree.items():
    if isinstance(value, dict):
      out.update({f'{name}.{k}': v for k, v in leaves(value).items()})
    else:
      out[name] = value
  return out


def _matches(name: str, prefix: str) -> bool:
  """Whether field ``name`` is ``prefix`` or inside the section ``prefix``."""
  return name == prefix or name.startswith(prefix + '.')


def is_harmless(name: str) -> bool:
  """Whether field ``name`` may differ between runs of one workdir (:data:`HARMLESS_FIELDS`)."""
  return any(_matches(name, h) for h in HARMLESS_FIELDS)


def config_differences(stored: ml_collections.ConfigDict | dict,
                       current: ml_collections.ConfigDict | dict) -> list[tuple[str, Any, Any]]:
  """``(field, stored value, current value)`` of every leaf that changes the experiment
  (not :func:`is_harmless`) and differs, sorted by field; a leaf one side lacks has the
  value :data:`ABSENT` there."""
  a, b = leaves(stored), leaves(current)
  return [(name, a.get(name, ABSENT), b.get(name, ABSENT)) for name in sorted(set(a) | set(b))
          if not is_harmless(name) and a.get(name, ABSENT) != b.get(name, ABSENT)]


def allowed_changes(config: ml_collections.ConfigDict) -> tuple[str, ...]:
  """The field names (or sections) of ``config.allow_changes``, each checked to name a
  field or section of ``config``."""
  names = tuple(n.strip() for n in config.get('allow_changes', '').split(',') if n.strip())
  fields = leaves(config)
  for name in names:
    if not any(_matches(f, name) for f in fields):
      raise WorkdirError(f'config.allow_changes names {name!r}, which is not a config field or '
                         f'section')
  return names


def phase_of(name: str) -> Phase | None:
  """The first phase that uses field ``name`` (:data:`PHASES`), None for the fields every
  phase depends on."""
  return next((p for p in PHASES if any(_matches(name, s) for s in p.sections)), None)


def _field_list(differences: list[tuple[str, Any, Any]]) -> str:
  return '\n'.join(f'  config.{name}: {stored!r} (stored) != {current!r} (now)'
                   for name, stored, current in differences)


def mismatch_message(workdir: str, differences: list[tuple[str, Any, Any]]) -> str:
  """The error of a run whose config differs from its workdir's ``config.json``: each
  differing field with both values, and the two ways out."""
  head = (f'{workdir} holds a run of another config: {len(differences)} field(s) differ from '
          f'its {CONFIG_FILE}:\n{_field_list(differences)}\n')
  fields = ','.join(name for name, _, _ in differences)
  fixed = [name for name, _, _ in differences if phase_of(name) is None]
  if not fixed:
    return head + (f'Run the new experiment in a new --workdir, or continue this run '
                   f'deliberately with the new values: --config.allow_changes={fields} (README, '
                   f'"Reliability": which phases are then recomputed)')
  return head + (f'Run the new experiment in a new --workdir. (A deliberate continuation, '
                 f'--config.allow_changes=FIELDS, is for the sections {_continuable()}; every '
                 f'phase depends on {", ".join(fixed)}, so this run cannot continue under '
                 f'{"it" if len(fixed) == 1 else "them"}.)')


def _continuable() -> str:
  """The sections :data:`PHASES` lists, for messages."""
  return ', '.join(s for p in PHASES for s in p.sections)


def continuation(workdir: str, differences: list[tuple[str, Any, Any]],
                 allowed: tuple[str, ...]) -> Phase | None:
  """The phase a run in ``workdir`` continues from: None when nothing differs, the first
  phase that uses an allowed differing field otherwise.

  Raises:
    WorkdirError: a differing field ``allowed`` does not list (:func:`mismatch_message`),
      an allowed one that every phase depends on, or an ``epochs`` that went down (the
      checkpoints are past it).
  """
  refused = [d for d in differences if not any(_matches(d[0], a) for a in allowed)]
  if refused:
    raise WorkdirError(mismatch_message(workdir, refused))
  phases = []
  for name, stored, current in differences:
    phase = phase_of(name)
    if phase is None:
      raise WorkdirError(
          f'config.allow_changes lets config.{name} differ ({stored!r} stored, {current!r} now), '
          f'but every phase depends on it: no run can continue under it. Run the new '
          f'experiment in a new --workdir (continuable sections: {_continuable()})')
    if (name.rpartition('.')[2] == 'epochs' and isinstance(stored, (int, float))
        and isinstance(current, (int, float)) and current < stored):
      raise WorkdirError(f'config.{name} cannot go down from {stored} to {current} in a '
                         f'continuation: the checkpoints are past it. Use a new --workdir')
    phases.append(phase)
  return min(phases, key=PHASES.index) if phases else None


def stale_paths(workdir: str, phase: Phase) -> list[str]:
  """What continuing from ``phase`` removes: the results of it and of every later phase,
  and the checkpoints of every later phase."""
  later = PHASES[PHASES.index(phase):]
  patterns = [r for p in later for r in p.results]
  patterns += [os.path.join('checkpoints', c) for p in later[1:] for c in p.checkpoints]
  return sorted({path for pattern in patterns
                 for path in glob.glob(os.path.join(glob.escape(workdir), pattern))})


def _remove(path: str) -> None:
  if os.path.isdir(path):
    shutil.rmtree(path)
  else:
    os.remove(path)


# ---------------------------------------------------------------------------------------
# Writability and the lock.
# ---------------------------------------------------------------------------------------


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` if needed and writes, flushes to disk and removes a
  :data:`PROBE_BYTES` probe file in it.

  Raises:
    WorkdirError: naming the path and the reason (permission denied, no space left,
      read-only file system, ...).
  """
  probe = os.path.join(workdir, f'.write_probe.{os.getpid()}')
  path = workdir
  try:
    os.makedirs(workdir, exist_ok=True)
    path = probe
    with open(probe, 'wb') as f:
      f.write(b'\0' * PROBE_BYTES)
      f.flush()
      os.fsync(f.fileno())
  except OSError as error:
    reason = os.strerror(error.errno) if error.errno else str(error)
    raise WorkdirError(f'the workdir {workdir} cannot be written ({path}: {reason}); nothing '
                       f'was trained. Free space, fix its permissions, or choose another '
                       f'--workdir') from error
  finally:
    with contextlib.suppress(OSError):
      os.remove(probe)


def _holder() -> dict[str, Any]:
  """This process as the lock records it."""
  return {'pid': os.getpid(), 'host': socket.gethostname(), 'command': ' '.join(sys.argv)}


def _read_holder(fd: int) -> dict[str, Any] | None:
  os.lseek(fd, 0, os.SEEK_SET)
  text = os.read(fd, 1 << 16).decode(errors='replace')
  try:
    return json.loads(text) if text.strip() else None
  except json.JSONDecodeError:
    return None


def _describe(holder: dict[str, Any] | None) -> str:
  if not holder:
    return 'a process that has not written its name yet'
  return f'pid {holder.get("pid")} on {holder.get("host")} ({holder.get("command")!r})'


@contextlib.contextmanager
def lock(workdir: str) -> Iterator[None]:
  """Holds ``<workdir>/.lock`` (:data:`LOCK_FILE`) for the ``with`` block.

  The lock is an exclusive ``flock`` on the file, which the kernel releases when the
  holder ends however it ends (an exception, ``kill -9``, a crash): a lock left by a
  dead process is taken over, never in the way. The file names its holder (pid, host,
  command) for the error of a second run, and is emptied on release.

  Raises:
    WorkdirError: another process holds the lock (named), or the file system cannot lock.
  """
  path = os.path.join(workdir, LOCK_FILE)
  try:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  except FileNotFoundError:
    raise WorkdirError(f'the workdir {workdir} does not exist') from None
  except OSError as error:
    raise WorkdirError(f'cannot open the lock {path}: {os.strerror(error.errno)}') from error
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
      if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise WorkdirError(f'cannot lock {path}: {os.strerror(error.errno)} (the file system '
                           f'does not support locks: choose another --workdir)') from error
      raise WorkdirError(f'the workdir {workdir} is in use by {_describe(_read_holder(fd))}: '
                         f'one run per workdir at a time. Wait for it to finish, stop it, or '
                         f'choose another --workdir ({path})') from None
    previous = _read_holder(fd)
    if previous:
      print(f'note: {path} named {_describe(previous)}, which ended without releasing it: '
            f'taken over', flush=True)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(_holder()).encode(), 0)
    os.fsync(fd)
    try:
      yield
    finally:
      os.ftruncate(fd, 0)
      fcntl.flock(fd, fcntl.LOCK_UN)
  finally:
    os.close(fd)


# ---------------------------------------------------------------------------------------
# A run's claim on its workdir.
# ---------------------------------------------------------------------------------------


def apply_config(config: ml_collections.ConfigDict, workdir: str) -> Phase | None:
  """Compares ``config`` with the workdir's ``config.json`` and, for an allowed
  continuation, removes what it recomputes (:func:`stale_paths`); returns the phase it
  continues from (None: nothing to recompute). A workdir without ``config.json`` (a new
  one, or a run from before ``config.json`` was written) is taken as it is.

  Raises:
    WorkdirError: see :func:`continuation`.
  """
  stored = read_config(workdir)
  if stored is None:
    if os.path.isdir(os.path.join(workdir, 'results')):
      print(f'note: {workdir} has results but no {CONFIG_FILE} (a run from before it was '
            f'written): they are trusted as they are, and {CONFIG_FILE} now records this '
            f'config', flush=True)
    return None
  differences = config_differences(stored, config)
  phase = continuation(workdir, differences, allowed_changes(config))
  if phase is not None:
    stale = stale_paths(workdir, phase)
    print(f'continuing {workdir} with new values of {", ".join(d[0] for d in differences)} '
          f'(config.allow_changes): recomputing from {phase.name}; removing '
          f'{", ".join(os.path.relpath(p, workdir) for p in stale) or "nothing"}', flush=True)
    for path in stale:
      _remove(path)
  return phase


@contextlib.contextmanager
def claim(config: ml_collections.ConfigDict, workdir: str) -> Iterator[Phase | None]:
  """A run's hold on ``workdir`` for the ``with`` block: validates ``config``, checks the
  workdir can be written (:func:`check_writable`), holds its lock (:func:`lock`) and
  compares the config with its ``config.json`` (:func:`apply_config`); yields the phase
  an allowed continuation recomputes from (None: nothing). Every check comes before
  anything is trained or removed. ``config.json`` itself is written by the run once its
  data and devices accept the config (``pipeline.setup``).

  In a multi-process run process 0 alone checks, locks and compares (removing what a
  continuation recomputes) while the others wait for it; they yield None, and raise
  process 0's error when it refuses (:func:`nar_jax.distributed.main_process_first`).
  They then check that they see the lock process 0 holds: a workdir every process
  shares.

  Raises:
    WorkdirError: as :func:`check_writable`, :func:`lock` and :func:`apply_config`; or
      this process does not see process 0's workdir.
  """
  config_lib.validate(config)
  with contextlib.ExitStack() as held:

    def hold() -> Phase | None:
      check_writable(workdir)
      held.enter_context(lock(workdir))
      return apply_config(config, workdir)

    phase = distributed.main_process_first(hold)
    if not distributed.is_main_process():
      check_shared(workdir)
    yield phase


def check_shared(workdir: str) -> None:
  """Checks that this process sees the lock that process 0 holds on ``workdir``.

  Raises:
    WorkdirError: it does not, so the processes do not share ``workdir``.
  """
  path = os.path.join(workdir, LOCK_FILE)
  if not os.path.exists(path) or not os.path.getsize(path):
    raise WorkdirError(f'process {jax.process_index()} does not see {path}, which process 0 '
                       f'holds: every process of a run must share the workdir (a file system '
                       f'all hosts mount)')
