"""Tests for the building blocks of the ImageNet transfer (paper Table 6): the ImageNet
ResNet-18 stem and its counts, and the imagenet2012 input pipeline (nar_jax.data.imagenet).

Model variables come from ``jax.eval_shape(init)`` (nothing is computed); the data tests
read a tiny fake imagenet2012 written by the real TFDS builder in the real array_record
format (`nar_jax.data.fake_imagenet.write_fake_imagenet`).
"""

import io
import json
import os
import shutil
import sys

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from config_testing import load_config
from nar_jax import space
from nar_jax.families import resnet as resnet_family
from nar_jax.data import DatasetNotPreparedError, fake_imagenet, imagenet
from nar_jax.models.nodes import select_branches
from nar_jax.models.resnet import ResNet

IMAGENET_HW = (224, 224)
IMAGENET_CLASSES = 1000


def _num_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _init_shapes(model, image_hw, *args):
  images = jax.ShapeDtypeStruct((1, *image_hw, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, *args, train=False), images)


def _refined(sp: space.SearchSpace) -> tuple[int, ...]:
  """An architecture with every kind of candidate: sep3x3, sep5x5, max3x3 and avg3x3 at
  nodes of both strides and of changing channel counts."""
  names = list(sp.names(sp.baseline()))
  for node, op in ((0, 'sep3x3'), (2, 'max3x3'), (3, 'avg3x3'), (4, 'sep5x5'), (8, 'avg3x3'),
                   (sp.num_nodes - 1, 'sep3x3')):
    names[node % sp.num_nodes] = op
  return sp.validate(names)


# ---------------------------------------------------------------------------
# ImageNet ResNet-18: 7x7/2 stem, 3x3/2 max pool, the searched op at each node.


@pytest.mark.parametrize('granularity', ['conv', 'block'])
def test_imagenet_resnet18_reference_counts(granularity):
  """torchvision's ResNet-18 at 224x224, 1000 classes: 11,689,512 parameters (conv
  kernels, BN scale and bias, fc weights and bias) and 1,814,073,344 MACs (convs and fc,
  the project's convention: torchvision's "1.81 GFLOPS"; ptflops' 1.82 GMac adds one op
  per element of every BN, ReLU and pool, 8,104,424 more)."""
  sp = space.resnet_space('resnet18', granularity, stem='imagenet')
  counts = resnet_family.count_architecture(sp, sp.baseline(), IMAGENET_HW, 3, IMAGENET_CLASSES)
  assert counts.params == 11_689_512
  assert counts.macs == 1_814_073_344
  assert round(counts.params / 1e6, 2) == 11.69


def test_imagenet_resnet18_macs_by_hand():
  """The baseline's MACs summed layer by layer: stem at 112x112, stages at 56, 28, 14, 7."""
  macs = 7 * 7 * 3 * 64 * 112 * 112
  cin, side = 64, 56
  for stage, c in enumerate((64, 128, 256, 512)):
    if stage:
      side //= 2
      macs += cin * c * side * side  # the 1x1 projection of the first block
    macs += (9 * cin * c + 3 * 9 * c * c) * side * side  # four 3x3 convs
    cin = c
  macs += 512 * IMAGENET_CLASSES
  sp = space.resnet_space('resnet18', 'conv', stem='imagenet')
  assert resnet_family.count_architecture(sp, sp.baseline(), IMAGENET_HW, 3,
                                     IMAGENET_CLASSES).macs == macs


@pytest.mark.parametrize('granularity', ['conv', 'block'])
def test_imagenet_counts_equal_the_initialised_network(granularity):
  """Counted parameters == the initialised fixed network's, for the baseline and a
  refined architecture; the refined one is smaller in both counts."""
  sp = space.resnet_space('resnet18', granularity, stem='imagenet')
  counted = {}
  for name, arch in (('baseline', sp.baseline()), ('refined', _refined(sp))):
    variables = _init_shapes(ResNet(sp, IMAGENET_CLASSES, arch=arch), IMAGENET_HW)
    counted[name] = resnet_family.count_architecture(sp, arch, IMAGENET_HW, 3, IMAGENET_CLASSES)
    assert _num_params(variables['params']) == counted[name].params, sp.names(arch)
  assert counted['refined'].params < counted['baseline'].params
  assert counted['refined'].macs < counted['baseline'].macs


