"""ImageNet-1k (TFDS ``imagenet2012``) for JAX training, read without TensorFlow.

The data is a TFDS copy prepared once in the ``array_record`` format (README,
"Preparing ImageNet"): ``<data_dir>/imagenet2012/<version>/`` with
``dataset_info.json``, ``features.json`` and shards
``imagenet2012-{train,validation}.array_record-000NN-of-000MM``. `open_split`
reads a split with `tfds.data_source` and leaves the images encoded: a record is
``{'image': JPEG bytes, 'label': int, 'file_name': bytes}``.

`batches` is one epoch of a split as a `grain` pipeline over that source, decoding
JPEGs in parallel threads (and optionally worker processes):

* train: Inception-style random-resized crop (area 8%-100%, aspect ratio 3/4-4/3)
  resized to 224x224, then a random horizontal flip (`train_image`);
* eval: the image resized so that its shorter side is 256, then the central
  224x224 crop (`eval_image`).

Batches are ``(images, labels)``: uint8 ``(B, 224, 224, 3)`` and int32 ``(B,)`` numpy
arrays, like `nar_jax.data.batches`'; normalisation runs on the device
(`nar_jax.data.normalize` with `IMAGENET_MEAN` / `IMAGENET_STD`).

Every host reads its own part of each epoch (`epoch_dataset`): the examples are
permuted by ``(seed, epoch)``, the same permutation on every host, and host ``i`` of
``n`` takes positions ``i, i + n, ...`` of it, so the hosts partition the epoch. A
crop and flip are a function of ``(seed, epoch, record index)`` alone, hence the
same whatever the number of hosts, threads or processes.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import io
import itertools
import math
import os
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import grain
import jax
import numpy as np
from PIL import Image

from nar_jax.data import sources

NAME = 'imagenet2012'
SPLITS = ('train', 'validation')
NUM_CLASSES = 1000
IMAGE_SIZE = 224
RESIZE_SIZE = 256  # eval: the shorter side before the central IMAGE_SIZE crop
CROP_SCALE = (0.08, 1.0)  # train: the crop's area as a fraction of the image's
CROP_RATIO = (3 / 4, 4 / 3)  # train: the crop's width / height
CROP_ATTEMPTS = 10
# Per-channel mean and std of ImageNet's training pixels in [0, 1] units (the
# values every ImageNet recipe normalises with; `channel_stats` over 1.28M
# JPEGs would cost an epoch).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_MANUAL_FILES = ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar')


class InputOptions(NamedTuple):
  """How `batches` decodes: in-process threads and optional worker processes.

  Attributes:
    threads: threads decoding examples in each process (grain ``ReadOptions``);
      PIL releases the GIL while it decodes and resizes, so threads scale.
    processes: worker processes (grain ``mp_prefetch``), each with ``threads``
      threads; 0 decodes in this process only. Workers are spawned: a script using
      them needs the ``if __name__ == '__main__':`` guard.
    buffer: decoded examples kept ahead of the consumer per process.
  """

  threads: int = 8
  processes: int = 0
  buffer: int = 256


# Reading a prepared copy ------------------------------------------------------------


def not_prepared_message(data_dir: str, problem: str) -> str:
  """What to do when ``imagenet2012`` is not in `data_dir`: the manual download and
  ``tfds build``, which needs TensorFlow once; reading afterwards does not."""
  manual = os.path.join(data_dir, 'downloads', 'manual')
  return (
      f'Dataset {NAME!r} is not prepared in data_dir={data_dir!r}: {problem}\n'
      'ImageNet cannot be downloaded automatically. Prepare it once:\n'
      '  1. register at https://image-net.org/download-images and download '
      f'{" and ".join(_MANUAL_FILES)} into {manual}\n'
      f'  2. pip install {" ".join(sources.PREPARE_PACKAGES)}\n'
      f'  3. tfds build {NAME} --data_dir={data_dir} --manual_dir={manual} '
      '--file_format=array_record\n'
      f'then pass --config.dataset.data_dir={data_dir}. '
      'See README section "Preparing ImageNet".')


def open_split(split: str, data_dir: str | None = None) -> Sequence[dict[str, Any]]:
  """The records of ``imagenet2012/<split>`` with the images left as JPEG bytes.

  Args:
    split: ``'train'`` or ``'validation'`` (or any TFDS split expression of them,
      e.g. ``'train[:1%]'``).
    data_dir: the TFDS data directory (``None``: ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``).

  Returns:
    A random-access source (``len``, ``source[i]``) of ``{'image': bytes, 'label':
    int, 'file_name': bytes}``, picklable (grain sends it to worker processes).

  Raises:
    DatasetNotPreparedError: the copy is missing, incomplete or in the tfrecord
      format; the message names the manual-download steps.
  """
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  where = sources.resolve_tfds_dir(data_dir)
  parent = sources.nested_tfds_dir(NAME, where)
  if parent is not None and not glob.glob(os.path.join(where, NAME, '*', 'dataset_info.json')):
    raise sources.DatasetNotPreparedError(
        sources._nested_message(NAME, where, parent))  # pylint: disable=protected-access
  problem = sources._diagnose_tfds_dir(  # pylint: disable=protected-access
      NAME, where, (split.split('[')[0],))
  if problem is not None:
    raise sources.DatasetNotPreparedError(not_prepared_message(where, problem))
  try:
    return tfds.data_source(NAME, split=split, data_dir=where, download=False, try_gcs=False,
                            decoders={'image': tfds.decode.SkipDecoding()})
  except Exception as e:  # pylint: disable=broad-except
    raise sources.DatasetNotPreparedError(not_prepared_message(
        where, f'reading it failed ({type(e).__name__}: {e}).')) from e


def num_classes(source: Any) -> int:
  """Classes of a source's label feature (1000 for imagenet2012)."""
  try:
    return int(source.dataset_info.features['label'].num_classes)
  except (AttributeError, KeyError, TypeError):
    return NUM_CLASSES


