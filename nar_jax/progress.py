"""Progress lines on stdout and the run's records (``metrics.jsonl`` and TensorBoard).

:class:`Log` is what every phase writes through; :class:`Progress` turns a phase's step
count into progress lines with elapsed time and an estimate of the time left.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np

from nar_jax import distributed, tensorboard


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  return f'{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}'


class Log:
  """Progress lines on stdout and one JSON object per line in ``metrics.jsonl``, also
  written as TensorBoard events to ``<workdir>/tensorboard/`` (opened at the first record
  or text; :meth:`close` closes it).

  In a multi-process run only process 0 prints and writes
  (:func:`nar_jax.distributed.is_main_process`); the others' logs do nothing."""

  def __init__(self, workdir: str, verbose: bool = True):
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.writes = distributed.is_main_process()
    self.verbose = verbose and self.writes
    self.start = time.time()
    self._tensorboard = None

  @property
  def tensorboard(self) -> tensorboard.Writer:
    if self._tensorboard is None:  # Counts on from the records of an earlier run.
      self._tensorboard = tensorboard.Writer(
          os.path.join(os.path.dirname(self.path), 'tensorboard'),
          history=tensorboard.read_records(self.path))
    return self._tensorboard

  def text(self, tag: str, text: str) -> None:
    if self.writes:
      self.tensorboard.text(tag, text)

  def close(self) -> None:
    if self._tensorboard is not None:
      self._tensorboard.close()
      self._tensorboard = None

  def info(self, message: str) -> None:
    if self.verbose:
      print(f'[{_clock(time.time() - self.start)}] {message}', flush=True)

  def record(self, **fields: Any) -> None:
    if not self.writes:
      return
    fields = {k: np.asarray(v).tolist() if isinstance(v, (np.ndarray, np.generic, jax.Array)) else v
              for k, v in fields.items()}
    writer = self.tensorboard  # Before the line is appended: it replays the earlier ones.
    with open(self.path, 'a') as f:
      f.write(json.dumps(fields) + '\n')
    writer.record(fields)


class Progress:
  """Phase progress: step, running loss/accuracy, s/step, elapsed and estimated time left.

  The estimate extrapolates the pace measured since the first update, so the first
  step's compilation does not inflate it.
  """

  def __init__(self, log: Log, phase: str, total_steps: int, done_steps: int = 0):
    self.log, self.phase, self.total = log, phase, total_steps
    self.done = done_steps
    self.start = time.time()
    self.first_update = None  # (time, steps done) at the first update

  def update(self, steps: int, message: str) -> None:
    self.done += steps
    now = time.time()
    if self.first_update is None:
      self.first_update = (now, self.done)
      eta = '?'
    else:
      pace = (now - self.first_update[0]) / max(self.done - self.first_update[1], 1)
      eta = _clock(pace * (self.total - self.done))
    self.log.info(f'[{self.phase}] {message} | elapsed {_clock(now - self.start)} eta {eta}')
