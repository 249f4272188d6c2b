"""The notebooks in notebooks/ run headless at smoke sizes (nbclient) and show their figures.

Each runs in a fresh kernel of the tests' Python in the repository root, with parameters
injected after its ``parameters`` cell (tests/notebook_testing.py): a temporary workdir and
overrides that keep every notebook to about a minute on 2 CPU cores.
"""

from __future__ import annotations

import json
import os
import re

import pytest

pytest.importorskip('nbclient')
pytest.importorskip('ipykernel')

from notebook_testing import REPO, execute, inject_parameters  # noqa: E402

import nbformat  # noqa: E402

NOTEBOOKS = os.path.join(REPO, 'notebooks')
PLACEHOLDER = 'OWNER/nar_jax'
# Smaller than the smoke configs: one search epoch, two candidates per node, no retraining
# (the test accuracy of the untrained network is still evaluated and reported).
TINY_JOINT = {'search.epochs': 1, 'search.controller.updates_per_epoch': 3,
              'search.controller.num_aggregate': 4, 'derive.num_samples': 2,
              'retrain.epochs': 0, 'model.num_layers': 4, 'model.ops': 'conv3x3,max3x3'}


def outputs(nb, kind):
  """Every output of `kind` ('image/png', 'text/markdown', 'stdout') of the notebook."""
  found = []
  for cell in nb.cells:
    for out in cell.get('outputs', []):
      if kind == 'stdout' and out.get('name') == 'stdout':
        found.append(out['text'])
      elif kind in out.get('data', {}):
        found.append(out['data'][kind])
  return found


def test_every_notebook_has_a_badge_a_parameters_cell_and_an_install_cell():
  names = sorted(n for n in os.listdir(NOTEBOOKS) if n.endswith('.ipynb'))
  assert names == ['analysis.ipynb', 'faces.ipynb', 'quickstart.ipynb', 'refine_cifar10.ipynb']
  with open(os.path.join(REPO, 'README.md')) as f:
    readme = f.read()
  for name in names:
    nb = nbformat.read(os.path.join(NOTEBOOKS, name), as_version=4)
    nbformat.validate(nb)
    url = f'https://colab.research.google.com/github/{PLACEHOLDER}/blob/main/notebooks/{name}'
    assert url in readme and url in nb.cells[0].source
    install = nb.cells[1].source
    assert f"REPO = 'https://github.com/{PLACEHOLDER}'" in install
    assert "find_spec('nar_jax') is None" in install and 'nvidia-smi' in install
    assert re.search(r"jax\[cuda12\]==\{JAX_VERSION\}", install)
    with open(os.path.join(REPO, 'requirements.txt')) as f:
      jax_pin = re.search(r'^jax==(\S+)$', f.read(), re.M).group(1)
    assert f"JAX_VERSION = '{jax_pin}'" in install
    assert any('parameters' in c.metadata.get('tags', []) for c in nb.cells)
    # Committed with the outputs of a real run.
    assert any(c.get('outputs') for c in nb.cells if c.cell_type == 'code'), name


def test_inject_parameters_rejects_names_the_notebook_does_not_define():
  nb = nbformat.read(os.path.join(NOTEBOOKS, 'quickstart.ipynb'), as_version=4)
  with pytest.raises(ValueError, match='NOT_A_PARAMETER'):
    inject_parameters(nb, {'NOT_A_PARAMETER': 1})


def test_quickstart_notebook(tmp_path):
  nb = execute(os.path.join(NOTEBOOKS, 'quickstart.ipynb'),
               {'SMOKE': True, 'WORKDIR': str(tmp_path / 'run'), 'NUM_RANDOM': 1})
  # Learning curves, operator heat-maps, accuracy against MACs of the evaluation.
  assert len(outputs(nb, 'image/png')) == 3
  assert any("Kendall's tau" in md for md in outputs(nb, 'text/markdown'))
  assert any('| parameters |' in md for md in outputs(nb, 'text/markdown'))
  assert os.path.exists(tmp_path / 'run' / 'op_probs.png')
  assert os.listdir(tmp_path / 'run' / 'tensorboard')


def test_refine_cifar10_notebook_on_a_prepared_fake_cifar10(tmp_path):
  from test_data import _prepare_fake_cifar10  # pylint: disable=g-import-not-at-top
  _prepare_fake_cifar10(str(tmp_path / 'tfds'), num_train=96, num_test=32)
  tiny = {'model.width': 0.0625, 'model.granularity': 'block', 'model.ops': 'conv3x3,max3x3',
          'dataset.valid_size': 32, 'scan_epoch': False, 'child.batch_size': 32,
          'search.epochs': 1, 'search.controller.updates_per_epoch': 2,
          'search.controller.num_aggregate': 2, 'search.controller.valid_batch_size': 16,
          'derive.num_samples': 1, 'retrain.epochs': 1, 'retrain.batch_size': 32,
          'eval_batch_size': 32}
  nb = execute(os.path.join(NOTEBOOKS, 'refine_cifar10.ipynb'),
               {'DATA_DIR': str(tmp_path / 'tfds'), 'WORKDIR': str(tmp_path / 'run'),
                'OVERRIDES': tiny})
  assert any('CIFAR-10 is prepared in' in s for s in outputs(nb, 'stdout'))
  assert len(outputs(nb, 'image/png')) == 2
  with open(tmp_path / 'run' / 'report.json') as f:
    assert json.load(f)['refined']['test_acc'] is not None


def test_faces_notebook_smoke(tmp_path):
  tiny = {'search.epochs': 1, 'retrain.epochs': 1, 'search.controller.updates_per_epoch': 2,
          'model.ops': 'conv3x3,max3x3', 'retrain.baseline': False}
  nb = execute(os.path.join(NOTEBOOKS, 'faces.ipynb'),
               {'WORKDIR': str(tmp_path / 'run'), 'OVERRIDES': tiny,
                'ROC_NETWORKS': ('refined',)})
  assert any('| refined | synthetic |' in md for md in outputs(nb, 'text/markdown'))
  assert any('refined: best accuracy' in s for s in outputs(nb, 'stdout'))
  assert len(outputs(nb, 'image/png')) == 1  # ROC and accuracy vs threshold


def test_analysis_notebook_smoke(tmp_path):
  tiny = dict(TINY_JOINT, **{'alternating.max_rounds': 1, 'alternating.num_samples': 2})
  nb = execute(os.path.join(NOTEBOOKS, 'analysis.ipynb'),
               {'WORKDIR': str(tmp_path / 'run'), 'OVERRIDES': tiny})
  assert len(outputs(nb, 'image/png')) == 2  # Figure 1, operator heat-maps
  markdown = '\n'.join(outputs(nb, 'text/markdown'))
  assert '| operators |' in markdown and '| skip connections |' in markdown
  assert '| 1 | ops | 1 |' in markdown or '| 1 | operators | 1 |' in markdown