def test_imagenet_stem_runs_the_first_stage_at_56x56():
  sp = space.resnet_space('resnet18', 'conv', stem='imagenet')
  model = ResNet(sp, IMAGENET_CLASSES, arch=sp.baseline())
  variables = _init_shapes(model, IMAGENET_HW)
  images = jax.ShapeDtypeStruct((2, *IMAGENET_HW, 3), jnp.float32)
  logits, state = jax.eval_shape(
      lambda v, x: model.apply(v, x, train=False,
                               capture_intermediates=lambda m, _: m.name == 'node00'),
      variables, images)
  assert logits.shape == (2, IMAGENET_CLASSES)
  assert state['intermediates']['node00']['__call__'][0].shape == (2, 56, 56, 64)
  assert sp.stem_layers.out_hw(IMAGENET_HW) == (56, 56)


def test_stems_share_variable_names_and_the_cifar_stem_is_unchanged():
  """Both stems are ``stem_conv`` + ``stem_bn`` (the max pool has no variables): the
  CIFAR network's variables (and so its checkpoints) are what they were, and the two
  trees differ only in the stem kernel's shape."""
  cifar = space.resnet_space('resnet18', 'conv')
  imagenet = space.resnet_space('resnet18', 'conv', stem='imagenet')
  assert cifar == space.resnet_space('resnet18', 'conv', stem='cifar')
  assert cifar.nodes == imagenet.nodes and cifar.name == imagenet.name
  shapes = {}
  for name, sp in (('cifar', cifar), ('imagenet', imagenet)):
    variables = _init_shapes(ResNet(sp, 10, arch=sp.baseline()), (32, 32))
    shapes[name] = {jax.tree_util.keystr(p): v.shape
                    for p, v in jax.tree_util.tree_leaves_with_path(variables)}
  assert shapes['cifar'].keys() == shapes['imagenet'].keys()
  differ = {k for k in shapes['cifar'] if shapes['cifar'][k] != shapes['imagenet'][k]}
  assert differ == {"['params']['stem_conv']['kernel']"}
  assert shapes['cifar']["['params']['stem_conv']['kernel']"] == (3, 3, 3, 64)
  assert shapes['imagenet']["['params']['stem_conv']['kernel']"] == (7, 7, 3, 64)


def test_imagenet_supernet_restricted_to_an_architecture_is_the_fixed_network():
  """The supernet's variables with the unselected branches dropped have the fixed
  network's tree and shapes (the stem lies outside every node)."""
  sp = space.resnet_space('resnet18', 'conv', width=0.25, stem='imagenet')
  arch = _refined(sp)
  supernet = _init_shapes(ResNet(sp, 10), IMAGENET_HW, jnp.asarray(arch))
  fixed = _init_shapes(ResNet(sp, 10, arch=arch), IMAGENET_HW)
  shape = lambda tree: jax.tree_util.tree_map(lambda v: v.shape, tree)
  assert shape(select_branches(supernet, arch)) == shape(fixed)


def test_unknown_stem_is_rejected():
  with pytest.raises(ValueError, match="stem must be one of cifar, imagenet, got 'tiny'"):
    space.resnet_space('resnet18', stem='tiny')



# ---------------------------------------------------------------------------
# imagenet2012 read without TensorFlow, and the input pipeline.

FAKE_SIZES = {'train': 21, 'validation': 10}
ONE_HOST = grain.sharding.ShardOptions(0, 1)


@pytest.fixture(scope='module')
def fake(tmp_path_factory):
  """A fake imagenet2012 (21 train, 10 validation JPEGs of 40-120 pixels, 4 classes) in
  the real TFDS format; returns (data_dir, {split: [FakeImage]})."""
  data_dir = str(tmp_path_factory.mktemp('tfds'))
  return data_dir, fake_imagenet.write_fake_imagenet(data_dir, FAKE_SIZES)


