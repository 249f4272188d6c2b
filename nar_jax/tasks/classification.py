"""The ``classification`` task: a softmax head, accuracy rewards, test accuracy.

Data: :func:`nar_jax.data.load_splits` (CIFAR-10, mnist5k, synthetic), or a face proxy
task as classification of its identities (:func:`nar_jax.tasks.faces.identity_splits`).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from nar_jax import data
from nar_jax import families
from nar_jax import tasks
from nar_jax.models.heads import Head


def search_splits(config: ml_collections.ConfigDict, workdir: str) -> data.Splits:
  ds = config.dataset
  if tasks.is_face_dataset(config):
    from nar_jax.tasks import faces  # noqa: PLC0415  (faces imports this module)
    return faces.identity_splits(faces.proxy_splits(config, workdir), ds.proxy.valid_per_identity)
  return data.load_splits(ds.name, data_dir=ds.data_dir or None,
                          valid_size=None if ds.valid_size < 0 else ds.valid_size,
                          seed=config.seed)


def accuracy_reward(config: ml_collections.ConfigDict, workdir: str,
                    splits: data.Splits) -> tasks.RewardData:
  """Rewards on the validation split: one label per image."""
  del config, workdir
  return tasks.RewardData('accuracy', splits.valid.images, splits.valid.labels)


def test_accuracy(ev: tasks.Evaluator, model, variables, splits: data.Splits) -> dict[str, Any]:
  """Accuracy and loss on the test split (``None`` without one)."""
  if not len(splits.test):
    return {'test_acc': None, 'test_loss': None}
  test = ev.accuracy(model, variables, splits.test, splits)
  ev.log.info(f'[{ev.phase}] test acc {test["accuracy"]:.4f} loss {test["loss"]:.4f}')
  ev.log.record(phase=ev.phase, test_acc=test['accuracy'], test_loss=test['loss'])
  return {'test_acc': test['accuracy'], 'test_loss': test['loss']}


def _headline(config: ml_collections.ConfigDict, splits: data.Splits) -> str:
  if not len(splits.test):
    raise ValueError('the run has no test split: no retrained accuracy to evaluate')
  return 'test accuracy'


def _check_config(config: ml_collections.ConfigDict, family: families.Family) -> None:
  del family
  if tasks.is_face_dataset(config):
    tasks.check_face_data(config)
  if config.search.reward != 'accuracy':
    raise ValueError(f"config.search.reward={config.search.reward!r} needs face networks; "
                     "classification rewards are 'accuracy'")


TASK = tasks.Task(
    name='classification',
    head=lambda config: Head('softmax'),
    search_splits=search_splits,
    retrain_splits=lambda config, workdir, splits: splits,
    counted_classes=lambda splits: splits.num_classes,
    reward_data=accuracy_reward,
    evaluate=test_accuracy,
    monitor=lambda ev, model, variables, splits, epoch: None,
    headline=_headline,
    headline_value=lambda config, retrained: retrained['test_acc'],
    check_config=_check_config,
)
