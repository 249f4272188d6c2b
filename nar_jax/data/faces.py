"""Face data for the pipeline: lazily decoded images, the proxy task, verification sets.

A face training set (MS1M: 5.8M JPEGs) does not fit in host memory decoded,
so a `data.Split` of faces holds a `LazyImages`: an array-like over record
keys that reads and decodes only the images it is indexed with, in parallel
threads. `data.batches` / `data.merge` / `data.num_batches` work on it as on
an in-memory array; `nar_jax.data.prefetch` decodes the next batch while the device works.

The paper's proxy task (section 4.1.1): K identities with at least M images
each (4,000 x 40), 36 images per identity to train and 4 to validate. It is an
index over the original ``train.rec`` (record keys + labels), never a copy of
the images. `load_face_splits` returns it as `data.Splits` (or the full set).

Faces are normalised as ``(x - 127.5) / 128`` (ArcFace), i.e. ``Splits.mean =
(127.5 / 255,) * 3`` and ``Splits.std = (128 / 255,) * 3``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from nar_jax.data import insightface
from nar_jax.data import sources

FACE_MEAN = (127.5 / 255,) * 3
FACE_STD = (128 / 255,) * 3


# Lazily decoded images -----------------------------------------------------------


class _BinImages:
  """JPEG byte strings of a verification ``.bin``, read like a RecordReader."""

  def __init__(self, jpegs: Sequence[bytes], path: str):
    self.jpegs, self.path = jpegs, path

  def read_image(self, key: int) -> bytes:
    return self.jpegs[key]

  def where(self, key: int) -> str:
    return f'{self.path}: image {key}'


class LazyImages:
  """uint8 (N, H, W, 3) images decoded from JPEG on demand, as a read-only array.

  Indexing with an int, a slice or an integer array (any shape, e.g. the
  (M, B) index of the controller's minibatches) reads and decodes just those
  images in the shared thread pool and returns a numpy array of shape
  ``index.shape + (H, W, 3)``. `take` and `concat` build new views without
  decoding anything.

  Each image is a (source, key) pair; a source has ``read_image(key) ->
  bytes`` and ``where(key) -> str`` (a `insightface.RecordReader`, or the
  images of a ``.bin``).
  """

  def __init__(self, sources_: Sequence[Any], refs: np.ndarray,
               image_shape: tuple[int, int, int]):
    """Low-level constructor; prefer `from_records` / `from_jpegs`.

    Args:
      sources_: the image sources.
      refs: int64 (N, 2): (index into `sources_`, key) of each image.
      image_shape: ``(H, W, 3)`` every image decodes to.
    """
    refs = np.asarray(refs, np.int64)
    if refs.ndim != 2 or refs.shape[1] != 2:
      raise ValueError(f'refs must be (N, 2) (source, key) pairs, got shape {refs.shape}.')
    if len(refs) and not 0 <= refs[:, 0].min() <= refs[:, 0].max() < len(sources_):
      raise ValueError(f'refs name sources outside [0, {len(sources_)}).')
    if len(image_shape) != 3 or image_shape[2] != 3:
      raise ValueError(f'image_shape must be (H, W, 3), got {image_shape}.')
    self._sources = tuple(sources_)
    self._refs = refs
    self._image_shape = tuple(int(d) for d in image_shape)

  @classmethod
  def from_records(cls, reader: insightface.RecordReader, keys: Sequence[int] | np.ndarray,
                   image_shape: tuple[int, int, int]) -> LazyImages:
    """The image records `keys` of `reader` (keys are not checked until read)."""
    keys = np.asarray(keys, np.int64).reshape(-1)
    return cls([reader], np.stack([np.zeros_like(keys), keys], axis=1), image_shape)

  @classmethod
  def from_jpegs(cls, jpegs: Sequence[bytes], image_shape: tuple[int, int, int],
                 name: str = 'images') -> LazyImages:
    """In-memory JPEG bytes (e.g. a ``.bin``); `name` appears in errors."""
    n = len(jpegs)
    return cls([_BinImages(jpegs, name)],
               np.stack([np.zeros(n, np.int64), np.arange(n, dtype=np.int64)], axis=1),
               image_shape)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self._refs), *self._image_shape)

  @property
  def dtype(self) -> np.dtype:
    return np.dtype(np.uint8)

  @property
  def ndim(self) -> int:
    return 4

  @property
  def refs(self) -> np.ndarray:
    """int64 (N, 2) (source, key) pairs (a copy)."""
    return self._refs.copy()

  @property
  def sources(self) -> tuple[Any, ...]:
    return self._sources

  def __len__(self) -> int:
    return len(self._refs)

  def __repr__(self) -> str:
    return f'LazyImages(shape={self.shape}, sources={len(self._sources)})'

  def _decode(self, refs: np.ndarray) -> np.ndarray:
    def fetch(i):
      source = self._sources[refs[i, 0]]
      key = int(refs[i, 1])
      return source.read_image(key), source.where(key)

    return insightface.decode_many(fetch, len(refs), self._image_shape)

  def __getitem__(self, index) -> np.ndarray:
    if isinstance(index, (int, np.integer)) and not isinstance(index, (bool, np.bool_)):
      n = len(self)
      if not -n <= index < n:
        raise IndexError(f'index {index} is out of bounds for {n} images.')
      return self._decode(self._refs[index:index + 1 or None])[0]
    if isinstance(index, slice):
      return self._decode(self._refs[index])
    idx = np.asarray(index)
    if idx.dtype.kind not in 'iu':
      raise IndexError('LazyImages accepts an int, a slice or an integer array, got '
                       f'{type(index).__name__} of dtype {idx.dtype}.')
    flat = self._refs[idx.reshape(-1)]  # IndexError when out of bounds.
    return self._decode(flat).reshape(*idx.shape, *self._image_shape)

  def __array__(self, dtype=None, copy=None) -> np.ndarray:
    del copy  # Decoding always makes a new array.
    out = self[:]
    return out if dtype is None else out.astype(dtype)

  def take(self, indices: Sequence[int] | np.ndarray) -> LazyImages:
    """The images at `indices` (1-D integer array), as a new view; decodes nothing."""
    return LazyImages(self._sources, self._refs[np.asarray(indices, np.int64).reshape(-1)],
                      self._image_shape)

  def concat(self, other: LazyImages) -> LazyImages:
    """``self`` then ``other`` as one view (sources shared by identity); decodes nothing."""
    if not isinstance(other, LazyImages):
      raise ValueError(f'Cannot concatenate LazyImages with {type(other).__name__}.')
    if other.shape[1:] != self.shape[1:]:
      raise ValueError(f'Cannot concatenate images of shapes {self.shape[1:]} and '
                       f'{other.shape[1:]}.')
    merged = list(self._sources)
    remap = []
    for s in other.sources:
      found = next((i for i, m in enumerate(merged) if m is s), None)
      if found is None:
        merged.append(s)
        found = len(merged) - 1
      remap.append(found)
    theirs = other.refs
    if len(theirs):
      theirs[:, 0] = np.asarray(remap, np.int64)[theirs[:, 0]]
    return LazyImages(merged, np.concatenate([self._refs, theirs]), self._image_shape)


class FaceIndex(NamedTuple):
  """A train / valid selection over the records of a face training set.

  Attributes:
    train_keys: int64 (T,) record keys of the training images.
    train_labels: int32 (T,) their classes in [0, num_classes).
    valid_keys: int64 (V,) record keys of the validation images.
    valid_labels: int32 (V,) their classes.
    identities: int64 (num_classes,): class j is identity ``identities[j]``
      of the training set (its position in the identity index).
  """

  train_keys: np.ndarray
  train_labels: np.ndarray
  valid_keys: np.ndarray
  valid_labels: np.ndarray
  identities: np.ndarray

  @property
  def num_classes(self) -> int:
    return len(self.identities)


def _random_ranks(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """A random order of each identity's images.

  Returns:
    ``(order, rank)``: ``order`` lists all images by (identity, random);
    ``rank[i]`` is image i's position among its identity's images.
  """
  # One integer sort key: identity in the high bits, a random tie-breaker low.
  key = labels.astype(np.int64) << 32 | rng.integers(0, 1 << 32, len(labels), np.int64)
  order = np.argsort(key, kind='stable')
  counts = np.bincount(labels)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  rank = np.empty(len(labels), np.int64)
  rank[order] = np.arange(len(labels)) - starts[labels[order]]
  return order, rank


def _check_counts(num_identities, images_per_identity, valid_per_identity) -> None:
  for name, v in (('num_identities', num_identities),
                  ('images_per_identity', images_per_identity),
                  ('valid_per_identity', valid_per_identity)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
      raise ValueError(f'{name} must be a non-negative int, got {v!r}.')
  if num_identities == 0:
    raise ValueError('num_identities must be positive.')
  if not 0 < valid_per_identity < images_per_identity:
    raise ValueError(
        f'valid_per_identity={valid_per_identity} must lie in (0, images_per_identity='
        f'{images_per_identity}) so that both splits get images of every identity.')


def select_proxy(image_keys: np.ndarray, labels: np.ndarray, *, num_identities: int = 4000,
                 images_per_identity: int = 40, valid_per_identity: int = 4,
                 seed: int = 0) -> FaceIndex:
  """The paper's proxy task: K identities x M images, split (M - V) / V.

  With ``rng = np.random.default_rng(seed)``: K identities are drawn uniformly
  without replacement among those with at least M images (class j is the j-th
  smallest of them); then every image gets a random rank within its identity
  (``rng.integers``) and each chosen identity's M lowest-ranked images are
  kept: ranks ``0..M-V-1`` train, ``M-V..M-1`` validate. A random sample
  rather than the first M records, because records of one identity are often
  ordered (by source, pose or quality).

  Args:
    image_keys: int64 (N,) record key of each image.
    labels: int (N,) identity of each image, in [0, C).
    num_identities: K.
    images_per_identity: M.
    valid_per_identity: V, with 0 < V < M.
    seed: selection seed.

  Returns:
    A `FaceIndex` with ``K * (M - V)`` training and ``K * V`` validation
    images, both ordered by (class, rank).

  Raises:
    ValueError: bad counts, or fewer than K identities have M images.
  """
  _check_counts(num_identities, images_per_identity, valid_per_identity)
  labels = np.asarray(labels, np.int64)
  image_keys = np.asarray(image_keys, np.int64)
  counts = np.bincount(labels)
  eligible = np.flatnonzero(counts >= images_per_identity)
  if len(eligible) < num_identities:
    raise ValueError(
        f'Only {len(eligible)} of the {len(counts)} identities have at least '
        f'{images_per_identity} images; the proxy task needs {num_identities}. Lower '
        'num_identities or images_per_identity.')
  rng = np.random.default_rng(seed)
  chosen = np.sort(rng.choice(eligible, num_identities, replace=False))
  order, rank = _random_ranks(labels, rng)
  cls = np.searchsorted(chosen, labels)  # The class of images of chosen identities.
  is_chosen = np.isin(labels, chosen)
  cut = images_per_identity - valid_per_identity
  ordered = order[is_chosen[order]]
  train = ordered[rank[ordered] < cut]
  valid = ordered[(rank[ordered] >= cut) & (rank[ordered] < images_per_identity)]
  return FaceIndex(image_keys[train], cls[train].astype(np.int32), image_keys[valid],
                   cls[valid].astype(np.int32), chosen.astype(np.int64))


def select_full(image_keys: np.ndarray, labels: np.ndarray, *, valid_per_identity: int = 4,
                seed: int = 0) -> FaceIndex:
  """Every identity and image: V random images of each identity validate, the rest train.

  Identities with V images or fewer put them all in train (so every class is
  trained). Labels stay the identities' labels. ``train + valid`` is the whole
  set (what retraining uses).
  """
  if (isinstance(valid_per_identity, bool) or not isinstance(valid_per_identity, (int, np.integer))
      or valid_per_identity <= 0):
    raise ValueError(f'valid_per_identity must be a positive int, got {valid_per_identity!r}.')
  labels = np.asarray(labels, np.int64)
  image_keys = np.asarray(image_keys, np.int64)
  counts = np.bincount(labels)
  order, rank = _random_ranks(labels, np.random.default_rng(seed))
  held = (rank < valid_per_identity) & (counts[labels] > valid_per_identity)
  train, valid = order[~held[order]], order[held[order]]
  return FaceIndex(image_keys[train], labels[train].astype(np.int32), image_keys[valid],
                   labels[valid].astype(np.int32), np.arange(len(counts), dtype=np.int64))


def save_index(path: str, index: FaceIndex, meta: dict[str, Any]) -> None:
  """Writes `index` and its parameters `meta` (scalars) to an ``.npz``, atomically."""
  tmp = f'{path}.tmp.npz'
  np.savez(tmp, **index._asdict(), **{f'meta_{k}': np.asarray(v) for k, v in meta.items()})
  os.replace(tmp, path)


def load_index(path: str) -> tuple[FaceIndex, dict[str, Any]]:
  """Reads an ``.npz`` written by `save_index`: ``(index, meta)``."""
  try:
    with np.load(path) as z:
      index = FaceIndex(**{f: z[f] for f in FaceIndex._fields})
      meta = {k[len('meta_'):]: z[k].item() for k in z.files if k.startswith('meta_')}
  except (OSError, KeyError, ValueError) as e:
    raise insightface.FaceDataError(f'{path}: not a face index file ({e}).') from None
  return index, meta


def _index_meta(records: insightface.FaceRecords, **params) -> dict[str, Any]:
  return dict(params, rec_bytes=os.path.getsize(records.reader.rec_path),
              num_records=len(records.reader))


def load_face_splits(rec_dir: str, *, proxy: bool = True, num_identities: int = 4000,
                     images_per_identity: int = 40, valid_per_identity: int = 4,
                     seed: int = 0, index_path: str | None = None) -> sources.Splits:
  """An insightface training set as `data.Splits` of lazily decoded images.

  Args:
    rec_dir: directory with ``train.rec``, ``train.idx`` and ``property``.
    proxy: the proxy task (`select_proxy`: K identities x M images, for the
      search) if True; else every identity and image (`select_full`, for
      retraining: merge train and valid).
    num_identities: K (proxy only).
    images_per_identity: M (proxy only).
    valid_per_identity: V validation images per identity.
    seed: selection seed.
    index_path: optional ``.npz`` caching the selection (record keys and
      labels): reused when its parameters and the ``.rec`` match, else an
      error; written when missing. Keep it next to the run's outputs so the
      run records which images it used.

  Returns:
    `data.Splits`: train / valid of `LazyImages` (H, W, 3), an empty (0, H,
    W, 3) test split (faces are tested by verification), ``num_classes`` = K
    (proxy) or the number of identities, ArcFace's mean and std.

  Raises:
    FaceDataError: missing or malformed files, or a stale `index_path`.
    ValueError: bad counts, or too few identities for the proxy task.
  """
  records = insightface.open_face_records(rec_dir)
  params = dict(proxy=bool(proxy), seed=int(seed), valid_per_identity=int(valid_per_identity))
  if proxy:
    params.update(num_identities=int(num_identities),
                  images_per_identity=int(images_per_identity))
  meta = _index_meta(records, **params)
  if index_path is not None and os.path.exists(index_path):
    index, saved = load_index(index_path)
    if saved != meta:
      raise insightface.FaceDataError(
          f'{index_path}: this face index was made with {saved}, but the run asks for '
          f'{meta}. Delete it (or point index_path elsewhere) to select again.')
  else:
    if proxy:
      index = select_proxy(records.image_keys, records.labels, num_identities=num_identities,
                           images_per_identity=images_per_identity,
                           valid_per_identity=valid_per_identity, seed=seed)
    else:
      index = select_full(records.image_keys, records.labels,
                          valid_per_identity=valid_per_identity, seed=seed)
    if index_path is not None:
      save_index(index_path, index, meta)
  shape = records.image_shape
  lazy = lambda keys: LazyImages.from_records(records.reader, keys, shape)
  empty = sources.Split(np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32))
  return sources.Splits(
      train=sources.Split(lazy(index.train_keys), index.train_labels),
      valid=sources.Split(lazy(index.valid_keys), index.valid_labels),
      test=empty, num_classes=index.num_classes, mean=FACE_MEAN, std=FACE_STD)


# Verification sets ----------------------------------------------------------------


class VerificationSet(NamedTuple):
  """A verification ``.bin``: pair i is images ``2i`` and ``2i + 1``.

  Attributes:
    name: file name without ``.bin`` (``'lfw'``).
    images: `LazyImages` (2P, H, W, 3).
    issame: bool (P,).
  """

  name: str
  images: LazyImages
  issame: np.ndarray


def load_verification_set(path: str,
                          image_shape: tuple[int, int, int] | None = None) -> VerificationSet:
  """Reads a ``.bin`` (JPEGs kept encoded; decoded per batch).

  Args:
    path: the ``.bin`` file.
    image_shape: ``(H, W, 3)`` every image must decode to; None takes the first
      image's.

  Raises:
    FaceDataError: missing or malformed file; an image of another size is
      reported when it is decoded.
  """
  jpegs, issame = insightface.read_bin(path)
  if not jpegs:
    raise insightface.FaceDataError(f'{path}: the verification file has no pairs.')
  if image_shape is None:
    image_shape = insightface.decode_jpeg(jpegs[0], f'{path}: image 0').shape
  name = os.path.splitext(os.path.basename(path))[0]
  return VerificationSet(name, LazyImages.from_jpegs(jpegs, image_shape, path), issame)
