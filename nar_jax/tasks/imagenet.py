"""The ``imagenet`` task: a refined network transferred to ImageNet-1k (the paper's
Table 6): retrained from scratch on the 1.28M training images and judged by top-1 and
top-5 accuracy on the 50,000 validation images' central 224 crops.

Data: :func:`nar_jax.data.imagenet.load_splits`, TFDS ``imagenet2012`` read without
TensorFlow and streamed (:class:`nar_jax.data.imagenet.ImageNetSplit`): every training
epoch is decoded, random-resized cropped and flipped on the host by a grain pipeline,
so the device step augments nothing (``dataset.crop_padding=0``, ``dataset.flip=False``).
There is no search on ImageNet: the architecture comes from ``config.arch`` (a CIFAR-10
run's ``arch.json``, or ``'baseline'``).
"""

from __future__ import annotations

from typing import Any

import ml_collections

from nar_jax import data
from nar_jax import families
from nar_jax import tasks
from nar_jax.data import imagenet
from nar_jax.tasks import classification

DATASET = imagenet.NAME
"""``config.dataset.name`` of this task."""


def input_options(config: ml_collections.ConfigDict) -> imagenet.InputOptions:
  """The decoding's threads, worker processes and buffer (``config.dataset.input``)."""
  i = config.dataset.input
  return imagenet.InputOptions(threads=i.threads, processes=i.processes, buffer=i.buffer)


def splits(config: ml_collections.ConfigDict, workdir: str) -> data.Splits:
  """``imagenet2012`` in ``config.dataset.data_dir`` at ``config.dataset.image_size``
  (:func:`nar_jax.data.imagenet.load_splits`: train, an empty valid, validation as test).

  Raises:
    DatasetNotPreparedError: not prepared there (README, "Preparing ImageNet").
  """
  del workdir
  ds = config.dataset
  return imagenet.load_splits(ds.data_dir or None, ds.image_size, input_options(config))


def top1_top5(ev: tasks.Evaluator, model, variables, splits: data.Splits) -> dict[str, Any]:
  """Top-1 (``test_acc``), top-5 (``test_top5``) and loss on the validation images."""
  test = ev.accuracy(model, variables, splits.test, splits)
  ev.log.info(f'[{ev.phase}] validation top-1 {test["accuracy"]:.4f} top-5 {test["top5"]:.4f} '
              f'loss {test["loss"]:.4f}')
  ev.log.record(phase=ev.phase, test_acc=test['accuracy'], test_top5=test['top5'],
                test_loss=test['loss'])
  return {'test_acc': test['accuracy'], 'test_top5': test['top5'], 'test_loss': test['loss']}


def check_config(config: ml_collections.ConfigDict, family: families.Family) -> None:
  """An ImageNet run retrains given architectures with host-side augmentation."""
  del family
  if not config.arch:
    raise ValueError("config.arch must name the architecture to retrain on ImageNet: "
                     "'baseline', or the arch.json of a CIFAR-10 search "
                     "(--config.arch=runs/cifar_resnet18/arch.json); ImageNet runs no search")
  if config.dataset.crop_padding or config.dataset.flip:
    raise ValueError('imagenet2012 is cropped and flipped on the host (random-resized crop): '
                     'set config.dataset.crop_padding=0 and config.dataset.flip=False')
  if config.scan_epoch:
    raise ValueError('config.scan_epoch puts a whole epoch of images on the devices; '
                     'imagenet2012 is streamed: use config.scan_epoch=False')
  if config.dataset.image_size <= 0:
    raise ValueError(f'config.dataset.image_size must be positive, got '
                     f'{config.dataset.image_size}')


TASK = classification.TASK._replace(
    name='imagenet',
    search_splits=splits,
    evaluate=top1_top5,
    headline=lambda config, splits: 'validation top-1 accuracy',
    check_config=check_config,
)
