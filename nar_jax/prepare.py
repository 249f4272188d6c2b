"""Prepares a TFDS dataset once: ``python -m nar_jax.prepare cifar10 --data_dir=DIR``.

Downloads CIFAR-10 and writes it in the ``array_record`` format that the CIFAR configs
read with ``tfds.data_source`` (no TensorFlow at run time), then reads it back with
:func:`nar_jax.data.load_splits` and prints the split sizes. Needs internet access and,
on this machine only, ``pip install tensorflow tensorflow-datasets importlib_resources``
(README, "Preparing CIFAR-10"). ``DIR`` may start with ``~`` and may be relative; it
defaults to ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``. Pass the same directory to
a run as ``--config.dataset.data_dir=DIR``.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from typing import Any

from absl import app, flags

from nar_jax.data import sources

DATASETS = ('cifar10',)
# Modules the real CIFAR-10 builder imports while preparing, by pip package name.
REQUIRED_MODULES = {'tensorflow': 'tensorflow', 'importlib_resources': 'importlib_resources'}


class PrepareError(RuntimeError):
  """Preparing cannot start or did not produce a readable copy (the message says why)."""


def missing_modules(find_spec: Callable[[str], Any] = importlib.util.find_spec) -> list[str]:
  """The pip packages of :data:`REQUIRED_MODULES` whose module cannot be imported."""
  return [package for module, package in REQUIRED_MODULES.items() if find_spec(module) is None]


def prepare(name: str, data_dir: str | None = None, builder_cls: type | None = None,
            find_spec: Callable[[str], Any] = importlib.util.find_spec) -> sources.Splits:
  """Downloads and prepares dataset `name` in `data_dir` as ``array_record``; reads it back.

  Args:
    name: one of :data:`DATASETS`.
    data_dir: the TFDS data directory (``~`` and relative paths are resolved; None or
      ``''``: ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``).
    builder_cls: a TFDS builder class to use instead of the registered one (tests: a
      builder that generates its examples offline).
    find_spec: how to tell whether a module is importable (tests).

  Returns:
    The prepared dataset as :func:`nar_jax.data.load_splits` reads it, with every
    training record in ``train`` (``valid_size=0``; runs take their validation split
    from its tail).

  Raises:
    PrepareError: unknown `name`, a missing package (the message gives the pip command).
  """
  if name not in DATASETS:
    raise PrepareError(f'unknown dataset {name!r}; this command prepares {", ".join(DATASETS)}')
  missing = missing_modules(find_spec) if builder_cls is None else []
  if missing:
    raise PrepareError(
        f'preparing {name} needs {", ".join(missing)}, which is not installed here: run\n'
        f'  pip install {" ".join(sources.PREPARE_PACKAGES)}\n'
        '(importlib_resources: tensorflow-datasets imports it while preparing but declares it '
        'only for old Pythons).')
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = sources.resolve_tfds_dir(data_dir)
  if builder_cls is None:
    builder = tfds.builder(name, data_dir=where, file_format='array_record')
  else:
    builder = builder_cls(data_dir=where, file_format='array_record')
  builder.download_and_prepare()
  try:
    return sources.load_splits(name, data_dir=where, valid_size=0)
  except sources.DatasetNotPreparedError as error:
    raise PrepareError(f'{name} was prepared in {where}, but reading it back failed:\n'
                       f'{error}') from None


def main(argv: Sequence[str]) -> None:
  """absl entry point: ``prepare(argv[1], --data_dir)``, then the split sizes."""
  if len(argv) != 2:
    raise app.UsageError(f'usage: python -m nar_jax.prepare {{{",".join(DATASETS)}}} '
                         '[--data_dir=DIR]')
  try:
    splits = prepare(argv[1], flags.FLAGS.data_dir)
  except PrepareError as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  where = sources.resolve_tfds_dir(flags.FLAGS.data_dir)
  print(f'{argv[1]} prepared in {where}: {len(splits.train)} training records (the runs '
        f'validate on their last 5,000), {len(splits.test)} test records; run with '
        f'--config.dataset.data_dir={where}')


if __name__ == '__main__':
  # Defined here, not at import: importing this module defines no flags.
  flags.DEFINE_string('data_dir', None, 'TFDS data directory (default: $TFDS_DATA_DIR or '
                      '~/tensorflow_datasets).')
  app.run(main)
