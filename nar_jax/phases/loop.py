"""The loop every training phase runs on: epochs of jitted steps, whole-split evaluation,
and :func:`run_epochs`, the resume -> progress -> epochs -> save -> close skeleton.

Each phase checkpoints its state after every unit of work (an epoch; an alternating
phase) under ``checkpoints/<phase>`` (:class:`nar_jax.checkpoint.PhaseCheckpoints`), so
running the same command again continues from the last unit saved.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax
import numpy as np

from nar_jax import config as config_lib
from nar_jax import data, distributed, train
from nar_jax.checkpoint import PhaseCheckpoints
from nar_jax.errors import NonFiniteError
from nar_jax.phases.context import Context
from nar_jax.progress import Log, Progress


def _divergence(phase: str, epoch: int, step: int, what: str, last: dict[str, Any] | None,
                advice: str) -> NonFiniteError:
  """The error a diverged phase stops with: where, the last finite values, what to try."""
  seen = ('no finite step before it' if last is None else
          f'last finite values: ' + ', '.join(f'{k} {v:.4g}' for k, v in last.items()))
  return NonFiniteError(
      f'[{phase}] non-finite {what} at epoch {epoch + 1} step {step} ({seen}). The step was '
      f'not applied and nothing after the last checkpoint was saved: the run stopped there. '
      f'Try {advice}; the run then resumes from the last checkpoint.')


class _Watch:
  """The finiteness of a phase's fetched step metrics (checked at each logging interval,
  so no step waits for the host) and the last finite loss and accuracy."""

  def __init__(self, phase: str, epoch: int, advice: str):
    self.phase, self.epoch, self.advice = phase, epoch, advice
    self.last = None

  def check(self, fetched: list[dict], first_step: int) -> None:
    for j, m in enumerate(fetched):
      if not bool(m['finite']):
        raise _divergence(self.phase, self.epoch, first_step + j, 'loss or gradient norm',
                          self.last, self.advice)
      self.last = {'loss': float(m['loss']), 'accuracy': float(m['accuracy'])}


def _mean_metrics(fetched: list[dict]) -> dict[str, float]:
  return {k: float(np.mean([m[k] for m in fetched])) for k in ('loss', 'accuracy')}


def train_epoch(step_fn: Callable, state: train.TrainState, split: data.Split, batch_size: int,
                epoch: int, key: jax.Array, sampler_params: Any, progress: Progress, *,
                mesh: Any, seed: int, log_every_steps: int, scan: bool = False,
                advice: str = 'a lower learning rate') -> tuple[train.TrainState, dict[str, float]]:
  """One epoch of ``step_fn`` over ``split``; returns the state and epoch statistics.

  Batches are :func:`nar_jax.data.batches` of ``(seed, epoch)``. The returned ``step_s``
  is the median wall time per step over the logging intervals (every
  ``log_every_steps``; the first step, which includes compilation, is timed separately
  as ``first_step_s``). With ``scan`` the epoch runs as one ``lax.scan``
  (:func:`scan_epoch`).

  Raises:
    NonFiniteError: a step's loss or gradient norm was not finite (found when the
      interval's metrics are fetched; that step and the later ones were not applied).
      The message names the phase, epoch and step and suggests ``advice``.
  """
  if scan:
    return scan_epoch(step_fn, state, split, batch_size, epoch, key, sampler_params, progress,
                      mesh=mesh, seed=seed, advice=advice)
  watch = _Watch(progress.phase, epoch, advice)
  total = data.num_batches(split, batch_size)
  pending, epoch_metrics, interval_times = [], [], []
  first_step_s = None
  tick = time.time()
  # The next batch is read (and, for faces, JPEG-decoded) while the device trains.
  batches = data.prefetch(data.batches(split, batch_size, seed=seed, epoch=epoch,
                                       rows=distributed.process_rows(batch_size)))
  for i, (images, labels) in enumerate(batches):
    state, metrics = step_fn(state, train.shard(mesh, images), train.shard(mesh, labels), key,
                             sampler_params)
    pending.append(metrics)
    if i == 0:
      jax.block_until_ready(state)
      first_step_s = time.time() - tick
      fetched = jax.device_get(pending)
      watch.check(fetched, 1)
      epoch_metrics.append(_mean_metrics(fetched))
      pending, tick = [], time.time()
      progress.update(1, f'epoch {epoch + 1} step 1/{total} (first step {first_step_s:.2f} s)')
    elif (i + 1) % log_every_steps == 0 or i + 1 == total:
      fetched = jax.device_get(pending)  # Fetching the metrics waits for the steps.
      watch.check(fetched, i + 2 - len(pending))
      means = _mean_metrics(fetched)
      interval_times.append((time.time() - tick) / len(pending))
      epoch_metrics.append(means)
      progress.update(len(pending), f'epoch {epoch + 1} step {i + 1}/{total} | loss '
                      f'{means["loss"]:.4f} acc {means["accuracy"]:.4f} | '
                      f'{interval_times[-1]:.3f} s/step')
      pending, tick = [], time.time()
  stats = {k: float(np.mean([m[k] for m in epoch_metrics])) for k in ('loss', 'accuracy')}
  stats['step_s'] = statistics.median(interval_times) if interval_times else first_step_s
  stats['first_step_s'] = first_step_s
  return state, stats


def scan_epoch(step_fn: Callable, state: train.TrainState, split: data.Split, batch_size: int,
               epoch: int, key: jax.Array, sampler_params: Any, progress: Progress, *,
               mesh: Any, seed: int,
               advice: str = 'a lower learning rate') -> tuple[train.TrainState, dict[str, float]]:
  """:func:`train_epoch` as one :func:`train.scan_epoch` call: the same batches in the
  same order, put on the devices at once. ``step_s`` is the epoch's wall time per
  step; when the call compiled the scan, ``first_step_s`` is that whole call."""
  images, labels = zip(*data.batches(split, batch_size, seed=seed, epoch=epoch,
                                     rows=distributed.process_rows(batch_size)))
  epoch_fn = train.scan_epoch(step_fn)
  compiled_before = epoch_fn._cache_size()
  tick = time.time()
  state, metrics = epoch_fn(state, train.shard(mesh, np.stack(images), 1),
                            train.shard(mesh, np.stack(labels), 1), key, sampler_params)
  metrics = jax.device_get(metrics)
  elapsed = time.time() - tick
  fetched = [{k: metrics[k][i] for k in ('loss', 'accuracy', 'finite')}
             for i in range(len(images))]
  _Watch(progress.phase, epoch, advice).check(fetched, 1)
  stats = {k: float(np.mean(metrics[k])) for k in ('loss', 'accuracy')}
  stats['step_s'] = elapsed / len(images)
  stats['first_step_s'] = elapsed if epoch_fn._cache_size() > compiled_before else None
  progress.update(len(images), f'epoch {epoch + 1}: {len(images)} steps in one scan | loss '
                  f'{stats["loss"]:.4f} acc {stats["accuracy"]:.4f} | {stats["step_s"]:.3f} s/step')
  return state, stats


def context_epoch(ctx: Context, step_fn: Callable, state: train.TrainState, split: data.Split,
                  batch_size: int, epoch: int, key: jax.Array, sampler_params: Any,
                  progress: Progress, optimizer: str = 'child.optimizer'
                  ) -> tuple[train.TrainState, dict[str, float]]:
  """:func:`train_epoch` with the run's mesh, seed, logging interval and ``scan_epoch``;
  a divergence suggests lowering ``config.<optimizer>.lr_max``."""
  lr = config_lib.field(ctx.config, f'{optimizer}.lr_max')
  return train_epoch(step_fn, state, split, batch_size, epoch, key, sampler_params, progress,
                     mesh=ctx.mesh, seed=ctx.config.seed,
                     log_every_steps=ctx.config.log_every_steps,
                     scan=ctx.config.get('scan_epoch', False),
                     advice=f'a lower learning rate (config.{optimizer}.lr_max is {lr:g}): add '
                            f'--config.{optimizer}.lr_max=<lower> --config.allow_changes='
                            f'{optimizer}.lr_max to the same command')


def check_finite_scores(phase: str, what: str, values: dict[str, float]) -> None:
  """Raises :class:`NonFiniteError` if a score (a reward, a validation accuracy, a
  verification accuracy) is not finite: the weights that produced it are broken."""
  bad = {k: v for k, v in values.items() if v is None or not np.isfinite(v)}
  if bad:
    raise NonFiniteError(f'[{phase}] non-finite {what}: {bad}; the weights that produced '
                         f'{"it" if len(bad) == 1 else "them"} are not usable. Nothing was '
                         f'saved; try a lower learning rate (--config.allow_changes=<its field> '
                         f'continues this workdir with it).')


def evaluate_split(eval_fn: Callable, variables: Any, split: data.Split, batch_size: int,
                   mesh: Any, op_indices: Any = None) -> dict[str, float]:
  """Top-1 ``accuracy``, ``top5`` accuracy and mean ``loss`` over a whole split.

  The split is read in order as :func:`nar_jax.data.batches` gives it unshuffled (a
  streamed split's evaluation crops, e.g. ImageNet's central 224); each batch holds
  this process's rows of a global ``batch_size`` (a lazy split decodes only those)
  and the last one is padded to them, the padding weighted 0.
  """
  sums = {'correct': 0.0, 'correct5': 0.0, 'loss': 0.0, 'count': 0.0}
  rows = distributed.process_rows(batch_size)
  for images, labels in data.batches(split, batch_size, seed=0, epoch=0, shuffle=False,
                                     drop_remainder=False, rows=rows):
    weights = np.ones(len(labels), np.float32)
    pad = rows.stop - rows.start - len(labels)
    if pad:
      images = np.concatenate([images, np.zeros((pad, *images.shape[1:]), images.dtype)])
      labels = np.concatenate([labels, np.zeros(pad, labels.dtype)])
      weights = np.concatenate([weights, np.zeros(pad, np.float32)])
    out = eval_fn(variables, train.shard(mesh, images), train.shard(mesh, labels),
                  train.shard(mesh, weights), op_indices)
    sums = jax.tree.map(lambda a, b: a + float(b), sums, jax.device_get(out))
  return {'accuracy': sums['correct'] / sums['count'], 'top5': sums['correct5'] / sums['count'],
          'loss': sums['loss'] / sums['count']}


def resume(ckpt: PhaseCheckpoints, state: Any, log: Log, phase: str) -> tuple[Any, dict[str, Any]]:
  """Restores the latest checkpoint of a phase, if any; returns (state, meta).

  ``meta`` holds ``epoch`` (epochs done) and ``step_times`` (median s/step of each).
  """
  latest = ckpt.latest_step()
  if latest is None:
    return state, {'epoch': 0, 'step_times': []}
  state, meta = ckpt.restore(latest, state)
  log.info(f'[{phase}] resumed from {ckpt.directory} after epoch {meta["epoch"]}')
  return state, meta


def restore_latest(ctx: Context, phase: str, like: Any) -> tuple[Any, dict[str, Any]]:
  """The latest checkpoint of ``phase`` restored into the structure of ``like``
  (``like`` itself and a fresh meta when there is none)."""
  ckpt = PhaseCheckpoints(ctx.workdir, phase)
  try:
    return resume(ckpt, like, ctx.log, phase)
  finally:
    ckpt.close()


RunUnit = Callable[[Any, int, dict, Progress], tuple[Any, dict]]
"""``(state, unit, meta, progress) -> (state, meta)``: one unit of a phase's work."""


