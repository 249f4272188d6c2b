"""TensorBoard event files of a run, written from the records of ``metrics.jsonl``.

Every record :class:`nar_jax.progress.Log` writes to ``metrics.jsonl`` is also written to
``<workdir>/tensorboard/`` (with tensorboardX's event-file writer, so no TensorFlow is
needed at run time) as:

* scalars ``<phase>[/<group>]/<field>``: every numeric field (int, float, bool) except
  the position fields (:data:`POSITION_FIELDS`); ``<group>`` is the value of the string
  fields of :data:`GROUP_FIELDS` (``verification``: the pair set, ``search``: the
  alternating search's half), e.g. ``search/train_loss``, ``controller/reward``,
  ``controller/grad_norm``, ``retrain_refined/lfw/accuracy``;
* images ``<phase>/<field>`` of the matrices of :data:`IMAGE_FIELDS` (``op_probs``:
  nodes (rows) x operators (columns), colour = probability, viridis from 0 to 1);
* text: :meth:`Writer.text` (the pipeline writes the config and ``report.md``).

The step of a record (:class:`Steps`): the number of the controller update for records
with ``update`` (counted over the whole run, so over epochs and alternating phases);
else ``epoch``; else ``step`` (alternating phases); else the last epoch of its phase (a
retrained network's test accuracy). A resumed run counts on from the records already in
``metrics.jsonl``, and writes a new event file next to the old ones (TensorBoard reads
them together). Every record is flushed to disk when it is written.

View with ``tensorboard --logdir <workdir>/tensorboard`` (``pip install tensorboard``).
"""

from __future__ import annotations

import json
import numbers
import os
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from tensorboardX import summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2, summary_pb2

POSITION_FIELDS = ('epoch', 'update', 'step', 'round')
GROUP_FIELDS = ('search', 'verification')
IMAGE_FIELDS = ('op_probs',)
CELL_PIXELS = 12  # Side of one matrix entry in an image.


def read_records(path: str) -> list[dict[str, Any]]:
  """The JSON objects of a ``metrics.jsonl`` (none if it does not exist; lines that are
  not JSON objects are skipped: the file may end in a line cut off by a crash)."""
  if not os.path.exists(path):
    return []
  records = []
  with open(path) as f:
    for line in f:
      try:
        record = json.loads(line)
      except json.JSONDecodeError:
        continue
      if isinstance(record, dict):
        records.append(record)
  return records


def prefix(record: dict[str, Any]) -> str:
  """``<phase>[/<group>...]``: the tag prefix of a record's values."""
  parts = [str(record.get('phase', 'run'))]
  parts += [record[k] for k in GROUP_FIELDS if isinstance(record.get(k), str)]
  return '/'.join(parts)


def scalar_fields(record: dict[str, Any]) -> dict[str, float]:
  """The record's numeric fields but the position fields, as floats, by name."""
  return {k: float(v) for k, v in record.items()
          if isinstance(v, numbers.Real) and k not in POSITION_FIELDS
          and np.isfinite(float(v))}


def heatmap(matrix: Any, cell: int = CELL_PIXELS) -> np.ndarray:
  """uint8 (rows * cell, columns * cell, 3): a matrix of values in [0, 1] (clipped) in
  matplotlib's viridis, one ``cell x cell`` square per entry, row 0 at the top."""
  from matplotlib import colormaps  # pylint: disable=g-import-not-at-top

  values = np.clip(np.asarray(matrix, np.float64), 0.0, 1.0)
  if values.ndim != 2 or not values.size:
    raise ValueError(f'a heat-map needs a non-empty 2-D matrix, got shape {values.shape}')
  rgb = colormaps['viridis'](values)[..., :3]  # (rows, columns, 3) in [0, 1]
  rgb = np.repeat(np.repeat(rgb, cell, axis=0), cell, axis=1)
  return np.round(rgb * 255).astype(np.uint8)


class Steps:
  """The TensorBoard step of each record (module docstring): a pure function of the
  records seen before it, so replaying ``metrics.jsonl`` restores it after a resume."""

  def __init__(self):
    self._updates: dict[tuple, int] = {}   # (prefix, epoch, update, round) -> step
    self._count: dict[str, int] = {}       # prefix -> controller updates so far
    self._last_epoch: dict[str, int] = {}  # phase -> last epoch recorded

  def __call__(self, record: dict[str, Any]) -> int:
    """The step of `record`; counts it."""
    phase = str(record.get('phase', 'run'))
    if 'update' in record:
      group = prefix(record).split('/')[0]  # One count for every half of a search.
      key = (group, record.get('epoch'), record['update'], record.get('round'),
             record.get('search'))
      if key not in self._updates:  # A re-run epoch's updates keep their steps.
        self._count[group] = self._count.get(group, 0) + 1
        self._updates[key] = self._count[group]
      return self._updates[key]
    if isinstance(record.get('epoch'), numbers.Integral):
      self._last_epoch[phase] = int(record['epoch'])
      return int(record['epoch'])
    if isinstance(record.get('step'), numbers.Integral):
      return int(record['step'])
    return self._last_epoch.get(phase, 0)


class Writer:
  """Writes records, images and text to one new event file in ``logdir``.

  Args:
    logdir: the event directory (created if missing).
    history: records already logged by an earlier run in the same workdir (their steps
      are counted, nothing is written for them).
  """

  def __init__(self, logdir: str, history: Iterable[dict[str, Any]] = ()):
    os.makedirs(logdir, exist_ok=True)
    self.logdir = logdir
    self._steps = Steps()
    for record in history:
      self._steps(record)
    # tensorboardX names the file by the second and the host: the suffix keeps a second
    # writer in the same second (a quick re-run) from overwriting the first one's file.
    self._events: EventsWriter | None = EventsWriter(
        os.path.join(logdir, 'events'), filename_suffix=f'.{os.getpid()}.{time.time_ns()}')
    self._events.flush()

  def _write(self, values: list[summary_pb2.Summary.Value], step: int) -> None:
    if self._events is None:
      raise ValueError(f'the TensorBoard writer of {self.logdir} is closed')
    if values:
      self._events.write_event(event_pb2.Event(
          wall_time=time.time(), step=int(step), summary=summary_pb2.Summary(value=values)))
      self._events.flush()

  def record(self, record: dict[str, Any]) -> None:
    """Scalars and images of one ``metrics.jsonl`` record (lists already plain)."""
    step = self._steps(record)
    tag = prefix(record)
    values = [summary_pb2.Summary.Value(tag=f'{tag}/{name}', simple_value=value)
              for name, value in scalar_fields(record).items()]
    for name in IMAGE_FIELDS:
      if name in record:
        values += tbx_summary.image(f'{tag}/{name}', heatmap(record[name]),
                                    dataformats='HWC').value
    self._write(values, step)

  def text(self, tag: str, text: str, step: int = 0) -> None:
    """``text`` (markdown: TensorBoard renders tables) under ``tag``."""
    self._write(list(tbx_summary.text(tag, text).value), step)

  def close(self) -> None:
    """Flushes and closes the event file (idempotent)."""
    if self._events is not None:
      self._events.close()
      self._events = None