# Crops ----------------------------------------------------------------------------


def random_resized_box(height: int, width: int, rng: np.random.Generator,
                       scale: tuple[float, float] = CROP_SCALE,
                       ratio: tuple[float, float] = CROP_RATIO,
                       attempts: int = CROP_ATTEMPTS) -> tuple[int, int, int, int]:
  """An Inception-style random crop ``(top, left, crop_height, crop_width)`` of an image.

  Draws the crop's area uniformly in ``scale`` (fractions of ``height * width``) and its
  aspect ratio (width / height) log-uniformly in ``ratio``, at a uniform position; after
  ``attempts`` draws that do not fit, the central crop of the whole image clamped to
  ``ratio`` (torchvision's ``RandomResizedCrop``).
  """
  area = height * width
  log_ratio = np.log(ratio)
  for _ in range(attempts):
    target = area * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
  aspect = width / height
  if aspect < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif aspect > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def central_box(height: int, width: int, size: int = IMAGE_SIZE,
                resize: int = RESIZE_SIZE) -> tuple[float, float, float, float]:
  """``(top, left, crop_height, crop_width)`` in the image's pixels of the central
  ``size x size`` crop after resizing the shorter side to ``resize``: a square of side
  ``shorter * size / resize`` in the middle."""
  side = min(height, width) * size / resize
  return (height - side) / 2, (width - side) / 2, side, side


def decode(jpeg: bytes) -> Image.Image:
  """A JPEG as an RGB PIL image (greyscale and CMYK files converted)."""
  image = Image.open(io.BytesIO(jpeg))
  return image if image.mode == 'RGB' else image.convert('RGB')


def crop_resize(image: Image.Image, box: tuple[float, float, float, float],
                size: int = IMAGE_SIZE) -> np.ndarray:
  """uint8 ``(size, size, 3)``: ``box`` = ``(top, left, height, width)`` of ``image``
  resized (bilinear, antialiased when shrinking) to ``size x size``, in one resampling."""
  top, left, h, w = box
  resized = image.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
  return np.asarray(resized, np.uint8)


def train_image(jpeg: bytes, rng: np.random.Generator, size: int = IMAGE_SIZE,
                scale: tuple[float, float] = CROP_SCALE,
                ratio: tuple[float, float] = CROP_RATIO) -> np.ndarray:
  """uint8 ``(size, size, 3)``: a random-resized crop (`random_resized_box`) of the
  JPEG, flipped left-right with probability 1/2; a function of ``rng``'s state."""
  image = decode(jpeg)
  box = random_resized_box(image.height, image.width, rng, scale, ratio)
  out = crop_resize(image, box, size)
  return out[:, ::-1] if rng.random() < 0.5 else out


def eval_image(jpeg: bytes, size: int = IMAGE_SIZE, resize: int = RESIZE_SIZE) -> np.ndarray:
  """uint8 ``(size, size, 3)``: the JPEG with its shorter side resized to ``resize``,
  centrally cropped to ``size x size`` (`central_box`, one resampling)."""
  image = decode(jpeg)
  return crop_resize(image, central_box(image.height, image.width, size, resize), size)


# The pipeline ------------------------------------------------------------------------


def epoch_seeds(seed: int, epoch: int) -> tuple[int, int]:
  """The ``(shuffle, augmentation)`` seeds of an epoch, uint32 and independent."""
  shuffle, augment = np.random.SeedSequence([seed, epoch]).generate_state(2)
  return int(shuffle), int(augment)


