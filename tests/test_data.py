"""Tests for nar_jax.data: datasets in memory, batching, on-device augmentation."""

import importlib.util
import io
import json
import os
import subprocess
import sys
import threading

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import data
from nar_jax.data import sources

# ---------------------------------------------------------------------------
# Fixtures.


@pytest.fixture(scope='module')
def mnist():
  return data.load_splits('mnist5k')


@pytest.fixture(scope='module')
def synthetic():
  return data.load_splits('synthetic')


def _id_split(n, shape=(2, 2, 1)):
  """A split whose label is the example's index, to track examples."""
  images = (np.arange(n)[:, None, None, None] % 256 *
            np.ones((1, *shape))).astype(np.uint8)
  return data.Split(images, np.arange(n, dtype=np.int32))


def _image_set(split):
  return {x.tobytes() for x in split.images}


# ---------------------------------------------------------------------------
# Loading.


def test_unknown_dataset_name_lists_known_names():
  with pytest.raises(ValueError, match="'cifar10', 'mnist5k', 'synthetic'"):
    data.load_splits('imagenet')


def test_mnist5k_shapes_and_dtypes(mnist):
  chex.assert_shape(mnist.train.images, (3500, 28, 28, 1))
  chex.assert_shape(mnist.valid.images, (500, 28, 28, 1))
  chex.assert_shape(mnist.test.images, (1000, 28, 28, 1))
  for split in (mnist.train, mnist.valid, mnist.test):
    assert split.images.dtype == np.uint8
    assert split.labels.dtype == np.int32
    chex.assert_shape(split.labels, (len(split.images),))
  assert (len(mnist.train), len(mnist.valid), len(mnist.test)) == (3500, 500,
                                                                   1000)
  assert mnist.image_shape == (28, 28, 1)
  assert mnist.num_classes == 10
  assert mnist.train.images.max() == 255


def test_stats_are_measured_on_train(mnist):
  x = mnist.train.images.astype(np.float64) / 255.0
  chex.assert_trees_all_close(mnist.mean, (x.mean(),), rtol=1e-9)
  chex.assert_trees_all_close(mnist.std, (x.std(),), rtol=1e-9)
  assert 0.1 < mnist.mean[0] < 0.2 and 0.25 < mnist.std[0] < 0.35


def test_mnist5k_split_is_stratified(mnist):
  for split, per_class in ((mnist.train, 350), (mnist.valid, 50),
                           (mnist.test, 100)):
    np.testing.assert_array_equal(np.bincount(split.labels, minlength=10),
                                  [per_class] * 10)
  # Each split is shuffled, not sorted by class.
  assert len(np.unique(mnist.valid.labels[:20])) > 1


def test_mnist5k_split_is_disjoint(mnist):
  labels = np.repeat(np.arange(10), 500)
  parts = sources._stratified_split_indices(labels, (100, 50, 350),
                                            np.random.default_rng(0))
  all_idx = np.concatenate(parts)
  assert len(np.unique(all_idx)) == len(all_idx) == 5000
  # Same on the real data, by content (the 5,000 digits are distinct).
  train, valid, test = map(_image_set, (mnist.train, mnist.valid, mnist.test))
  assert len(train) == 3500 and len(valid) == 500 and len(test) == 1000
  assert not train & valid and not train & test and not valid & test


def test_mnist5k_split_is_deterministic(mnist):
  again = data.load_splits('mnist5k', seed=0)
  for a, b in ((mnist.train, again.train), (mnist.test, again.test)):
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
  other = data.load_splits('mnist5k', seed=1)
  assert _image_set(other.test) != _image_set(mnist.test)


def test_mnist5k_valid_size_override():
  splits = data.load_splits('mnist5k', valid_size=1000)
  assert (len(splits.train), len(splits.valid), len(splits.test)) == (3000,
                                                                      1000,
                                                                      1000)
  np.testing.assert_array_equal(np.bincount(splits.valid.labels), [100] * 10)
  # Rounded down to whole digits per class.
  assert len(data.load_splits('mnist5k', valid_size=209).valid) == 200
  with pytest.raises(ValueError, match='valid_size'):
    data.load_splits('mnist5k', valid_size=4000)
  with pytest.raises(ValueError, match='valid_size'):
    data.load_splits('mnist5k', valid_size=-1)


