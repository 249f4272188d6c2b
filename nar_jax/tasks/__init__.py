"""Tasks: what the networks learn and how a retrained network is judged.

A :class:`Task` is a NamedTuple of pure functions (in :class:`nar_jax.policy.Policy`'s
manner). Two are built in:

* ``classification`` (:mod:`nar_jax.tasks.classification`): a softmax head; rewards and
  scores are validation accuracy, a retrained network is judged by test accuracy. A
  face proxy task under a softmax head is classification of its identities.
* ``faces`` (:mod:`nar_jax.tasks.faces`): face networks (ArcFace's embedding and margin
  head) on insightface data; rewards are accuracy or verification on a held-out pair
  set, a retrained network is verified on the config's ``.bin`` pair sets.
* ``imagenet`` (:mod:`nar_jax.tasks.imagenet`): a given architecture retrained on
  ImageNet-1k (``dataset.name='imagenet2012'``, streamed) and judged by top-1 and top-5
  accuracy on its validation images (the paper's Table 6).

:func:`task_for` is the only place that decides which task a config is.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import ml_collections
import numpy as np

from nar_jax import data
from nar_jax import families
from nar_jax.models.heads import Head


class RewardData(NamedTuple):
  """What controller rewards are measured on.

  Attributes:
    kind: ``'accuracy'`` (one target per image: its label) or ``'verification'`` (one
      target per pair of images ``2i, 2i + 1``: whether they are the same person).
    images: uint8 ``(N, H, W, C)`` (an array or :class:`nar_jax.data.LazyImages`).
    targets: ``(N,)`` labels, or ``(N / 2,)`` bool issame.
  """

  kind: str
  images: Any
  targets: np.ndarray

  @property
  def images_per_target(self) -> int:
    return 1 if self.kind == 'accuracy' else 2


class Evaluator(NamedTuple):
  """What a task's ``evaluate`` and ``monitor`` measure a retrained network with (the
  phases build it from :mod:`nar_jax.train`'s jitted steps).

  Attributes:
    config, workdir: the run's.
    phase: the retraining phase, e.g. ``'retrain_refined'`` (log lines and records).
    log: the run's :class:`nar_jax.progress.Log`.
    accuracy: ``(model, variables, split, splits) -> {'accuracy', 'loss'}`` over a whole
      split (normalised with ``splits``' statistics).
    embedder: ``(model, variables, splits) -> (images -> embeddings)`` of a face network.
  """

  config: ml_collections.ConfigDict
  workdir: str
  phase: str
  log: Any
  accuracy: Callable[..., dict[str, float]]
  embedder: Callable[..., Callable[[np.ndarray], Any]]


class Task(NamedTuple):
  """A task.

  Attributes:
    name: ``'classification'`` or ``'faces'``.
    head: ``config -> Head``, the networks' output head.
    search_splits: ``(config, workdir) -> Splits``, the data the search trains and
      scores on (train, valid, test).
    retrain_splits: ``(config, workdir, search splits) -> Splits``, the data retraining
      learns from (it trains on train + valid and tests on test).
    counted_classes: ``Splits -> int``, the classifier outputs parameters and MACs are
      counted with (0: without the classifier, as face networks are reported).
    reward_data: ``(config, workdir, search splits) -> RewardData``.
    evaluate: ``(evaluator, model, variables, splits) -> dict``, what a retrained
      network's result records (``test_acc``, ``test_loss``; faces also
      ``verification``); logs what it measures.
    monitor: ``(evaluator, model, variables, epoch) -> None``, measured during
      retraining every ``retrain.verify_every_epochs`` epochs (logged only).
    headline: ``(config, splits) -> str``, the name of a retrained network's accuracy
      (the search evaluation's y axis).
    headline_value: ``(config, retrained result) -> float``, that accuracy.
    check_config: ``(config, family) -> None``; raises ``ValueError`` naming the field.
  """

  name: str
  head: Callable[[ml_collections.ConfigDict], Head]
  search_splits: Callable[[ml_collections.ConfigDict, str], data.Splits]
  retrain_splits: Callable[[ml_collections.ConfigDict, str, data.Splits], data.Splits]
  counted_classes: Callable[[data.Splits], int]
  reward_data: Callable[[ml_collections.ConfigDict, str, data.Splits], RewardData]
  evaluate: Callable[..., dict[str, Any]]
  monitor: Callable[..., None]
  headline: Callable[[ml_collections.ConfigDict, data.Splits], str]
  headline_value: Callable[[ml_collections.ConfigDict, dict[str, Any]], float]
  check_config: Callable[[ml_collections.ConfigDict, families.Family], None]


FACE_DATASETS = ('faces', 'synthetic_faces')
"""Datasets of face identities (insightface's format, or written synthetically)."""


def is_face_dataset(config: ml_collections.ConfigDict) -> bool:
  return config.dataset.name in FACE_DATASETS


def check_face_data(config: ml_collections.ConfigDict) -> None:
  """The checks of a face dataset, whichever task learns it."""
  if config.scan_epoch:
    raise ValueError('config.scan_epoch puts a whole epoch of images on the devices; face '
                     'datasets are decoded batch by batch: use config.scan_epoch=False')
  if config.dataset.name == 'faces' and not config.dataset.data_dir:
    raise ValueError("config.dataset.data_dir must name the insightface directory (train.rec, "
                     "train.idx, property, *.bin) for dataset 'faces'")


def task_for(config: ml_collections.ConfigDict, family: families.Family | None = None) -> Task:
  """``faces`` for face networks (the family's only head is ``'face'``, or
  ``model.head='face'``), ``imagenet`` for ``dataset.name='imagenet2012'``,
  ``classification`` otherwise."""
  family = family or families.family_for(config)
  # pylint: disable-next=g-import-not-at-top
  from nar_jax.tasks import classification, faces, imagenet  # noqa: PLC0415  (they import this module)
  if families.network_head(family, config) == 'face':
    return faces.TASK
  return imagenet.TASK if config.dataset.name == imagenet.DATASET else classification.TASK


__all__ = ['Evaluator', 'FACE_DATASETS', 'RewardData', 'Task', 'check_face_data', 'is_face_dataset', 'task_for']