class Indexed:
  """A source whose labels are the record indices (to follow examples through batches)."""

  def __init__(self, source):
    self.source = source

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {**self.source[i], 'label': i}


def _jpeg(pixels: np.ndarray) -> bytes:
  f = io.BytesIO()
  Image.fromarray(pixels).save(f, format='JPEG', quality=95)
  return f.getvalue()


def _epoch(source, *, train, seed=0, epoch=0, shard=ONE_HOST, batch_size=4, **kwargs):
  """Every batch of one epoch, concatenated: images (N, 224, 224, 3), labels (N,)."""
  got = list(imagenet.batches(source, batch_size, train=train, seed=seed, epoch=epoch,
                              shard=shard, **kwargs))
  return np.concatenate([b[0] for b in got]), np.concatenate([b[1] for b in got])


def test_fake_imagenet_round_trips_through_the_reader(fake):
  data_dir, made = fake
  version_dir = os.path.join(data_dir, 'imagenet2012', '5.1.0')
  for name in ('dataset_info.json', 'features.json',
               'imagenet2012-train.array_record-00000-of-00001'):
    assert os.path.isfile(os.path.join(version_dir, name)), name
  for split, images in made.items():
    source = imagenet.open_split(split, data_dir)
    assert len(source) == len(images) == FAKE_SIZES[split]
    assert imagenet.num_classes(source) == 1000
    want = {m.file_name: m for m in images}
    for i in range(len(source)):
      record = source[i]
      m = want.pop(record['file_name'].decode())
      assert record['label'] == m.label
      assert record['image'] == m.jpeg  # Stored byte for byte.
      assert np.asarray(imagenet.decode(record['image'])).shape == (m.height, m.width, 3)
    assert not want
  assert 'tensorflow' not in sys.modules  # Reading needs no TensorFlow.


def test_batches_have_the_shapes_the_training_consumes(fake):
  source = imagenet.open_split('train', fake[0])
  got = list(imagenet.batches(source, 4, train=True, seed=0, epoch=0, shard=ONE_HOST))
  assert len(got) == imagenet.num_batches(len(source), 4, ONE_HOST, True) == 5
  for images, labels in got:
    assert images.shape == (4, 224, 224, 3) and images.dtype == np.uint8
    assert labels.shape == (4,) and labels.dtype == np.int32
  # Without a shard: this process's (the only one here), equally many examples per host.
  default = next(imagenet.batches(source, 4, train=True, seed=0, epoch=0))
  np.testing.assert_array_equal(default[0], got[0][0])
  eval_batches = list(imagenet.batches(source, 4, train=False, seed=0, epoch=0, shard=ONE_HOST))
  assert [len(b[1]) for b in eval_batches] == [4, 4, 4, 4, 4, 1]  # No drop in evaluation.