def _calls(fn) -> int:
  """Number of Python and C function calls ``fn()`` makes (a deterministic cost measure)."""
  count = 0

  def profile(frame, event, arg):
    del frame, arg
    nonlocal count
    count += event in ('call', 'c_call')

  sys.setprofile(profile)
  try:
    fn()
  finally:
    sys.setprofile(None)
  return count


def test_prefetch_reads_the_next_item_while_the_current_one_is_in_use():
  """The pipeline's overlap of reading and training: while the consumer still holds item 0,
  the background thread draws item 1 (an event, not a clock; the wait's timeout only
  guards against a hang)."""
  drawn = [threading.Event() for _ in range(3)]

  def source():
    for i, event in enumerate(drawn):
      event.set()
      yield i

  items = data.prefetch(source(), size=1)
  assert next(items) == 0
  assert drawn[1].wait(timeout=30)  # without prefetching nothing draws it now: never set
  assert list(items) == [1, 2]


def test_synthetic_shapes_and_determinism(synthetic):
  chex.assert_shape(synthetic.train.images, (512, 16, 16, 3))
  chex.assert_shape(synthetic.valid.images, (256, 16, 16, 3))
  chex.assert_shape(synthetic.test.images, (256, 16, 16, 3))
  assert synthetic.train.images.dtype == np.uint8
  assert synthetic.train.labels.dtype == np.int32
  assert synthetic.num_classes == 10 and synthetic.image_shape == (16, 16, 3)
  assert len(synthetic.mean) == len(synthetic.std) == 3
  np.testing.assert_array_equal(np.bincount(synthetic.valid.labels),
                                [26] * 6 + [25] * 4)

  # Generated vectorised (cheap enough to regenerate in every test): the Python and C
  # function calls made do not grow with the number of examples.
  assert _calls(lambda: data.load_splits('synthetic', valid_size=64)) == _calls(
      lambda: data.load_splits('synthetic', valid_size=2048))
  again = data.load_splits('synthetic')
  np.testing.assert_array_equal(again.train.images, synthetic.train.images)
  np.testing.assert_array_equal(again.test.labels, synthetic.test.labels)
  assert not np.array_equal(
      data.load_splits('synthetic', seed=1).train.images,
      synthetic.train.images)
  # valid_size changes the valid split only.
  small = data.load_splits('synthetic', valid_size=64)
  assert len(small.valid) == 64
  np.testing.assert_array_equal(small.train.images, synthetic.train.images)
  np.testing.assert_array_equal(small.test.images, synthetic.test.images)


def test_synthetic_is_learnable_and_not_trivial(synthetic):
  # Nearest class mean (a linear classifier) separates the classes...
  train = synthetic.train.images.astype(np.float64)
  means = np.stack([train[synthetic.train.labels == c].mean(0)
                    for c in range(10)])
  test = synthetic.test.images.astype(np.float64)
  dist = ((test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))
  assert (dist.argmin(1) == synthetic.test.labels).mean() > 0.9
  # ... but single images are noisy copies, not the templates.
  same = synthetic.train.images[synthetic.train.labels == 0].astype(float)
  assert np.abs(same[0] - same[1]).mean() > 20


# ---------------------------------------------------------------------------
# Batching.


def test_batches_are_deterministic_and_change_per_epoch():
  split = _id_split(100)
  run = lambda **kw: [y for _, y in data.batches(split, 16, **kw)]
  first = run(seed=3, epoch=0)
  assert len(first) == data.num_batches(split, 16) == 6
  chex.assert_trees_all_equal(first, run(seed=3, epoch=0))
  assert not np.array_equal(np.concatenate(first),
                            np.concatenate(run(seed=3, epoch=1)))
  assert not np.array_equal(np.concatenate(first),
                            np.concatenate(run(seed=4, epoch=0)))