def run_epochs(ctx: Context, phase: str, state: Any, units: int, steps_per_unit: int,
               run_unit: RunUnit, *, epochs_per_unit: int = 1,
               finished: Callable[[dict], bool] = lambda meta: False) -> tuple[Any, dict]:
  """The skeleton of every training phase: resume, then units of work, each checkpointed.

  Restores the latest checkpoint of ``phase`` (if any), then runs the units not done
  yet, ``run_unit(state, unit, meta, progress)``; after each, ``meta['epoch']`` becomes
  ``(unit + 1) * epochs_per_unit`` and ``(state, meta)`` is saved as checkpoint
  ``unit + 1``. Stops early once ``finished(meta)`` (checked before each unit). The
  checkpoints are closed whatever happens, so an exception inside a unit leaves the
  last saved unit as the state a re-run resumes from.

  Args:
    ctx: the run.
    phase: the checkpoint directory's name and the log's phase.
    state: the initial state (also the structure a checkpoint is restored into).
    units: how many units the phase has; ``steps_per_unit``: their steps (progress).
    run_unit: one unit (it may read and extend ``meta``; ``meta['step_times']`` is the
      list of each epoch's median s/step).
    epochs_per_unit: epochs in one unit (an alternating phase trains several).
    finished: whether the work is done before ``units`` units.

  Returns:
    The final ``(state, meta)``.
  """
  ckpt = PhaseCheckpoints(ctx.workdir, phase)
  try:
    state, meta = resume(ckpt, state, ctx.log, phase)
    done = meta['epoch'] // epochs_per_unit
    progress = Progress(ctx.log, phase, units * steps_per_unit, done * steps_per_unit)
    for unit in range(done, units):
      if finished(meta):
        break
      state, meta = run_unit(state, unit, meta, progress)
      meta['epoch'] = (unit + 1) * epochs_per_unit
      ckpt.save(unit + 1, state, meta)
  finally:
    ckpt.close()
  return state, meta


def median(values: list[float]) -> float | None:
  return statistics.median(values) if values else None