def test_eval_crop_is_the_center_224_of_the_image_resized_to_256():
  rng = np.random.default_rng(0)
  jpeg = _jpeg(rng.integers(0, 256, (256, 256, 3), np.uint8))
  square = np.asarray(imagenet.decode(jpeg))
  np.testing.assert_array_equal(imagenet.eval_image(jpeg), square[16:240, 16:240])
  # A smooth non-square image: one resampling == resizing to 256 then cropping.
  y, x = np.mgrid[:300, :400]
  pixels = np.stack([x * 255 // 400, y * 255 // 300, (x + y) * 255 // 700], -1).astype(np.uint8)
  jpeg = _jpeg(pixels)
  two_step = np.asarray(imagenet.decode(jpeg).resize((341, 256), Image.BILINEAR))
  two_step = two_step[16:240, 58:282]
  got = imagenet.eval_image(jpeg)
  assert np.abs(got.astype(int) - two_step).max() <= 2


def test_train_crop_of_the_whole_image_is_the_image_or_its_mirror():
  jpeg = _jpeg(np.random.default_rng(0).integers(0, 256, (224, 224, 3), np.uint8))
  source = np.asarray(imagenet.decode(jpeg))
  flips = set()
  for seed in range(8):
    got = imagenet.train_image(jpeg, np.random.default_rng(seed), scale=(1, 1),
                               ratio=(1, 1))
    flipped = np.array_equal(got, source[:, ::-1])
    assert flipped or np.array_equal(got, source)
    flips.add(flipped)
  assert flips == {True, False}


@pytest.mark.parametrize('height,width', [(375, 500), (60, 45), (100, 100), (20, 900)])
def test_random_resized_box_lies_inside_with_the_allowed_area_and_ratio(height, width):
  rng = np.random.default_rng(height * width)
  for _ in range(200):
    top, left, h, w = imagenet.random_resized_box(height, width, rng)
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    if (h, w) != (height, min(width, round(height * 4 / 3))):  # not the fallback
      assert 0.08 * 0.9 <= h * w / (height * width) <= 1.0
      assert 3 / 4 * 0.9 <= w / h <= 4 / 3 * 1.1
  # A 20x900 strip fits no 3/4-4/3 crop of >= 8% of its area: the central 20x27 crop.
  assert imagenet.random_resized_box(20, 900, rng) == (0, 436, 20, 27)


def test_eval_batches_are_deterministic_central_crops_in_order(fake):
  source = imagenet.open_split('validation', fake[0])
  images, labels = _epoch(source, train=False)
  np.testing.assert_array_equal(labels, [source[i]['label'] for i in range(len(source))])
  for i in (0, len(source) - 1):
    np.testing.assert_array_equal(images[i], imagenet.eval_image(source[i]['image']))
  again, _ = _epoch(source, train=False, seed=5, epoch=3,
                    options=imagenet.InputOptions(threads=1))
  np.testing.assert_array_equal(images, again)


def test_train_epochs_are_a_function_of_seed_and_epoch(fake):
  source = Indexed(imagenet.open_split('train', fake[0]))
  first = _epoch(source, train=True, seed=0, epoch=0)
  same = _epoch(source, train=True, seed=0, epoch=0, options=imagenet.InputOptions(threads=1))
  np.testing.assert_array_equal(first[0], same[0])
  np.testing.assert_array_equal(first[1], same[1])
  for other in (_epoch(source, train=True, seed=0, epoch=1),
                _epoch(source, train=True, seed=1, epoch=0)):
    assert not np.array_equal(first[1], other[1])  # Another order ...
    for k in first[1][:3]:  # ... and other crops of the same records.
      assert not np.array_equal(first[0][first[1] == k], other[0][other[1] == k])
  # One epoch: 5 batches of 4, each record at most once (one of the 21 is left out).
  assert len(set(first[1])) == len(first[1]) == 20 and set(first[1]) <= set(range(21))


def test_worker_processes_give_the_same_batches(fake):
  """Decoding in a grain worker process changes nothing (it costs a process start)."""
  source = imagenet.open_split('validation', fake[0])
  here = _epoch(source, train=True, batch_size=2)
  workers = _epoch(source, train=True, batch_size=2,
                   options=imagenet.InputOptions(threads=2, processes=1, buffer=8))
  np.testing.assert_array_equal(here[0], workers[0])
  np.testing.assert_array_equal(here[1], workers[1])


def test_two_hosts_partition_each_epoch(fake):
  source = Indexed(imagenet.open_split('train', fake[0]))
  n = len(source)  # 21: odd
  for train in (True, False):
    shards = [grain.sharding.ShardOptions(i, 2, drop_remainder=train) for i in range(2)]
    parts = [_epoch(source, train=train, shard=s, batch_size=2, drop_remainder=False)
             for s in shards]
    ids = [list(p[1]) for p in parts]
    assert not set(ids[0]) & set(ids[1])
    if train:  # Equally many examples on each host: one of the 21 left out.
      assert len(ids[0]) == len(ids[1]) == n // 2
    else:
      assert sorted(ids[0] + ids[1]) == list(range(n))
    assert [len(i) for i in ids] == [imagenet.shard_size(n, s) for s in shards]
  # A record's crop does not depend on the number of hosts.
  alone = _epoch(source, train=True, batch_size=3)
  host = _epoch(source, train=True, shard=grain.sharding.ShardOptions(1, 2), batch_size=2,
                drop_remainder=False)
  k = host[1][0]
  np.testing.assert_array_equal(host[0][0], alone[0][alone[1] == k][0])


def test_missing_imagenet_names_the_manual_download(tmp_path):
  with pytest.raises(DatasetNotPreparedError) as info:
    imagenet.open_split('train', str(tmp_path))
  message = str(info.value)
  assert message.startswith(f"Dataset 'imagenet2012' is not prepared in data_dir='{tmp_path}'")
  for step in ('ILSVRC2012_img_train.tar', 'ILSVRC2012_img_val.tar',
               f'{tmp_path}/downloads/manual', 'tfds build imagenet2012',
               '--file_format=array_record', 'README section "Preparing ImageNet"'):
    assert step in message
  assert not os.listdir(tmp_path)  # Nothing written.


def test_incomplete_or_tfrecord_copies_are_named(fake, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  shutil.copytree(fake[0], data_dir)
  version_dir = os.path.join(data_dir, 'imagenet2012', '5.1.0')
  with pytest.raises(DatasetNotPreparedError, match='did you mean'):
    imagenet.open_split('train', os.path.join(data_dir, 'imagenet2012'))
  for name in os.listdir(version_dir):
    if name.startswith('imagenet2012-validation.array_record'):
      os.remove(os.path.join(version_dir, name))
  assert len(imagenet.open_split('train', data_dir)) == FAKE_SIZES['train']
  with pytest.raises(DatasetNotPreparedError, match='validation array_record files are missing'):
    imagenet.open_split('validation', data_dir)
  info_path = os.path.join(version_dir, 'dataset_info.json')
  with open(info_path) as f:
    info = json.load(f)
  with open(info_path, 'w') as f:
    json.dump({**info, 'fileFormat': 'tfrecord'}, f)
  with pytest.raises(DatasetNotPreparedError, match="file_format='tfrecord'"):
    imagenet.open_split('train', data_dir)


# ---------------------------------------------------------------------------
# The training loops' view: ImageNetSplit, the imagenet task, the Table 6 config.


def test_imagenet_split_is_what_the_loops_read(fake):
  """`nar_jax.data.batches` of an ImageNetSplit is `imagenet.batches` of its source: a
  training epoch (permuted, cropped, flipped; a function of (seed, epoch)) and the
  central crops in order; `num_batches` counts them; merging with the empty valid split
  keeps it."""
  from nar_jax import data  # noqa: PLC0415
  source = imagenet.open_split('train', fake[0])
  split = imagenet.ImageNetSplit(source, size=32, options=imagenet.InputOptions(threads=2))
  assert split.image_shape == (32, 32, 3) and len(split) == FAKE_SIZES['train']
  got = list(data.batches(split, 8, seed=3, epoch=1))
  assert len(got) == data.num_batches(split, 8) == 2  # 21 // 8, the remainder dropped
  want = _epoch(source, train=True, seed=3, epoch=1, batch_size=8, size=32)
  np.testing.assert_array_equal(np.concatenate([b[0] for b in got]), want[0][:16])
  np.testing.assert_array_equal(np.concatenate([b[1] for b in got]), want[1][:16])
  again = list(data.batches(split, 8, seed=3, epoch=1))
  np.testing.assert_array_equal(again[1][0], got[1][0])
  other = list(data.batches(split, 8, seed=3, epoch=2))
  assert not np.array_equal(other[0][0], got[0][0])
  evals = list(data.batches(split, 8, seed=0, epoch=0, shuffle=False, drop_remainder=False))
  assert [len(b[1]) for b in evals] == [8, 8, 5]
  assert data.num_batches(split, 8, drop_remainder=False) == 3
  np.testing.assert_array_equal(np.concatenate([b[0] for b in evals]),
                                _epoch(source, train=False, batch_size=8, size=32)[0])
  empty = data.Split(np.zeros((0, 32, 32, 3), np.uint8), np.zeros((0,), np.int32))
  assert data.merge(split, empty) is split
  with pytest.raises(ValueError, match='streamed split'):
    data.merge(split, split)
  with pytest.raises(ValueError, match='larger than the split'):
    data.num_batches(split, 32)


def test_imagenet_split_of_two_processes_gives_each_its_rows(fake, monkeypatch):
  """Process i of 2 reads rows of global batches from its half of the epoch: a training
  epoch of 21 records in global batches of 8 is 2 batches of 4 rows on each (the hosts'
  rows are disjoint); an evaluation in global batches of 10 is 3 batches on each, process
  1's shard (10 records) ending with an empty batch so both take part in all three, and
  the two processes' rows are every record once."""
  from nar_jax import data  # noqa: PLC0415
  split = imagenet.ImageNetSplit(Indexed(imagenet.open_split('train', fake[0])), size=16,
                                 options=imagenet.InputOptions(threads=2))
  monkeypatch.setattr(imagenet.jax, 'process_count', lambda: 2)
  rows = {}
  for index in (0, 1):
    monkeypatch.setattr(imagenet.jax, 'process_index', lambda index=index: index)
    trained = list(data.batches(split, 8, seed=0, epoch=0))
    assert [len(b[1]) for b in trained] == [4, 4] and data.num_batches(split, 8) == 2
    evals = list(data.batches(split, 10, seed=0, epoch=0, shuffle=False, drop_remainder=False))
    assert data.num_batches(split, 10, drop_remainder=False) == 3
    assert [len(b[1]) for b in evals] == ([5, 5, 1] if index == 0 else [5, 5, 0])
    assert evals[-1][0].shape[1:] == (16, 16, 3)
    rows[index] = (np.concatenate([b[1] for b in trained]), np.concatenate([b[1] for b in evals]))
  assert not set(rows[0][0]) & set(rows[1][0])
  assert sorted(np.concatenate([rows[0][1], rows[1][1]])) == list(range(FAKE_SIZES['train']))
  with pytest.raises(ValueError, match='multiple of the 2 processes'):
    data.num_batches(split, 7)


def test_evaluate_split_of_the_validation_crops_gives_top1_and_top5(fake):
  """`loop.evaluate_split` over the streamed validation split (batches of 4, the last one
  padded) with a fixed linear model: top-1, top-5 and loss are numpy's over the central
  crops of `imagenet.batches`, in the source's order."""
  import flax.linen as nn  # noqa: PLC0415
  import optax  # noqa: PLC0415
  from nar_jax import train  # noqa: PLC0415
  from nar_jax.data import normalize  # noqa: PLC0415
  from nar_jax.phases import loop  # noqa: PLC0415

  class Linear(nn.Module):

    @nn.compact
    def __call__(self, x, op_indices=None, train=False):
      del op_indices, train
      return nn.Dense(12)(x.reshape(x.shape[0], -1))

  model = Linear()
  variables = model.init(jax.random.key(1), jnp.zeros((1, 16, 16, 3)))
  split = imagenet.ImageNetSplit(imagenet.open_split('validation', fake[0]), size=16,
                                 options=imagenet.InputOptions(threads=2))
  images, labels = _epoch(split.source, train=False, size=16)
  mean, std = imagenet.IMAGENET_MEAN, imagenet.IMAGENET_STD
  logits = np.asarray(model.apply(variables, normalize(images, mean, std)))
  labels = (labels * 3 + np.arange(len(labels))) % 12  # the fake labels are 0-3: spread
  rank = (logits > logits[np.arange(len(labels)), labels][:, None]).sum(-1)
  assert 0 < np.sum(rank == 0) < np.sum(rank < 5) < len(labels)  # not vacuous
  relabelled = imagenet.ImageNetSplit(Relabelled(split.source, labels), size=16,
                                      options=split.options)
  mesh = train.make_mesh(1)
  got = loop.evaluate_split(train.make_eval_step(model, mesh, mean=mean, std=std), variables,
                            relabelled, 4, mesh)
  assert got['accuracy'] == pytest.approx(np.mean(rank == 0))
  assert got['top5'] == pytest.approx(np.mean(rank < 5))
  loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  assert got['loss'] == pytest.approx(float(np.mean(loss)), rel=1e-5)


class Relabelled:
  """A source with the given labels (record ``i`` gets ``labels[i]``)."""

  def __init__(self, source, labels):
    self.source, self.labels = source, labels

  def __len__(self):
    return len(self.source)

  def __getitem__(self, i):
    return {**self.source[i], 'label': int(self.labels[i])}


def test_imagenet_config_without_data_names_the_preparation(tmp_path):
  """The Table 6 config on a data_dir without imagenet2012: the task's data raises the
  manual-download message (nothing downloaded)."""
  from nar_jax import config as config_lib, tasks  # noqa: PLC0415
  c = load_config('imagenet_resnet18', 'baseline')
  c.dataset.data_dir = str(tmp_path)
  config_lib.validate(c)
  task = tasks.task_for(c)
  assert task.name == 'imagenet'
  with pytest.raises(DatasetNotPreparedError, match='README section "Preparing ImageNet"'):
    task.search_splits(c, str(tmp_path / 'run'))
  assert not os.listdir(tmp_path)


def test_imagenet_config_checks():
  from nar_jax import config as config_lib  # noqa: PLC0415
  c = load_config('imagenet_resnet18')
  with pytest.raises(ValueError, match='config.arch must name the architecture'):
    config_lib.validate(c)
  c.arch = 'baseline'
  config_lib.validate(c)
  o = c.retrain.optimizer
  assert (c.retrain.epochs, c.retrain.batch_size, o.lr_max, o.momentum, o.nesterov,
          o.weight_decay, o.schedule, o.decay_epochs, o.warmup_epochs) == (
              90, 256, 0.1, 0.9, False, 1e-4, 'step', '30,60,80', 5.0)
  assert (c.model.stem, c.dataset.image_size) == ('imagenet', 224)
  for field, value, match in (('crop_padding', 4, 'cropped and flipped on the host'),
                              ('flip', True, 'cropped and flipped on the host')):
    bad = load_config('imagenet_resnet18', 'baseline')
    bad.dataset[field] = value
    with pytest.raises(ValueError, match=match):
      config_lib.validate(bad)
  bad = load_config('imagenet_resnet18', 'baseline')
  bad.scan_epoch = True
  with pytest.raises(ValueError, match='scan_epoch'):
    config_lib.validate(bad)


SMOKE_SPACE = space.resnet_space('resnet18', 'conv', width=0.125, stem='imagenet')


def _smoke_refined() -> tuple[int, ...]:
  """The smoke tests' refined architecture: sep3x3 at the first node, avg3x3 at the ninth."""
  names = list(SMOKE_SPACE.names(SMOKE_SPACE.baseline()))
  names[0], names[8] = 'sep3x3', 'avg3x3'
  return SMOKE_SPACE.validate(names)


def _smoke_config(data_dir: str, tmp_path):
  """configs/imagenet_resnet18.py:smoke on ``data_dir`` retraining `_smoke_refined` alone,
  given as an arch.json (as a CIFAR-10 run writes it) in ``tmp_path``."""
  c = load_config('imagenet_resnet18', 'smoke')
  c.dataset.data_dir = data_dir
  arch_file = tmp_path / 'arch.json'
  arch_file.write_text(json.dumps({'arch': list(SMOKE_SPACE.names(_smoke_refined()))}))
  c.arch = str(arch_file)
  c.retrain.baseline = False
  return c


def test_imagenet_config_runs_end_to_end_on_fake_imagenet(fake, tmp_path, compile_cache):
  """configs/imagenet_resnet18.py:smoke on the fake imagenet2012: a refined arch.json
  retrained (32x32 crops, width 0.125, one epoch of two steps), the report with top-1 and
  top-5 on the validation images next to both networks' parameters and MACs; the counts
  are the initialised networks' and count_architecture's. (The baseline is retrained by
  the same code; it is left out here to halve the compile time. That evaluation's top-1
  and top-5 are right: test_evaluate_split_of_the_validation_crops_gives_top1_and_top5.)"""
  del compile_cache  # Shared with the interruption test's runs of the same network.
  from nar_jax import pipeline  # noqa: PLC0415
  c = _smoke_config(fake[0], tmp_path)
  sp, refined = SMOKE_SPACE, _smoke_refined()
  workdir = str(tmp_path / 'run')
  result = pipeline.run(c, workdir)

  assert result['dataset'] == 'imagenet2012'
  for name, arch in (('baseline', sp.baseline()), ('refined', refined)):
    entry = result[name]
    assert entry['arch'] == list(sp.names(arch))
    counts = resnet_family.count_architecture(sp, arch, (32, 32), 3, IMAGENET_CLASSES)
    variables = _init_shapes(ResNet(sp, IMAGENET_CLASSES, arch=arch), (32, 32))
    assert entry['params'] == counts.params == _num_params(variables['params'])
    assert entry['macs'] == counts.macs
  entry = result['refined']
  assert 0.0 <= entry['test_acc'] <= entry['test_top5'] <= 1.0
  assert ctx_results(workdir, 'refined')['test_top5'] == entry['test_top5']
  assert result['baseline']['test_acc'] is None  # not retrained
  assert entry['params'] < result['baseline']['params']
  with open(os.path.join(workdir, 'report.md')) as f:
    report = f.read()
  assert f'| test top-5 (retrained) | - | {entry["test_top5"]:.4f} | |' in report
  assert f'| test acc (retrained) | - | {entry["test_acc"]:.4f} |' in report
  assert f'| parameters | {result["baseline"]["params"]:,} | {result["refined"]["params"]:,} |' \
      in report


def ctx_results(workdir: str, name: str) -> dict:
  """``results/retrain_<name>.json`` of a finished run."""
  with open(os.path.join(workdir, 'results', f'retrain_{name}.json')) as f:
    return json.load(f)


def test_imagenet_retraining_interrupted_after_an_epoch_resumes_to_the_same_result(
    fake, tmp_path, monkeypatch, compile_cache):
  """The smoke config for 2 epochs, interrupted at the start of its second: the re-run
  resumes from the first epoch's checkpoint (the streamed batches are a function of
  (seed, epoch)) and ends with the uninterrupted run's accuracies and loss, exactly."""
  del compile_cache  # The later runs load the first one's (or the end-to-end test's).
  from nar_jax import pipeline  # noqa: PLC0415
  from nar_jax.phases import loop  # noqa: PLC0415
  c = _smoke_config(fake[0], tmp_path)
  c.retrain.epochs = 2
  straight = str(tmp_path / 'straight')
  pipeline.run(c, straight)

  resumed = str(tmp_path / 'resumed')
  train_epoch = loop.train_epoch
  epochs_trained = []

  def interrupted(*args, **kwargs):
    epoch = args[4]
    if epoch == 1 and not epochs_trained.count(1):
      epochs_trained.append(1)
      raise RuntimeError('interrupted')
    epochs_trained.append(epoch)
    return train_epoch(*args, **kwargs)

  monkeypatch.setattr(loop, 'train_epoch', interrupted)
  with pytest.raises(RuntimeError, match='interrupted'):
    pipeline.run(c, resumed)
  pipeline.run(c, resumed)
  assert epochs_trained == [0, 1, 1]  # epoch 0 once, epoch 1 after the interruption
  want, got = ctx_results(straight, 'refined'), ctx_results(resumed, 'refined')
  for key in ('test_acc', 'test_top5', 'test_loss', 'final_train_acc', 'arch'):
    assert got[key] == want[key], key