def test_batches_cover_each_example_at_most_once():
  split = _id_split(100)
  for epoch in range(3):
    seen = []
    for images, labels in data.batches(split, 16, seed=0, epoch=epoch):
      chex.assert_shape(images, (16, 2, 2, 1))
      chex.assert_shape(labels, (16,))
      assert images.dtype == np.uint8 and labels.dtype == np.int32
      np.testing.assert_array_equal(images[:, 0, 0, 0], labels % 256)
      seen.append(labels)
    seen = np.concatenate(seen)
    assert len(seen) == 96 and len(np.unique(seen)) == 96

  # Without drop_remainder: every example exactly once, last batch partial.
  got = list(data.batches(split, 16, seed=0, epoch=0, drop_remainder=False))
  assert len(got) == data.num_batches(split, 16, drop_remainder=False) == 7
  assert len(got[-1][1]) == 4
  np.testing.assert_array_equal(np.sort(np.concatenate([y for _, y in got])),
                                np.arange(100))


def test_batches_without_shuffle_keep_order():
  split = _id_split(10)
  got = [y for _, y in data.batches(split, 5, seed=0, epoch=7, shuffle=False)]
  chex.assert_trees_all_equal(got, [np.arange(5), np.arange(5, 10)])


def test_batches_rows_are_each_process_share_of_the_same_batches():
  split = _id_split(100)
  whole = [y for _, y in data.batches(split, 16, seed=2, epoch=1)]
  shares = [[y for _, y in data.batches(split, 16, seed=2, epoch=1, rows=slice(p * 8, p * 8 + 8))]
            for p in range(2)]
  for b, batch in enumerate(whole):
    np.testing.assert_array_equal(np.concatenate([shares[0][b], shares[1][b]]), batch)
  # The last, partial batch of 4 (100 = 6 * 16 + 4) is all process 0's.
  last = [list(data.batches(split, 16, seed=2, epoch=1, drop_remainder=False,
                            rows=slice(p * 8, p * 8 + 8)))[-1] for p in range(2)]
  assert [len(y) for _, y in last] == [4, 0]
  chex.assert_shape(last[1][0], (0, 2, 2, 1))


@pytest.mark.parametrize('batch_size', [0, -3, 11])
def test_batches_reject_bad_batch_size(batch_size):
  split = _id_split(10)
  with pytest.raises(ValueError, match='batch_size'):
    data.batches(split, batch_size, seed=0, epoch=0)  # Eager, not lazy.
  with pytest.raises(ValueError, match='batch_size'):
    data.num_batches(split, batch_size)


def test_batch_larger_than_split_without_drop_remainder():
  split = _id_split(10)
  (images, labels), = data.batches(split, 11, seed=0, epoch=0,
                                   drop_remainder=False)
  chex.assert_shape(images, (10, 2, 2, 1))
  assert sorted(labels) == list(range(10))


def test_merge():
  a, b = _id_split(5), _id_split(3)
  merged = data.merge(a, b)
  assert len(merged) == 8
  np.testing.assert_array_equal(merged.labels, [0, 1, 2, 3, 4, 0, 1, 2])
  np.testing.assert_array_equal(merged.images[5:], b.images)
  with pytest.raises(ValueError, match='image shapes'):
    data.merge(a, _id_split(3, shape=(3, 3, 1)))


def test_split_validates_arrays():
  with pytest.raises(ValueError, match='uint8'):
    data.Split(np.zeros((2, 4, 4, 1), np.float32), np.zeros(2, np.int32))
  with pytest.raises(ValueError, match='int32'):
    data.Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(2, np.int64))
  with pytest.raises(ValueError, match='labels'):
    data.Split(np.zeros((2, 4, 4, 1), np.uint8), np.zeros(3, np.int32))


# ---------------------------------------------------------------------------
# Augmentation.

_augment = jax.jit(data.augment, static_argnames=('crop_padding', 'flip'))


def _shift(image, dy, dx):
  """image shifted by (dy, dx), zeros shifted in. (H, W, C) numpy."""
  h, w, _ = image.shape
  out = np.zeros_like(image)
  out[max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = (
      image[max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)])
  return out


def _random_images(shape=(16, 8, 8, 3), seed=0):
  """float32 images in [0.5, 1), so zeros shifted in by a crop stand out."""
  rng = np.random.default_rng(seed)
  return rng.uniform(0.5, 1.0, shape).astype(np.float32)


def test_augment_keeps_shape_and_dtype():
  x = _random_images()
  y = _augment(jax.random.key(1), x, crop_padding=4, flip=True)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, jnp.float32)
  assert not np.allclose(y, x)
  chex.assert_trees_all_close(
      y, _augment(jax.random.key(1), x, crop_padding=4, flip=True))


