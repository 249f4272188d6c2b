"""The ``faces`` task: face networks (ArcFace's embedding and margin head) on insightface data.

The search learns a proxy task (``dataset.proxy``: some identities, some images each);
retraining learns every identity of ``train.rec`` (``retrain.data='full'``, the paper) or
the proxy task; a retrained network is verified on the config's ``.bin`` pair sets with
insightface's protocol (:mod:`nar_jax.verification`). Controller rewards are accuracy
on the proxy task's validation images, or verification accuracy on a held-out pair set
(``search.reward='verification'``).
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import ml_collections
import numpy as np

from nar_jax import config as config_lib
from nar_jax import data, distributed, families, margins, tasks, verification
from nar_jax.data import faces, synthetic_faces
from nar_jax.models.heads import Head
from nar_jax.tasks import classification


def face_directory(config: ml_collections.ConfigDict, workdir: str) -> str:
  """The insightface directory of a face run; synthetic faces are written on first use
  (into ``dataset.data_dir``, or ``<workdir>/data``) by process 0 while the others wait."""
  ds = config.dataset
  if ds.name == 'faces':
    return config_lib.expand_path(ds.data_dir)
  directory = config_lib.expand_path(ds.data_dir) or os.path.join(workdir, 'data')

  def write_if_missing() -> None:
    if not os.path.exists(os.path.join(directory, 'property')):
      s = ds.synthetic
      synthetic_faces.write_synthetic_faces(
          directory, num_identities=s.num_identities, images_per_identity=s.images_per_identity,
          image_size=s.image_size, num_pairs=s.num_pairs,
          verification_identities=s.verification_identities, seed=config.seed)

  distributed.main_process_first(write_if_missing)
  return directory


def face_splits(config: ml_collections.ConfigDict, workdir: str, proxy: bool) -> data.Splits:
  """The proxy task (``proxy=True``, for the search) or every identity (retraining).

  The selection is stored as an index over ``train.rec`` in the workdir
  (``proxy_index.npz`` / ``full_index.npz``), so a resumed run uses the same images.
  Process 0 selects and writes it; the other processes then read it.
  """
  p = config.dataset.proxy
  name = 'proxy_index.npz' if proxy else 'full_index.npz'
  load = functools.partial(
      faces.load_face_splits, face_directory(config, workdir), proxy=proxy,
      num_identities=p.num_identities, images_per_identity=p.images_per_identity,
      valid_per_identity=p.valid_per_identity, seed=config.seed,
      index_path=os.path.join(workdir, name))
  splits = distributed.main_process_first(load)
  return load() if splits is None else splits


def proxy_splits(config: ml_collections.ConfigDict, workdir: str) -> data.Splits:
  """The search's proxy task."""
  return face_splits(config, workdir, proxy=True)


def identity_splits(splits: data.Splits, valid_per_identity: int) -> data.Splits:
  """A face proxy task as plain classification of its identities (softmax networks).

  ``test`` is the proxy task's validation split; ``valid`` the last
  ``valid_per_identity`` training images of each identity; ``train`` the rest. No
  image is in two splits; every identity is in all three.
  """
  labels = splits.train.labels
  rank_from_end = np.zeros(len(labels), np.int64)
  for label in np.unique(labels):
    where = np.flatnonzero(labels == label)
    rank_from_end[where] = np.arange(len(where))[::-1]
  is_valid = rank_from_end < valid_per_identity
  if not np.any(~is_valid):
    raise ValueError(f'config.dataset.proxy leaves no training image per identity after '
                     f'{valid_per_identity} validation images')
  images = splits.train.images
  subset = lambda index: images.take(index) if isinstance(images, faces.LazyImages) else images[index]
  take = lambda keep: data.Split(subset(np.flatnonzero(keep)), labels[keep])
  return dataclasses.replace(splits, train=take(~is_valid), valid=take(is_valid),
                             test=splits.valid)


def retrain_splits(config: ml_collections.ConfigDict, workdir: str,
                   splits: data.Splits) -> data.Splits:
  """Every identity of ``train.rec`` (``retrain.data='full'``), or the proxy task."""
  return face_splits(config, workdir, proxy=False) if config.retrain.data == 'full' else splits


def head(config: ml_collections.ConfigDict) -> Head:
  m = config.margin
  return Head('face', margins.Margin(m.scale, m.m1, m.m2, m.m3), config.model.embedding_size)


