"""The paper's Table 1 transfer study: ``python -m nar_jax.transfer --config=... --workdir=DIR``.

NAR's claim: an architecture searched jointly (operators *and* skips, ENAS's
"NAS-Arch") overfits its search task, while a proven hand-made network transfers.
The study retrains each network with *one* recipe on each task and tabulates the
test accuracies:

* networks: ``nas_arch`` (a joint architecture, e.g. the ``arch.json`` of a
  ``configs/cifar_nasarch.py`` run, as an ENAS macro network) and ``resnet20_wide``
  (ResNet-20 with 64/128/256 channels times ``resnet_width``);
* tasks: ``A`` and ``B``, each a ``dataset`` section of the pipeline config.

On a face task (``faces`` / ``synthetic_faces``) both networks train as face networks,
as the paper did (``face_head``, on by default): ArcFace's "E" embedding and margin
head (:class:`nar_jax.models.face_head.FaceHead`, ``model.head='face'``) on every
identity of ``train.rec`` (``retrain.data='full'``), then insightface's verification
on the task's ``dataset.verification`` pair sets (LFW, CFP-FP, AgeDB-30). The table
gives a classification task's test accuracy and a face task's verification accuracy
(mean +- std over the 10 folds).

Every (network, task) retrain is one :func:`nar_jax.pipeline.run` with
``config.arch`` set (no search) in ``DIR/<network>_<task>``, so it is checkpointed
and resumable like any run. The study writes ``DIR/transfer.json`` and
``DIR/transfer.md``.

With ``face_head=False`` a face task is classification of the proxy task's identities
(:func:`nar_jax.tasks.faces.identity_splits`) with softmax heads instead.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Sequence

import ml_collections
from absl import app, flags
from ml_collections import config_flags

from nar_jax import config as config_lib
from nar_jax import distributed, families, pipeline, tasks, train
from nar_jax.data import DatasetNotPreparedError

NETWORKS = ('nas_arch', 'resnet20_wide')
TASKS = ('A', 'B')


def study_config() -> ml_collections.ConfigDict:
  """The study's schema and defaults (see ``configs/transfer_study.py``).

  Fields: ``networks`` (comma-separated, from :data:`NETWORKS`), ``nas_arch`` (an
  ``arch.json`` path or a JSON joint architecture), ``nas_arch_channels`` and
  ``nas_arch_widen`` (the NAS-Arch network's first-stage width and whether it doubles
  at pool layers), ``resnet_width``, ``tasks.A`` / ``tasks.B`` (pipeline ``dataset``
  sections), ``face_head`` (face tasks train face networks and verify them; else
  classify identities), ``margin`` and ``embedding_size`` (the face head's),
  ``retrain`` (the one recipe: a pipeline ``retrain`` section), ``seed``,
  ``num_devices``, ``eval_batch_size``, ``log_every_steps``.
  """
  base = config_lib.base_config()
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_devices = 0
  c.networks = ','.join(NETWORKS)
  c.nas_arch = ''
  c.nas_arch_channels = 96
  c.nas_arch_widen = False
  c.resnet_width = 1.0
  c.tasks = ml_collections.ConfigDict({t: config_lib.base_config().dataset for t in TASKS})
  c.face_head = True
  c.margin = base.margin
  c.embedding_size = base.model.embedding_size
  c.retrain = base.retrain
  c.retrain.baseline = False
  c.eval_batch_size = base.eval_batch_size
  c.log_every_steps = base.log_every_steps
  return c


def networks(study: ml_collections.ConfigDict) -> tuple[str, ...]:
  names = tuple(n.strip() for n in study.networks.split(',') if n.strip())
  for name in names:
    if name not in NETWORKS:
      raise ValueError(f'unknown network {name!r} in config.networks; use {", ".join(NETWORKS)}')
  if not names:
    raise ValueError('config.networks names no network')
  return names


def nas_arch(study: ml_collections.ConfigDict) -> list:
  """The NAS-Arch joint architecture of the study (readable or flat form)."""
  text = study.nas_arch.strip()
  if not text:
    raise ValueError('config.nas_arch must name the arch.json of a cifar_nasarch run or give a '
                     'joint architecture as JSON')
  if text.startswith('['):
    return json.loads(text)
  text = config_lib.expand_path(text)
  if not os.path.exists(text):
    raise ValueError(f'config.nas_arch names {text}, which does not exist; run '
                     'configs/cifar_nasarch.py first (its workdir holds arch.json)')
  with open(text) as f:
    return json.load(f)['arch']


def run_config(study: ml_collections.ConfigDict, network: str, task: str,
               data_dir: str = '') -> ml_collections.ConfigDict:
  """The pipeline config that retrains ``network`` on ``task`` with the study's recipe.

  ``data_dir`` replaces an empty ``dataset.data_dir`` (so the synthetic faces are
  written once for every network).
  """
  c = config_lib.base_config()
  c.seed, c.num_devices = study.seed, study.num_devices
  c.dataset = ml_collections.ConfigDict(study.tasks[task].to_dict())
  if not c.dataset.data_dir:
    c.dataset.data_dir = data_dir
  c.retrain = ml_collections.ConfigDict(study.retrain.to_dict())
  c.retrain.baseline = False
  # Unused without a search, but validated: keep them within the retrain recipe.
  c.child.batch_size = c.retrain.batch_size
  c.search.controller.valid_batch_size = c.retrain.batch_size
  c.eval_batch_size, c.log_every_steps = study.eval_batch_size, study.log_every_steps
  if study.face_head and tasks.is_face_dataset(c):
    c.model.head = 'face'
    c.model.embedding_size = study.embedding_size
    c.margin = ml_collections.ConfigDict(study.margin.to_dict())
  if network == 'nas_arch':
    arch = nas_arch(study)
    layers = families.macro.num_layers(arch)
    c.model.base = 'enas_macro'
    c.model.num_layers = layers
    c.model.channels = c.model.retrain_channels = study.nas_arch_channels
    c.model.retrain_widen = study.nas_arch_widen
    c.arch = json.dumps(arch)
  else:
    c.model.base = 'resnet20_wide'
    c.model.granularity = 'conv'
    c.model.width = study.resnet_width
    c.arch = 'baseline'
  config_lib.validate(c)
  return c


def run(study: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Retrains every (network, task) and writes ``transfer.json`` and ``transfer.md``.

  Returns ``{'tasks': {task: dataset name}, 'rows': [{'network', 'task', 'dataset',
  'test_acc', 'verification', 'params', 'macs', 'workdir'}, ...]}``; ``verification``
  is the pipeline's ``{pair set: {'accuracy', 'accuracy_std', ...}}`` (empty unless
  the task trained face networks), ``test_acc`` is ``None`` without a test split.
  """
  names = networks(study)
  workdir = config_lib.expand_path(workdir)
  os.makedirs(workdir, exist_ok=True)
  rows = []
  for network in names:
    for task in TASKS:
      run_dir = os.path.join(workdir, f'{network}_{task}')
      shared = os.path.join(workdir, f'data_{task}')
      report = pipeline.run(run_config(study, network, task, shared), run_dir)
      refined = report['refined']
      rows.append({'network': network, 'task': task, 'dataset': study.tasks[task].name,
                   'test_acc': refined['test_acc'], 'verification': refined['verification'],
                   'params': refined['params'],
                   'macs': refined['macs'], 'workdir': run_dir})
  result = {'tasks': {t: study.tasks[t].name for t in TASKS}, 'rows': rows}
  if distributed.is_main_process():
    with open(os.path.join(workdir, 'transfer.json'), 'w') as f:
      json.dump(result, f, indent=2)
    with open(os.path.join(workdir, 'transfer.md'), 'w') as f:
      f.write(markdown(result))
  return result


def accuracy_text(row: dict[str, Any] | None) -> str:
  """A table cell: each pair set's verification accuracy ``mean +- std`` (face networks),
  else the test accuracy; ``-`` when there is none."""
  if row is None:
    return '-'
  if row.get('verification'):
    return '; '.join(f'{name} {r["accuracy"]:.4f} +- {r["accuracy_std"]:.4f}'
                     for name, r in row['verification'].items())
  return '-' if row['test_acc'] is None else f'{row["test_acc"]:.4f}'


def markdown(result: dict[str, Any]) -> str:
  """The comparison table: one row per network, accuracy (and size) per task."""
  tasks = result['tasks']
  header = ' | '.join(f'{t} ({tasks[t]}) accuracy | {t} params | {t} MACs' for t in TASKS)
  lines = ['# Transfer study (the paper\'s Table 1)', '',
           'Each network retrained from scratch with one recipe on each task. Accuracy: the '
           'retrained network\'s test accuracy, or for face networks its verification accuracy '
           'on each pair set (insightface protocol, mean +- std over 10 folds). Face networks are '
           'counted without their classifier.', '',
           f'| network | {header} |',
           '| --- |' + ' ---: | ---: | ---: |' * len(TASKS)]
  by_network: dict[str, dict[str, dict]] = {}
  for row in result['rows']:
    by_network.setdefault(row['network'], {})[row['task']] = row
  for network, cells in by_network.items():
    parts = []
    for t in TASKS:
      row = cells.get(t)
      parts.append(f'{accuracy_text(row)} | {row["params"]:,} | {row["macs"]:,}' if row
                   else '- | - | -')
    lines.append(f'| {network} | ' + ' | '.join(parts) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv: Sequence[str]) -> None:
  """absl entry point: runs the study of ``--config`` in ``--workdir``, prints the table."""
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {" ".join(argv[1:])}')
  train.add_cpu_xla_flags()
  try:
    distributed.initialize_from_flags()
    result = run(flags.FLAGS.config, flags.FLAGS.workdir)
  except (DatasetNotPreparedError, ValueError) as error:
    print(f'error: {error}', file=sys.stderr)
    sys.exit(2)
  if distributed.is_main_process():
    print(markdown(result))


if __name__ == '__main__':
  # Defined here, not at import: nar_jax.main defines the same flags.
  config_flags.DEFINE_config_file('config', None, 'Transfer study config file.',
                                  lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory of the study.')
  flags.mark_flags_as_required(['config', 'workdir'])
  distributed.define_flags()
  app.run(main, argv=config_lib.resolve_config_argv(sys.argv))