def test_augment_identity():
  x = _random_images()
  y = _augment(jax.random.key(1), x, crop_padding=0, flip=False)
  chex.assert_trees_all_equal(y, x)


def test_augment_flip_only():
  x = _random_images((64, 8, 8, 3))
  y = np.asarray(_augment(jax.random.key(2), x, crop_padding=0, flip=True))
  flipped = np.array([
      np.array_equal(yi, xi[:, ::-1]) and not np.array_equal(yi, xi)
      for xi, yi in zip(x, y)])
  kept = np.array([np.array_equal(yi, xi) for xi, yi in zip(x, y)])
  assert np.all(flipped | kept)
  assert 10 < flipped.sum() < 54  # Per example, about half.


def test_augment_crop_moves_a_planted_pixel_by_at_most_padding():
  pad, n = 3, 64
  x = np.zeros((n, 16, 16, 1), np.float32)
  x[:, 8, 8, 0] = 1.0
  y = np.asarray(_augment(jax.random.key(3), x, crop_padding=pad, flip=False))
  chex.assert_shape(y, x.shape)
  moves = set()
  for yi in y:
    (r,), (c,), _ = np.nonzero(yi)  # Exactly one bright pixel survives.
    assert abs(r - 8) <= pad and abs(c - 8) <= pad
    moves.add((r - 8, c - 8))
  assert len(moves) > 10  # Offsets differ per example.


def test_augment_crop_is_a_shifted_copy():
  pad = 2
  x = _random_images((8, 8, 8, 3))
  y = np.asarray(_augment(jax.random.key(4), x, crop_padding=pad, flip=False))
  offsets = range(-pad, pad + 1)
  for xi, yi in zip(x, y):
    assert any(np.array_equal(yi, _shift(xi, dy, dx))
               for dy in offsets for dx in offsets)


def test_normalize_constant_image():
  x = jnp.full((2, 4, 4, 3), 51, jnp.uint8)
  mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.1)
  y = jax.jit(data.normalize)(x, mean, std)
  chex.assert_shape(y, x.shape)
  chex.assert_type(y, jnp.float32)
  expected = (0.2 - np.array(mean)) / np.array(std)
  chex.assert_trees_all_close(y, jnp.broadcast_to(expected, x.shape),
                              atol=1e-6)
  with pytest.raises(ValueError, match='shape'):
    data.normalize(x, (0.5,), (0.5,))


def test_normalize_train_split_is_standardized(synthetic):
  y = data.normalize(synthetic.train.images, synthetic.mean, synthetic.std)
  chex.assert_trees_all_close(y.mean(axis=(0, 1, 2)), jnp.zeros(3), atol=1e-4)
  chex.assert_trees_all_close(y.std(axis=(0, 1, 2)), jnp.ones(3), atol=1e-4)


# ---------------------------------------------------------------------------
# CIFAR-10 through TFDS (never downloads).


@pytest.mark.parametrize('subdir', ['', 'does/not/exist'])
def test_cifar10_not_prepared(tmp_path, subdir):
  data_dir = str(tmp_path / subdir) if subdir else str(tmp_path)
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_splits('cifar10', data_dir=data_dir)
  message = str(info.value)
  assert message.startswith("Dataset 'cifar10' is not prepared")
  assert data_dir in message and 'README' in message
  assert "file_format='array_record'" in message
  assert f'--config.dataset.data_dir={data_dir}' in message
  assert info.value.__suppress_context__  # No TFDS traceback shown.
  assert not os.path.exists(os.path.join(data_dir, 'cifar10'))


def test_cifar10_read_path_with_tfds_mock(tmp_path):
  tfds = pytest.importorskip('tensorflow_datasets')
  with tfds.testing.mock_data(num_examples=30):
    splits = data.load_splits('cifar10', data_dir=str(tmp_path), valid_size=10)
  assert (len(splits.train), len(splits.valid), len(splits.test)) == (20, 10,
                                                                      30)
  chex.assert_shape(splits.train.images, (20, 32, 32, 3))
  assert splits.train.images.dtype == np.uint8
  assert splits.test.labels.dtype == np.int32
  assert splits.num_classes == 10 and splits.image_shape == (32, 32, 3)
  assert np.all((splits.test.labels >= 0) & (splits.test.labels < 10))
  # ENAS split: valid is the tail of the training records, not a shuffle.
  chex.assert_trees_all_equal(splits.valid.images, splits.test.images[20:])


