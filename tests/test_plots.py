"""Tests for nar_jax.plots: Figure 1 and the op-probability heat-map from metrics.jsonl."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from nar_jax import ops, plots

PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _write_metrics(workdir, records):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    for r in records:
      f.write(json.dumps(r) + '\n')


def _controller_records(n, num_nodes=4, seed=0):
  rng = np.random.default_rng(seed)
  return [{'phase': 'controller', 'epoch': 1 + u // 5, 'update': 1 + u % 5,
           'grad_norm_ops': 1.0 + 0.01 * u, 'grad_norm_skips': float(rng.uniform(0.2, 3.0)),
           'op_probs': rng.dirichlet(np.ones(len(ops.OP_NAMES)), num_nodes).tolist()}
          for u in range(n)]


def test_write_plots_writes_two_pngs_and_the_variability(tmp_path):
  records = [{'phase': 'search', 'epoch': 1, 'train_loss': 2.0}] + _controller_records(12)
  _write_metrics(tmp_path, records)
  written = plots.write_plots(str(tmp_path))
  assert [os.path.basename(p) for p in written] == ['grad_norms.png', 'grad_norms.json',
                                                    'op_probs.png']
  for name in ('grad_norms.png', 'op_probs.png'):
    with open(tmp_path / name, 'rb') as f:
      data = f.read()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000, name
  summary = json.loads((tmp_path / 'grad_norms.json').read_text())
  ops_series = [r['grad_norm_ops'] for r in records[1:]]
  assert summary['operators'] == pytest.approx(plots.variability(ops_series))
  # The smooth ramp is far less variable than the random skip series.
  assert summary['operators']['relative_change'] < 0.02 < summary['skip connections'][
      'relative_change']


def test_variability_by_hand():
  got = plots.variability([1.0, 3.0, 2.0, 2.0])
  # mean 2, std sqrt(0.5), |diffs| 2, 1, 0 -> mean 1.
  assert got == pytest.approx({'mean': 2.0, 'std': math.sqrt(0.5), 'cv': math.sqrt(0.5) / 2,
                               'relative_change': 0.5})
  assert plots.variability([2.0, 2.0, 2.0])['cv'] == 0.0
  with pytest.raises(ValueError, match='at least 2 values'):
    plots.variability([1.0])
  with pytest.raises(ValueError, match='positive mean'):
    plots.variability([0.0, 0.0])


def test_records_are_deduplicated_by_epoch_and_update(tmp_path):
  """A resumed epoch logs its updates again: the last record of each (epoch, update) wins."""
  first = _controller_records(3)
  again = [dict(r, grad_norm_ops=10.0 + i) for i, r in enumerate(first[1:])]
  _write_metrics(tmp_path, first + again)
  records = plots.load_controller_records(str(tmp_path))
  assert [r['grad_norm_ops'] for r in records] == [1.0, 10.0, 11.0]


def test_op_only_search_gets_both_figures_without_skip_series(tmp_path):
  records = [{k: v for k, v in r.items() if k != 'grad_norm_skips'}
             for r in _controller_records(4)]
  _write_metrics(tmp_path, records)
  plots.write_plots(str(tmp_path))
  summary = json.loads((tmp_path / 'grad_norms.json').read_text())
  assert list(summary) == ['operators']
  assert (tmp_path / 'op_probs.png').stat().st_size > 0


@pytest.mark.parametrize('lines,pattern', [
    (None, 'no metrics file'),
    ([], 'has no controller records with any of grad_norm_ops'),
    ([{'phase': 'search', 'epoch': 1}, {'phase': 'controller', 'reward': 0.5}],
     'has no controller records'),
])
def test_missing_records_raise_clear_errors(tmp_path, lines, pattern):
  if lines is not None:
    _write_metrics(tmp_path, lines)
  with pytest.raises(ValueError, match=pattern):
    plots.write_plots(str(tmp_path))


def test_bad_lines_and_shapes_raise_clear_errors(tmp_path):
  (tmp_path / 'metrics.jsonl').write_text('{"phase": "controller"}\nnot json\n')
  with pytest.raises(ValueError, match=r'metrics.jsonl:2 is not JSON'):
    plots.load_controller_records(str(tmp_path))
  _write_metrics(tmp_path, [{'phase': 'controller', 'op_probs': [[0.5, 0.5]]}])
  with pytest.raises(ValueError, match='op_probs must be num_nodes x 6'):
    plots.write_plots(str(tmp_path))


def test_command_line(tmp_path):
  """``python -m nar_jax.plots --workdir=DIR``: figures and summary, or exit 2 with a message."""
  _write_metrics(tmp_path, _controller_records(6))
  env = dict(os.environ, PYTHONPATH=os.getcwd(), JAX_PLATFORMS='cpu')
  run = lambda d: subprocess.run([sys.executable, '-m', 'nar_jax.plots', f'--workdir={d}'],
                                 capture_output=True, text=True, env=env, timeout=120)
  done = run(tmp_path)
  assert done.returncode == 0, done.stderr
  assert 'grad_norms.png' in done.stdout and 'skip connections: mean' in done.stdout
  empty = tmp_path / 'empty'
  empty.mkdir()
  (empty / 'metrics.jsonl').write_text('')
  failed = run(empty)
  assert failed.returncode == 2
  assert 'error:' in failed.stderr and 'no controller records' in failed.stderr