def reward_data(config: ml_collections.ConfigDict, workdir: str,
                splits: data.Splits) -> tasks.RewardData:
  """Accuracy on the proxy task's validation images, or verification on the held-out
  pair set ``search.reward_pairs``."""
  if config.search.reward == 'accuracy':
    return classification.accuracy_reward(config, workdir, splits)
  pairs = faces.load_verification_set(
      os.path.join(face_directory(config, workdir), f'{config.search.reward_pairs}.bin'),
      splits.image_shape)
  return tasks.RewardData('verification', pairs.images, pairs.issame)


def verify(ev: tasks.Evaluator, model, variables, splits: data.Splits) -> dict[str, dict]:
  """insightface's verification of a face network on every ``.bin`` of the config.

  Returns ``{name: {'accuracy', 'accuracy_std', 'tar', 'tar_std', 'far'}}``.
  """
  names = config_lib.verification_names(ev.config)
  if not names:
    return {}
  embed = ev.embedder(model, variables, splits)
  directory = face_directory(ev.config, ev.workdir)
  results = {}
  for name in names:
    pairs = faces.load_verification_set(os.path.join(directory, f'{name}.bin'),
                                        splits.image_shape)
    r = verification.verify(embed, pairs.images, pairs.issame,
                            batch_size=ev.config.eval_batch_size)
    results[name] = {'accuracy': r.accuracy_mean, 'accuracy_std': r.accuracy_std,
                     'tar': r.tar, 'tar_std': r.tar_std, 'far': r.far}
  return results


def log_verification(ev: tasks.Evaluator, results: dict[str, dict], epoch: int) -> None:
  for name, r in results.items():
    ev.log.info(f'[{ev.phase}] epoch {epoch} {name}: accuracy {r["accuracy"]:.4f} '
                f'+- {r["accuracy_std"]:.4f}, TAR {r["tar"]:.4f} @ FAR {r["far"]:.2e}')
    ev.log.record(phase=ev.phase, epoch=epoch, verification=name, **r)


def evaluate(ev: tasks.Evaluator, model, variables, splits: data.Splits) -> dict[str, Any]:
  """Test accuracy (when the split has a test part) and verification."""
  result = classification.test_accuracy(ev, model, variables, splits)
  result['verification'] = verify(ev, model, variables, splits)
  log_verification(ev, result['verification'], ev.config.retrain.epochs)
  return result


def monitor(ev: tasks.Evaluator, model, variables, splits: data.Splits, epoch: int) -> None:
  log_verification(ev, verify(ev, model, variables, splits), epoch)


def headline(config: ml_collections.ConfigDict, splits: data.Splits) -> str:
  names = config_lib.verification_names(config)
  if not names:
    raise ValueError('a face run without config.dataset.verification has no verification '
                     'accuracy to evaluate')
  return f'{names[0]} verification accuracy'


def headline_value(config: ml_collections.ConfigDict, retrained: dict[str, Any]) -> float:
  return retrained['verification'][config_lib.verification_names(config)[0]]['accuracy']


def check_config(config: ml_collections.ConfigDict, family: families.Family) -> None:
  if not tasks.is_face_dataset(config):
    if family.heads == ('face',):
      raise ValueError(f'config.model.base={config.model.base!r} does not fit '
                       f'config.dataset.name={config.dataset.name!r}: its networks are face '
                       f'networks, they need a face dataset ({", ".join(tasks.FACE_DATASETS)})')
    raise ValueError(f"config.model.head='face' trains face networks: it needs a face dataset "
                     f'({", ".join(tasks.FACE_DATASETS)}), got {config.dataset.name!r}')
  tasks.check_face_data(config)
  if config.search.reward == 'verification':
    if not config.search.reward_pairs:
      raise ValueError("config.search.reward='verification' needs config.search.reward_pairs "
                       'naming a held-out .bin pair set')
    if config.search.controller.valid_batch_size % 2:
      raise ValueError('config.search.controller.valid_batch_size must be even (image pairs) '
                       "with config.search.reward='verification'")


TASK = tasks.Task(
    name='faces',
    head=head,
    search_splits=proxy_splits,
    retrain_splits=retrain_splits,
    counted_classes=lambda splits: 0,
    reward_data=reward_data,
    evaluate=evaluate,
    monitor=monitor,
    headline=headline,
    headline_value=headline_value,
    check_config=check_config,
)
