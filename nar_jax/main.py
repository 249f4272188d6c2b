"""Command line: ``python -m nar_jax.main --config=configs/quickstart.py --workdir=DIR``.

Runs (or resumes) the whole NAR pipeline described by the config file; any config
field can be overridden, e.g. ``--config.search.epochs=3``. ``--config`` takes a path
(``~`` expanded); ``configs/NAME.py`` that does not exist under the current directory is
the copy installed with the package (:func:`nar_jax.config.resolve_config_file`). The
``nar-jax`` console script of an installed package is the same command.
"""

import sys

from absl import app
from absl import logging
from absl import flags
from ml_collections import config_flags

from nar_jax import config as config_lib
from nar_jax import distributed, pipeline, train
from nar_jax.data import DatasetNotPreparedError

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Experiment config file.',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and reports.')
flags.mark_flags_as_required(['config', 'workdir'])
distributed.define_flags()


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  train.add_cpu_xla_flags()
  try:
    distributed.initialize_from_flags()
    pipeline.run(_CONFIG.value, _WORKDIR.value)
  except (DatasetNotPreparedError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)


def cli() -> None:
  """The console script ``nar-jax``: ``main`` with ``--config`` resolved."""
  app.run(main, argv=config_lib.resolve_config_argv(sys.argv))


if __name__ == '__main__':
  cli()
