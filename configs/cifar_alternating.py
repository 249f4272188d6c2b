"""The paper's general framework (section 3.3, eq. 9-11): alternate operator and skip search.

From the ENAS macro space's baseline chain (every layer conv3x3, a residual skip every
second layer), alternately search the operators with the skips fixed and the skips
with the operators fixed, each phase starting from the previous phase's kept
architecture, until an operator phase and a skip phase in a row keep their incumbent
(or ``alternating.max_rounds`` rounds). ``metrics.jsonl`` and ``report.md`` log the
expected-reward sequence ER_O^1, ER_S^1, ER_O^2, ... (``nar_jax/alternating.py``
defines ER). Same space and recipe as ``cifar_nasarch.py``.

Variants: none (CIFAR-10, GPU) and ``smoke`` (mnist5k, tiny, minutes on a CPU).

  python -m nar_jax.main --config=configs/cifar_alternating.py \
      --config.dataset.data_dir=$HOME/tensorflow_datasets --workdir=runs/alternating
"""

import importlib.util
import os

_NASARCH = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'cifar_nasarch.py')


def _nasarch():
  spec = importlib.util.spec_from_file_location('cifar_nasarch', _NASARCH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(arg=None):
  nasarch = _nasarch()
  c = nasarch.get_config()
  c.search.method = 'alternating'
  c.alternating.max_rounds = 3
  c.alternating.epochs_per_phase = 50
  c.alternating.num_samples = 10
  c.alternating.tolerance = 0.0
  if arg == 'smoke':
    nasarch.smoke(c)
    c.alternating.max_rounds = 2
    c.alternating.epochs_per_phase = 1
    c.alternating.num_samples = 4
  elif arg not in (None, ''):
    raise ValueError(f"unknown variant {arg!r}; use 'smoke' or none")
  return c