def _fake_cifar10_builder(num_train, num_test):
  """A TFDS builder of `cifar10` with random images, and {split: {image bytes: label}}.

  Uses the real CIFAR-10 builder's features, so reading what it prepares exercises the
  same path (ArrayRecordDataSource, PNG decoding) as the real dataset. Needs
  neither TensorFlow nor network access.
  """
  pytest.importorskip('tensorflow_datasets')
  pil = pytest.importorskip('PIL.Image')
  from tensorflow_datasets.image_classification import cifar  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  made = {
      split: [(rng.integers(0, 256, (32, 32, 3), np.uint8), int(i % 10))
              for i in range(n)]
      for split, n in (('train', num_train), ('test', num_test))}

  def png(image):
    f = io.BytesIO()
    pil.fromarray(image).save(f, format='PNG')
    f.seek(0)
    return f  # A file object: encoding a numpy image would need TensorFlow.

  class FakeCifar10(cifar.Cifar10, skip_registration=True):
    name = 'cifar10'  # Written where tfds.data_source('cifar10') looks.

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate(examples)
              for split, examples in made.items()}

    def _generate(self, examples):
      for i, (image, label) in enumerate(examples):
        yield i, {'id': str(i), 'image': png(image), 'label': label}

  return FakeCifar10, {split: {im.tobytes(): y for im, y in examples}
                       for split, examples in made.items()}


def _prepare_fake_cifar10(data_dir, num_train, num_test):
  """Writes a real array_record copy of `cifar10` with random images (see
  `_fake_cifar10_builder`); returns {split: {image bytes: label}}."""
  builder, made = _fake_cifar10_builder(num_train, num_test)
  builder(data_dir=data_dir, file_format='array_record').download_and_prepare()
  return made


