"""Figures of a search from its ``metrics.jsonl``: ``python -m nar_jax.plots --workdir=DIR``.

Reads the controller records of ``DIR/metrics.jsonl`` (one JSON object per line)
and writes, next to it:

* ``grad_norms.png``: the paper's Figure 1, gradient magnitude of the operator and
  skip parts of the REINFORCE loss over controller steps;
* ``op_probs.png``: one heat-map per operator, node (rows) by controller step
  (columns), colour = probability of that operator at that node;
* ``grad_norms.json``: :func:`variability` of each gradient series.

Records used: ``phase == 'controller'`` with any of

* ``grad_norm_ops``: float, norm of the gradient of ``mean_i -log p(O^i) A_i``;
* ``grad_norm_skips``: float, same for the skip part (joint search only);
* ``op_probs``: ``num_nodes x len(OP_NAMES)`` nested list of probabilities.

(:func:`nar_jax.reinforce.joint_update_diagnostics` and
:func:`~nar_jax.reinforce.operator_update_diagnostics` compute them.) Steps are
numbered in file order; records that carry ``epoch`` and ``update`` are first
de-duplicated by that pair (the last one wins, as after a resumed epoch).
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import matplotlib
from absl import app, flags

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import numpy as np  # noqa: E402

from nar_jax.ops import OP_NAMES  # noqa: E402

FIELDS = ('grad_norm_ops', 'grad_norm_skips', 'op_probs')


def load_controller_records(workdir: str) -> list[dict[str, Any]]:
  """Controller records of ``workdir/metrics.jsonl`` that carry a plotted field, in step order.

  Raises:
    ValueError: no metrics file, a line that is not JSON, or no such record.
  """
  path = os.path.join(os.path.expanduser(workdir), 'metrics.jsonl')
  if not os.path.exists(path):
    raise ValueError(f'no metrics file {path}; run a search with this workdir first')
  records: dict[Any, dict[str, Any]] = {}
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise ValueError(f'{path}:{number} is not JSON: {error}') from None
      if record.get('phase') != 'controller' or not any(k in record for k in FIELDS):
        continue
      key = ((record['epoch'], record['update']) if 'epoch' in record and 'update' in record
             else number)
      records.pop(key, None)
      records[key] = record
  if not records:
    raise ValueError(f'{path} has no controller records with any of {", ".join(FIELDS)}; '
                     f'log them from the controller update (nar_jax.reinforce diagnostics)')
  return list(records.values())


def variability(values: Sequence[float]) -> dict[str, float]:
  """How noisy a series is.

  Returns ``mean``, ``std``, ``cv`` (coefficient of variation ``std / mean``) and
  ``relative_change`` (mean absolute step-to-step change divided by the mean:
  a smooth curve scores near 0 even while it drifts, an oscillating one near
  ``cv`` or above). Needs at least two values and a positive mean.
  """
  x = np.asarray(values, np.float64)
  if x.ndim != 1 or x.size < 2:
    raise ValueError(f'variability needs a series of at least 2 values, got shape {x.shape}')
  mean = float(np.mean(x))
  if not mean > 0:
    raise ValueError(f'variability needs a positive mean, got {mean}')
  std = float(np.std(x))
  return {'mean': mean, 'std': std, 'cv': std / mean,
          'relative_change': float(np.mean(np.abs(np.diff(x)))) / mean}


def _series(records, field):
  steps = [i for i, r in enumerate(records) if field in r]
  return np.asarray(steps), np.asarray([records[i][field] for i in steps], np.float64)


def plot_grad_norms(records: list[dict[str, Any]], path: str) -> dict[str, dict[str, float]]:
  """Figure 1 to ``path``; returns :func:`variability` of each plotted series with >= 2 points."""
  fig, ax = plt.subplots(figsize=(8, 4))
  summary = {}
  for field, label in (('grad_norm_ops', 'operators'), ('grad_norm_skips', 'skip connections')):
    steps, values = _series(records, field)
    if values.size:
      ax.plot(steps, values, label=label, linewidth=1)
      if values.size >= 2:
        summary[label] = variability(values)
  ax.set_xlabel('controller step')
  ax.set_ylabel('gradient magnitude')
  ax.set_title('REINFORCE gradient: operators vs skip connections')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return summary


def plot_op_probs(records: list[dict[str, Any]], path: str) -> None:
  """One heat-map per operator (node x controller step) to ``path``."""
  steps, _ = _series(records, 'op_probs')
  probs = np.asarray([records[i]['op_probs'] for i in steps], np.float64)  # (T, N, K)
  if probs.ndim != 3 or probs.shape[2] != len(OP_NAMES):
    raise ValueError(f'op_probs must be num_nodes x {len(OP_NAMES)} per record '
                     f'(ops {", ".join(OP_NAMES)}); got steps x nodes x ops = {probs.shape}')
  num_ops = probs.shape[2]
  fig, axes = plt.subplots(1, num_ops, figsize=(2.5 * num_ops + 1, 3.5), sharey=True,
                           squeeze=False, layout='constrained')
  image = None
  for k, ax in enumerate(axes[0]):
    image = ax.imshow(probs[:, :, k].T, aspect='auto', origin='lower', vmin=0.0, vmax=1.0,
                      cmap='viridis', interpolation='nearest',
                      extent=(steps[0] - 0.5, steps[-1] + 0.5, -0.5, probs.shape[1] - 0.5))
    ax.set_title(OP_NAMES[k])
    ax.set_xlabel('controller step')
  axes[0, 0].set_ylabel('node')
  fig.colorbar(image, ax=axes[0].tolist(), label='probability')
  fig.savefig(path, dpi=120)
  plt.close(fig)


def write_plots(workdir: str) -> list[str]:
  """Writes the figures (and ``grad_norms.json``) of ``workdir``; returns the paths written."""
  workdir = os.path.expanduser(workdir)
  records = load_controller_records(workdir)
  written = []
  if any('grad_norm_ops' in r or 'grad_norm_skips' in r for r in records):
    path = os.path.join(workdir, 'grad_norms.png')
    summary = plot_grad_norms(records, path)
    written.append(path)
    summary_path = os.path.join(workdir, 'grad_norms.json')
    with open(summary_path, 'w') as f:
      json.dump(summary, f, indent=2)
    written.append(summary_path)
  if any('op_probs' in r for r in records):
    path = os.path.join(workdir, 'op_probs.png')
    plot_op_probs(records, path)
    written.append(path)
  return written


def main(argv: Sequence[str]) -> None:
  """absl entry point: writes the figures of ``--workdir`` and prints the variability."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  try:
    written = write_plots(flags.FLAGS.workdir)
  except ValueError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  for path in written:
    print(path)
  summary_path = os.path.join(os.path.expanduser(flags.FLAGS.workdir), 'grad_norms.json')
  if summary_path in written:
    with open(summary_path) as f:
      for label, stats in json.load(f).items():
        print(f'{label}: ' + ', '.join(f'{k} {v:.4g}' for k, v in stats.items()))


if __name__ == '__main__':
  # Defined here, not at import: nar_jax.main defines its own --workdir.
  flags.DEFINE_string('workdir', None, 'Workdir of a search (holds metrics.jsonl).')
  flags.mark_flag_as_required('workdir')
  app.run(main)