def process_shard(drop_remainder: bool = False) -> grain.sharding.ShardOptions:
  """This process's ``grain.sharding.ShardOptions``: shard ``jax.process_index()`` of
  ``jax.process_count()``; ``drop_remainder``: every shard equally many examples."""
  return grain.sharding.ShardOptions(jax.process_index(), jax.process_count(),
                                     drop_remainder=drop_remainder)


def shard_size(num_examples: int, shard: grain.sharding.ShardOptions) -> int:
  """Examples that shard ``shard`` (``ShardOptions``) reads of ``num_examples``: every
  shard ``num_examples // count`` with ``drop_remainder``, else the first
  ``num_examples % count`` shards one more."""
  per_shard, rest = divmod(num_examples, shard.shard_count)
  return per_shard + (0 if shard.drop_remainder else int(shard.shard_index < rest))


def num_batches(num_examples: int, batch_size: int, shard: grain.sharding.ShardOptions,
                drop_remainder: bool) -> int:
  """Batches `batches` yields on shard ``shard`` for a split of ``num_examples``."""
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size <= 0):
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
  n = shard_size(num_examples, shard)
  return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def eval_resize(size: int) -> int:
  """The shorter side an eval image is resized to before its central ``size`` crop:
  ``RESIZE_SIZE`` at ``IMAGE_SIZE`` (256 -> 224), in the same ratio at other sizes."""
  return int(round(size * RESIZE_SIZE / IMAGE_SIZE))


def _train_example(record: dict[str, Any], rng: np.random.Generator,
                   size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.int32]:
  """A train record's crop (`train_image`, ``size x size``) and label."""
  return train_image(record['image'], rng, size), np.int32(record['label'])


def _eval_example(record: dict[str, Any], size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.int32]:
  """An eval record's central crop (`eval_image`, ``size x size``) and label."""
  return eval_image(record['image'], size, eval_resize(size)), np.int32(record['label'])


def epoch_dataset(source: Sequence[dict[str, Any]], *, train: bool, seed: int, epoch: int,
                  shard: grain.sharding.ShardOptions,
                  size: int = IMAGE_SIZE) -> grain.MapDataset:
  """One epoch of `source` on one shard as a ``grain.MapDataset`` of ``(image, label)``.

  Train: record ``k`` becomes ``train_image`` with a generator seeded by (the epoch's
  augmentation seed, ``k``); the records are permuted by the epoch's shuffle seed; the
  shard takes positions ``shard_index::shard_count`` of the permutation (of its first
  ``count * (N // count)`` positions with ``shard.drop_remainder``). Eval: no
  permutation, ``eval_image`` (shorter side `eval_resize`). Elements are decoded when
  read: uint8 ``(size, size, 3)`` (224 by default) and an int32 label.
  """
  shuffle_seed, augment_seed = epoch_seeds(seed, epoch)
  ds = grain.MapDataset.source(source)
  if train:
    ds = ds.random_map(functools.partial(_train_example, size=size),
                       seed=augment_seed).shuffle(seed=shuffle_seed)
  else:
    ds = ds.map(functools.partial(_eval_example, size=size))
  end = len(ds) - len(ds) % shard.shard_count if shard.drop_remainder else len(ds)
  return ds[shard.shard_index:end:shard.shard_count]


def batches(source: Sequence[dict[str, Any]], batch_size: int, *, train: bool, seed: int,
            epoch: int, shard: grain.sharding.ShardOptions | None = None,
            drop_remainder: bool | None = None, options: InputOptions = InputOptions(),
            size: int = IMAGE_SIZE) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """One epoch of `source` on this host in minibatches, decoded in parallel.

  Args:
    source: records from `open_split` (or any source of such dicts).
    batch_size: examples per batch on this host.
    train: random-resized crop + flip and a permutation (`epoch_dataset`), else the
      central crop in the source's order.
    seed, epoch: the permutation and the augmentation are a function of them alone.
    shard: this host's ``grain.sharding.ShardOptions``; ``None``: `process_shard`
      with ``drop_remainder=train`` (training hosts take equally many examples).
    drop_remainder: drop the last incomplete batch; ``None``: ``train``.
    options: threads, worker processes and buffer of the decoding.
    size: the side of the square crops (224; smaller for smoke tests).

  Returns:
    An iterator of ``(images, labels)``: uint8 ``(B, size, size, 3)`` and int32 ``(B,)``;
    `num_batches` of them. Evaluation over several hosts (no drop) leaves the hosts
    different numbers of examples and a short last batch: pad before a collective step.
  """
  shard = process_shard(drop_remainder=train) if shard is None else shard
  drop_remainder = train if drop_remainder is None else drop_remainder
  num_batches(len(source), batch_size, shard, drop_remainder)  # Validates batch_size.
  ds = epoch_dataset(source, train=train, seed=seed, epoch=epoch, shard=shard, size=size)
  ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=options.threads,
                                            prefetch_buffer_size=options.buffer))
  if options.processes:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():  # grain's workers read its absl flags' defaults.
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=options.processes, per_worker_buffer_size=options.buffer))
  return iter(ds.batch(batch_size, drop_remainder=drop_remainder))