def test_cifar10_read_path_with_prepared_array_record(tmp_path):
  data_dir = str(tmp_path)
  made = _prepare_fake_cifar10(data_dir, num_train=40, num_test=12)
  splits = data.load_splits('cifar10', data_dir=data_dir, valid_size=8)
  assert (len(splits.train), len(splits.valid), len(splits.test)) == (32, 8,
                                                                      12)
  chex.assert_shape(splits.valid.images, (8, 32, 32, 3))
  train = data.merge(splits.train, splits.valid)
  got = {im.tobytes(): int(y) for im, y in zip(train.images, train.labels)}
  assert got == made['train']  # Pixels and labels round-trip exactly.
  got = {im.tobytes(): int(y) for im, y in zip(splits.test.images,
                                              splits.test.labels)}
  assert got == made['test']
  assert 'tensorflow' not in sys.modules  # Reading needs no TensorFlow.
  x = train.images.astype(np.float64) / 255
  chex.assert_trees_all_close(splits.mean, tuple(x[:32].mean((0, 1, 2))))

  # A copy prepared in the default (tfrecord) format is named as such.
  version_dir = os.path.join(data_dir, 'cifar10', '3.0.2')
  info_path = os.path.join(version_dir, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  with open(info_path, 'w') as f:
    json.dump({**info, 'fileFormat': 'tfrecord'}, f)
  with pytest.raises(data.DatasetNotPreparedError, match='tfrecord'):
    data.load_splits('cifar10', data_dir=data_dir)

  # A copy with a missing shard too.
  with open(info_path, 'w') as f:
    json.dump(info, f)
  for name in os.listdir(version_dir):
    if name.startswith('cifar10-test.array_record'):
      os.remove(os.path.join(version_dir, name))
  with pytest.raises(data.DatasetNotPreparedError, match='test array_record'):
    data.load_splits('cifar10', data_dir=data_dir)


@pytest.fixture(scope='module')
def prepared_cifar10(tmp_path_factory):
  """A prepared fake `cifar10` (20 train, 6 test) in ``<root>/tfds``; returns root."""
  root = tmp_path_factory.mktemp('home')
  _prepare_fake_cifar10(str(root / 'tfds'), num_train=20, num_test=6)
  return root


def test_cifar10_data_dir_may_start_with_home_or_be_relative(prepared_cifar10, monkeypatch):
  monkeypatch.setenv('HOME', str(prepared_cifar10))
  splits = data.load_splits('cifar10', data_dir='~/tfds', valid_size=5)
  assert (len(splits.train), len(splits.valid), len(splits.test)) == (15, 5, 6)
  monkeypatch.chdir(prepared_cifar10)
  assert len(data.load_splits('cifar10', data_dir='tfds', valid_size=5).test) == 6
  monkeypatch.chdir(prepared_cifar10 / 'tfds')
  assert len(data.load_splits('cifar10', data_dir='.', valid_size=5).test) == 6


def test_cifar10_unprepared_home_path_is_expanded_in_the_message(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_splits('cifar10', data_dir='~/nothing')
  message = str(info.value)
  assert f"data_dir='{tmp_path}/nothing'" in message and '~' not in message
  assert not os.path.exists(tmp_path / 'nothing' / 'cifar10')  # Nothing written there.


@pytest.mark.parametrize('deeper', ['cifar10', 'cifar10/3.0.2'])
def test_cifar10_data_dir_one_level_too_deep_names_the_parent(prepared_cifar10, deeper):
  root = str(prepared_cifar10 / 'tfds')
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_splits('cifar10', data_dir=os.path.join(root, deeper))
  message = str(info.value)
  assert f'did you mean {root}?' in message
  assert f'--config.dataset.data_dir={root}' in message
  assert 'pip install' not in message  # It is prepared: no new preparation asked for.


def test_cifar10_not_prepared_message_gives_commands_that_prepare_it(tmp_path):
  with pytest.raises(data.DatasetNotPreparedError) as info:
    data.load_splits('cifar10', data_dir=str(tmp_path))
  message = str(info.value)
  # tensorflow-datasets 4.9 imports importlib_resources while preparing (not declared).
  assert 'pip install tensorflow tensorflow-datasets importlib_resources' in message
  assert f'python -m nar_jax.prepare cifar10 --data_dir={tmp_path}' in message


def test_prepare_writes_a_copy_that_the_runs_read(tmp_path, monkeypatch):
  from nar_jax import prepare  # pylint: disable=g-import-not-at-top
  builder, made = _fake_cifar10_builder(num_train=12, num_test=4)
  monkeypatch.setenv('HOME', str(tmp_path))
  splits = prepare.prepare('cifar10', '~/prepared', builder_cls=builder)
  assert os.path.isdir(tmp_path / 'prepared' / 'cifar10')
  assert (len(splits.train), len(splits.valid), len(splits.test)) == (12, 0, 4)
  got = {im.tobytes(): int(y) for im, y in zip(splits.test.images, splits.test.labels)}
  assert got == made['test']


def test_prepare_names_missing_packages_and_unknown_datasets(tmp_path):
  from nar_jax import prepare  # pylint: disable=g-import-not-at-top
  no_tensorflow = lambda module: None if module == 'tensorflow' else object()
  assert prepare.missing_modules(no_tensorflow) == ['tensorflow']
  with pytest.raises(prepare.PrepareError,
                     match='needs tensorflow, which is not installed here: run\n  pip install '
                     'tensorflow tensorflow-datasets importlib_resources'):
    prepare.prepare('cifar10', str(tmp_path), find_spec=no_tensorflow)
  assert not os.listdir(tmp_path)
  with pytest.raises(prepare.PrepareError, match="unknown dataset 'mnist'"):
    prepare.prepare('mnist', str(tmp_path))


def test_prepare_command_line_without_tensorflow_says_what_to_install(tmp_path):
  if importlib.util.find_spec('tensorflow') is not None:
    pytest.skip('TensorFlow is installed here: the command would download CIFAR-10')
  done = subprocess.run([sys.executable, '-m', 'nar_jax.prepare', 'cifar10',
                         f'--data_dir={tmp_path}'], capture_output=True, text=True, timeout=120,
                        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert done.returncode == 2, done.stderr
  assert 'pip install tensorflow tensorflow-datasets importlib_resources' in done.stderr