# A split for the training loops ----------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class ImageNetSplit(sources.StreamedSplit):
  """An ``imagenet2012`` split as `nar_jax.data.batches` reads it (`sources.StreamedSplit`):
  every epoch streamed through `batches`.

  A training epoch (``shuffle=True``) is permuted by ``(seed, epoch)`` and cropped and
  flipped on the host (random-resized crop, `train_image`), so the device step must not
  augment again (``dataset.crop_padding=0``, ``dataset.flip=False``); an evaluation
  (``shuffle=False``) is the central crops (`eval_image`) in the source's order.
  Batches are this process's rows: a global batch of ``B`` is ``B / jax.process_count()``
  rows from each process, which reads its own shard of the epoch (`process_shard`; with
  ``drop_remainder`` every process reads equally many examples).

  Attributes:
    source: the records (`open_split`).
    size: the side of the square crops (224).
    options: the decoding's threads, worker processes and buffer.
  """

  source: Sequence[dict[str, Any]]
  size: int = IMAGE_SIZE
  options: InputOptions = InputOptions()

  @property
  def image_shape(self) -> tuple[int, int, int]:
    return (self.size, self.size, 3)

  def __len__(self) -> int:
    return len(self.source)

  def __repr__(self) -> str:
    return f'ImageNetSplit({len(self)} records, {self.size}x{self.size} crops)'

  def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
              drop_remainder: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch in this process's rows of global batches of ``batch_size``: uint8
    ``(batch_size / process_count, size, size, 3)`` and int32 labels.

    Without ``drop_remainder`` (an evaluation) the processes' shards differ by up to one
    example; a process with fewer batches than `num_batches` ends with empty ones (0
    rows, padded by the consumer), so every process takes part in every global batch.
    """
    shard = process_shard(drop_remainder=drop_remainder)
    rows = process_batch(batch_size, shard.shard_count)
    it = batches(self.source, rows, train=shuffle, seed=seed, epoch=epoch, shard=shard,
                 drop_remainder=drop_remainder, options=self.options, size=self.size)
    if drop_remainder:
      return it
    missing = (self.num_batches(batch_size, drop_remainder=False)
               - num_batches(len(self.source), rows, shard, False))
    empty = (np.zeros((0, *self.image_shape), np.uint8), np.zeros((0,), np.int32))
    return itertools.chain(it, itertools.repeat(empty, missing))

  def num_batches(self, batch_size: int, drop_remainder: bool = True) -> int:
    """Batches of one epoch on every process: a training epoch drops the examples that do
    not fill a batch on every process; an evaluation covers the largest shard (the
    first)."""
    shard = process_shard(drop_remainder=drop_remainder)
    first = grain.sharding.ShardOptions(0, shard.shard_count, drop_remainder=drop_remainder)
    count = num_batches(len(self.source), process_batch(batch_size, shard.shard_count),
                        first, drop_remainder)
    if drop_remainder and not count:
      raise ValueError(f'batch_size={batch_size} is larger than the split ({len(self)} '
                       'examples): an epoch would have no batch.')
    return count


def process_batch(batch_size: int, process_count: int) -> int:
  """This process's rows of a global batch of ``batch_size`` over ``process_count``
  processes.

  Raises:
    ValueError: ``batch_size`` is not a positive multiple of ``process_count``.
  """
  if (isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer))
      or batch_size <= 0 or batch_size % process_count):
    raise ValueError(f'batch_size must be a positive multiple of the {process_count} '
                     f'processes, got {batch_size!r}.')
  return batch_size // process_count


def load_splits(data_dir: str | None = None, size: int = IMAGE_SIZE,
                options: InputOptions = InputOptions()) -> sources.Splits:
  """``imagenet2012`` as `sources.Splits` for the training loops: train = the 1.28M
  training images (`ImageNetSplit`), valid = empty (retraining learns from all of
  train), test = the 50,000 validation images (224 central crops); normalised with
  `IMAGENET_MEAN` / `IMAGENET_STD`.

  Raises:
    DatasetNotPreparedError: the copy in `data_dir` is missing or unusable.
  """
  train = ImageNetSplit(open_split('train', data_dir), size, options)
  test = ImageNetSplit(open_split('validation', data_dir), size, options)
  empty = sources.Split(np.zeros((0, size, size, 3), np.uint8), np.zeros((0,), np.int32))
  return sources.Splits(train=train, valid=empty, test=test,
                        num_classes=num_classes(train.source), mean=IMAGENET_MEAN,
                        std=IMAGENET_STD)
