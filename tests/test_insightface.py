"""Tests for insightface's face-data formats, lazy face splits and the proxy task."""

import os
import pathlib
import pickle
import shutil
import struct
import threading

import chex
import numpy as np
import pytest

from nar_jax import data
from nar_jax.data import faces
from nar_jax.data import insightface
from nar_jax.data import synthetic_faces

MAGIC = struct.pack('<I', 0xced7230a)
SIZE = 32


def _raw_chunks(rec_path):
  """(offset, flag, length) of every chunk, parsed straight from the bytes."""
  with open(rec_path, 'rb') as f:
    blob = f.read()
  out, pos = [], 0
  while pos < len(blob):
    magic, lrec = struct.unpack_from('<II', blob, pos)
    assert magic == 0xced7230a
    flag, length = lrec >> 29, lrec & ((1 << 29) - 1)
    out.append((pos, flag, length))
    pos += 8 + length + (-length % 4)
  assert pos == len(blob)
  return out


@pytest.fixture(scope='module')
def synth(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp('faces'))
  files = synthetic_faces.write_synthetic_faces(
      directory, num_identities=24, images_per_identity=(6, 14), image_size=SIZE,
      num_pairs=40, verification_identities=6, magic_every=3, seed=3)
  return files


@pytest.fixture(scope='module')
def records(synth):
  return insightface.open_face_records(synth.directory)


def _copy(synth, tmp_path):
  for name in ('train.rec', 'train.idx', 'property'):
    shutil.copy(os.path.join(synth.directory, name), tmp_path / name)
  return str(tmp_path)


# ---------------------------------------------------------------------------
# Record payloads and RecordIO framing.


def test_pack_record_matches_mxnet_layout():
  assert insightface.pack_record(3.0, b'JPEG', id=7) == struct.pack('<IfQQ', 0, 3.0, 7, 0) + b'JPEG'
  packed = insightface.pack_record([5, 1.0], b'xy', id=9, id2=2)
  assert packed == struct.pack('<IfQQ', 2, 0.0, 9, 2) + struct.pack('<2f', 5, 1) + b'xy'
  header, body = insightface.unpack_record(packed)
  assert (header.flag, header.label, header.id, header.id2, body) == (2, 0.0, 9, 2, b'xy')
  np.testing.assert_array_equal(header.labels, [5.0, 1.0])
  assert header.class_label == 5.0
  header, body = insightface.unpack_record(insightface.pack_record(4.0, b'z'))
  assert (header.flag, header.class_label, body, header.labels.shape) == (0, 4.0, b'z', (0,))


def test_frame_record_hand_computed_bytes():
  lrec = lambda flag, n: struct.pack('<I', flag << 29 | n)
  chunks, pieces = insightface.frame_record(b'abcd' + MAGIC + b'xy')
  assert pieces == 2
  assert chunks == MAGIC + lrec(1, 4) + b'abcd' + MAGIC + lrec(3, 2) + b'xy\0\0'
  # Unaligned magic is not a cut point (MXNet checks aligned positions only).
  chunks, pieces = insightface.frame_record(b'a' + MAGIC + b'bcd')
  assert pieces == 1 and chunks == MAGIC + lrec(0, 8) + b'a' + MAGIC + b'bcd'
  # Two magics in a row leave an empty middle piece.
  chunks, pieces = insightface.frame_record(MAGIC + MAGIC + b'q')
  assert pieces == 3
  assert chunks == (MAGIC + lrec(1, 0) + MAGIC + lrec(2, 0) + MAGIC + lrec(3, 1) + b'q\0\0\0')


@pytest.mark.parametrize('payload', [
    b'', b'abc', b'abcd', MAGIC, b'abcd' + MAGIC, MAGIC + b'abcdefg',
    b'0123' + MAGIC + MAGIC + b'4567' + MAGIC + b'89', b'xy' + MAGIC + b'zw' + MAGIC,
    bytes(range(256)) * 3,
])
def test_record_round_trip_through_file(tmp_path, payload):
  rec, idx = str(tmp_path / 'a.rec'), str(tmp_path / 'a.idx')
  records = [(0, b'first'), (5, payload), (2, b'last' + MAGIC)]
  split = insightface.write_rec(rec, idx, records)
  chunks = _raw_chunks(rec)
  assert split == sum(f == 1 for _, f, _ in chunks)
  with insightface.RecordReader(rec) as reader:
    np.testing.assert_array_equal(reader.keys, [0, 5, 2])
    for key, expected in records:
      assert reader.read(key) == expected


def test_synthetic_set_has_split_records_that_decode(synth, records):
  flags = [f for _, f, _ in _raw_chunks(os.path.join(synth.directory, 'train.rec'))]
  assert synth.split_records > 0
  assert flags.count(1) == flags.count(3) == synth.split_records
  assert flags.count(2) >= synth.split_records  # Two magics: an empty middle piece each.
  reader = records.reader
  decoded = 0
  for key in records.image_keys:
    header, jpeg = reader.read_record(key)
    if MAGIC in jpeg:
      image = insightface.decode_jpeg(jpeg, reader.where(key), (SIZE, SIZE, 3))
      chex.assert_shape(image, (SIZE, SIZE, 3))
      decoded += 1
  assert decoded >= synth.split_records


def test_identity_index_and_labels(synth, records):
  counts = synth.images_per_identity
  assert records.num_identities == len(counts) == 24
  assert records.num_classes == 24 and records.image_shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(np.bincount(records.labels), counts)
  np.testing.assert_array_equal(records.image_keys, np.arange(1, counts.sum() + 1))
  reader = records.reader
  head, _ = reader.read_record(0)
  n = counts.sum()
  np.testing.assert_array_equal(head.labels, [n + 1, n + 1 + 24])
  starts = 1 + np.concatenate([[0], np.cumsum(counts)])
  for c in range(24):
    identity, _ = reader.read_record(n + 1 + c)
    np.testing.assert_array_equal(identity.labels, [starts[c], starts[c + 1]])
  # Every image header's class (face2rec2: labels [class, 1.0]) is its identity.
  header_labels = [reader.read_record(k)[0].class_label for k in records.image_keys]
  np.testing.assert_array_equal(header_labels, records.labels)


def test_reader_serves_threads(records):
  reader, keys = records.reader, records.image_keys.tolist()
  expected = {k: reader.read(k) for k in keys}
  results, errors = {}, []

  def work(part):
    try:
      for k in part:
        results[(threading.get_ident(), k)] = reader.read(k) == expected[k]
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)

  threads = [threading.Thread(target=work, args=(keys[i::3] * 4,)) for i in range(6)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and all(results.values()) and len(results) > 0


def test_records_without_identity_index(tmp_path):
  jpeg = synthetic_faces.encode_jpeg(np.full((8, 8, 3), 100, np.uint8))
  labels = [5, 2, 5, 9, 2, 5]
  insightface.write_rec(str(tmp_path / 'train.rec'), str(tmp_path / 'train.idx'),
                        [(k, insightface.pack_record(float(c), jpeg, id=k))
                         for k, c in enumerate(labels)])
  insightface.write_property(str(tmp_path), 3, 8, 8)
  recs = insightface.open_face_records(str(tmp_path))
  assert recs.num_identities == 3
  np.testing.assert_array_equal(recs.image_keys, [1, 4, 0, 2, 5, 3])
  np.testing.assert_array_equal(recs.labels, [0, 0, 1, 1, 1, 2])


# ---------------------------------------------------------------------------
# Clear errors on bad files.


def test_bad_magic_names_file_and_offset(synth, tmp_path):
  d = _copy(synth, tmp_path)
  reader = insightface.RecordReader(os.path.join(d, 'train.rec'))
  offset = reader.offset(3)
  reader.close()
  with open(os.path.join(d, 'train.rec'), 'r+b') as f:
    f.seek(offset)
    f.write(b'\0\0\0\0')
  reader = insightface.RecordReader(os.path.join(d, 'train.rec'))
  with pytest.raises(insightface.FaceDataError,
                     match=f'train.rec: bad magic .* at offset {offset} \\(record 3\\)'):
    reader.read(3)
  assert reader.read(4)  # Other records stay readable.


def test_truncated_record_names_file_and_offset(tmp_path):
  rec, idx = str(tmp_path / 't.rec'), str(tmp_path / 't.idx')
  insightface.write_rec(rec, idx, [(0, b'a' * 40), (1, b'b' * 40)])
  os.truncate(rec, os.path.getsize(rec) - 10)
  reader = insightface.RecordReader(rec, idx)
  with pytest.raises(insightface.FaceDataError, match=r't.rec: truncated record payload at '
                     r'offset 56: expected 40 bytes, the file ends after 30'):
    reader.read(1)
  os.truncate(rec, 52)
  with pytest.raises(insightface.FaceDataError, match='truncated chunk header at offset 48'):
    reader.read(1)


def test_split_record_with_wrong_continuation_flag(tmp_path):
  rec, idx = str(tmp_path / 'c.rec'), str(tmp_path / 'c.idx')
  # A first piece followed by a whole record: the record never ends properly.
  with open(rec, 'wb') as f:
    f.write(MAGIC + struct.pack('<I', 1 << 29 | 4) + b'abcd')
    f.write(MAGIC + struct.pack('<I', 0 << 29 | 4) + b'efgh')
  with open(idx, 'w') as f:
    f.write('0\t0\n')
  with pytest.raises(insightface.FaceDataError,
                     match=r'c.rec: chunk at offset 12 .* continuation flag 0'):
    insightface.RecordReader(rec, idx).read(0)


def test_idx_errors_name_file_and_entry(synth, tmp_path):
  d = _copy(synth, tmp_path)
  rec = os.path.join(d, 'train.rec')
  size = os.path.getsize(rec)
  idx = os.path.join(d, 'train.idx')
  with open(idx, 'a') as f:
    f.write(f'99999\t{size + 8}\n')
  with pytest.raises(insightface.FaceDataError,
                     match=f'train.idx: key 99999 has offset {size + 8}, past the end of .*'
                     f'train.rec \\({size} bytes\\)'):
    insightface.RecordReader(rec, idx)
  with open(idx, 'w') as f:
    f.write('0\t0\n1 16\n')
  with pytest.raises(insightface.FaceDataError, match="train.idx: line 2 is '1 16'"):
    insightface.RecordReader(rec, idx)
  with open(idx, 'w') as f:
    f.write('0\t0\n0\t16\n')
  with pytest.raises(insightface.FaceDataError, match='key 0 is listed more than once'):
    insightface.RecordReader(rec, idx)
  with pytest.raises(insightface.FaceDataError, match='nothing.idx: cannot read'):
    insightface.RecordReader(rec, os.path.join(d, 'nothing.idx'))


@pytest.mark.parametrize('text', ['abc', '10,112', '10,112,0', '', '1.5,112,112'])
def test_malformed_property(synth, tmp_path, text):
  d = _copy(synth, tmp_path)
  with open(os.path.join(d, 'property'), 'w') as f:
    f.write(text)
  with pytest.raises(insightface.FaceDataError, match='property: expected "num_classes'):
    insightface.open_face_records(d)


def test_bad_identity_range(tmp_path):
  jpeg = synthetic_faces.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
  insightface.write_rec(str(tmp_path / 'train.rec'), str(tmp_path / 'train.idx'), [
      (0, insightface.pack_record([2, 3])), (1, insightface.pack_record([0, 1], jpeg)),
      (2, insightface.pack_record([1, 5]))])
  insightface.write_property(str(tmp_path), 1, 8, 8)
  with pytest.raises(insightface.FaceDataError,
                     match=r'train.rec: record 2 at offset \d+: identity 0 has image range '
                     r'\[1, 5\)'):
    insightface.open_face_records(str(tmp_path))


def _write_identity_dataset(directory, ranges, num_images, num_classes=None):
  """insightface's layout with the given identity image ranges (possibly inconsistent).

  Image records 1..num_images (identity = the first range holding the key, else 0), record 0
  listing identity records num_images + 1 ..., and ``property`` saying ``num_classes``
  (default: one per range). Every record's header id is its key, as face2rec2 writes.
  """
  jpeg = synthetic_faces.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
  first = num_images + 1
  records = [(0, insightface.pack_record([first, first + len(ranges)], id=0))]
  for key in range(1, num_images + 1):
    c = next((c for c, (a, b) in enumerate(ranges) if a <= key < b), 0)
    records.append((key, insightface.pack_record([c, 1.0], jpeg, id=key)))
  for c, (a, b) in enumerate(ranges):
    records.append((first + c, insightface.pack_record([a, b], id=first + c)))
  insightface.write_rec(os.path.join(directory, 'train.rec'),
                        os.path.join(directory, 'train.idx'), records)
  insightface.write_property(directory, len(ranges) if num_classes is None else num_classes, 8, 8)
  return str(directory)


def test_consistent_identity_ranges_are_read(tmp_path):
  recs = insightface.open_face_records(_write_identity_dataset(tmp_path, [(1, 4), (4, 7)], 6))
  np.testing.assert_array_equal(recs.image_keys, [1, 2, 3, 4, 5, 6])
  np.testing.assert_array_equal(recs.labels, [0, 0, 0, 1, 1, 1])
  assert recs.num_identities == recs.num_classes == 2


def test_overlapping_identity_ranges_name_both_identities(tmp_path):
  d = _write_identity_dataset(tmp_path, [(1, 5), (4, 7)], 6)
  with pytest.raises(insightface.FaceDataError,
                     match=r"train.rec: record 8 at offset \d+: identity 1 has image range "
                     r"\[4, 7\), which overlaps identity 0's \[1, 5\)"):
    insightface.open_face_records(d)


@pytest.mark.parametrize('ranges, message', [
    ([(1, 3), (4, 7)], r"record 8 at offset \d+: image records \[3, 4\) belong to no identity "
                       r"\(after identity 0's \[1, 3\), before identity 1's \[4, 7\)\); they "
                       r"would be silently dropped"),
    ([(2, 4), (4, 7)], r'record 7 at offset \d+: image records \[1, 2\) belong to no identity '
                       r'\(before the first identity'),
    ([(1, 3), (3, 5)], r"record 8 at offset \d+: image records \[5, 7\) belong to no identity "
                       r"\(after identity 1's \[3, 5\), the last\)"),
])
def test_gap_between_identity_ranges_is_an_error(tmp_path, ranges, message):
  d = _write_identity_dataset(tmp_path, ranges, 6)
  with pytest.raises(insightface.FaceDataError, match='train.rec: ' + message):
    insightface.open_face_records(d)


def test_property_class_count_must_match_the_identities(tmp_path):
  d = _write_identity_dataset(tmp_path, [(1, 2), (2, 3), (3, 4), (4, 5), (5, 7)], 6,
                              num_classes=3)
  with pytest.raises(insightface.FaceDataError,
                     match=r'property: says 3 classes, but .*train.rec has 5 identities \(its '
                     r'identity index \(record 0: \[7, 12\)\)\)'):
    insightface.open_face_records(d)
  # Without an identity index: the distinct header labels.
  jpeg = synthetic_faces.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
  insightface.write_rec(str(tmp_path / 'train.rec'), str(tmp_path / 'train.idx'),
                        [(k, insightface.pack_record(float(c), jpeg, id=k))
                         for k, c in enumerate([0, 1, 1, 4])])
  insightface.write_property(str(tmp_path), 2, 8, 8)
  with pytest.raises(insightface.FaceDataError,
                     match=r'property: says 2 classes, but .*train.rec has 3 identities \(the '
                     'distinct labels of its image records'):
    insightface.open_face_records(str(tmp_path))


def test_swapped_idx_offsets_are_caught_by_the_record_id(tmp_path):
  d = _write_identity_dataset(tmp_path, [(1, 4), (4, 7)], 6)
  idx = os.path.join(d, 'train.idx')
  keys, offsets = insightface.read_idx(idx)
  offsets = dict(zip(keys.tolist(), offsets.tolist()))
  offsets[2], offsets[5] = offsets[5], offsets[2]
  with open(idx, 'w') as f:
    f.writelines(f'{k}\t{o}\n' for k, o in offsets.items())
  recs = insightface.open_face_records(d)  # Only record 0 and the identity records are read.
  assert recs.reader.read_image(1)
  with pytest.raises(insightface.FaceDataError,
                     match=rf'train.rec: record 2 at offset {offsets[2]}: the record there has '
                     r'header id 5, not its key 2: .*train.idx points key 2 at another record'):
    recs.reader.read_image(2)
  images = faces.LazyImages.from_records(recs.reader, recs.image_keys, (8, 8, 3))
  with pytest.raises(insightface.FaceDataError, match='header id 2, not its key 5'):
    images[4]


def _write_pickle(path, obj):
  with open(path, 'wb') as f:
    pickle.dump(obj, f)
  return str(path)


@pytest.mark.parametrize('obj, message', [
    ((b'a', b'b', [True]), r'expected a pickled pair \(images, issame\), got tuple of length 3'),
    ({'a': 1}, 'expected a pickled pair'),
    (('ab', [True]), 'entry 0 .* got str'),
    (([b'a', b'b'], [1]), r'entry 1 \(issame\) must be a 1-D list of booleans'),
    (([b'a', b'b', b'c'], [True]), '3 images for 1 pairs; expected 2'),
    (([b'a', b'b', b'c', 7], [True, False]), 'image 3 is a int, expected JPEG bytes'),
])
def test_bin_of_wrong_shape_or_type(tmp_path, obj, message):
  path = _write_pickle(tmp_path / 'bad.bin', obj)
  with pytest.raises(insightface.FaceDataError, match='bad.bin: ' + message):
    insightface.read_bin(path)


def test_bin_without_pairs(tmp_path):
  path = _write_pickle(tmp_path / 'empty.bin', ([], []))
  with pytest.raises(insightface.FaceDataError,
                     match=r'empty.bin: the verification file has no pairs \(entries 0 and 1'):
    insightface.read_bin(path)
  with pytest.raises(insightface.FaceDataError, match='empty.bin: .* no pairs'):
    faces.load_verification_set(path)


def test_bin_not_a_pickle(tmp_path):
  path = tmp_path / 'junk.bin'
  path.write_bytes(b'\x00not a pickle')
  with pytest.raises(insightface.FaceDataError, match='junk.bin: cannot unpickle'):
    insightface.read_bin(str(path))


def test_undecodable_jpeg_names_entry(tmp_path):
  good = synthetic_faces.encode_jpeg(np.zeros((8, 8, 3), np.uint8))
  path = str(tmp_path / 'v.bin')
  insightface.write_bin(path, [good, good, good, b'\xff\xd8garbage'], [True, False])
  pairs = faces.load_verification_set(path)
  chex.assert_shape(pairs.images[:3], (3, 8, 8, 3))
  with pytest.raises(insightface.FaceDataError, match='v.bin: image 3: cannot decode'):
    pairs.images[np.array([0, 3])]
  other = synthetic_faces.encode_jpeg(np.zeros((16, 8, 3), np.uint8))
  insightface.write_bin(path, [good, other], [True])
  with pytest.raises(insightface.FaceDataError, match=r'image 1: decoded image has shape '
                     r'\(16, 8, 3\), expected \(8, 8, 3\)'):
    faces.load_verification_set(path).images[1]


def test_verification_bin_round_trip(synth):
  jpegs, issame = insightface.read_bin(synth.bin_path)
  assert len(jpegs) == 80 and issame.dtype == bool
  # LFW's layout: each of the 10 folds of 4 pairs has 2 same pairs, then 2 different.
  np.testing.assert_array_equal(issame, [True, True, False, False] * 10)
  pairs = faces.load_verification_set(synth.bin_path)
  assert pairs.name == 'synthetic' and pairs.images.shape == (80, SIZE, SIZE, 3)
  np.testing.assert_array_equal(pairs.images[:], insightface.decode_jpegs(jpegs))


def test_synthetic_faces_are_deterministic(synth, tmp_path):
  kwargs = dict(num_identities=24, images_per_identity=(6, 14), image_size=SIZE, num_pairs=40,
                verification_identities=6, magic_every=3)
  again = synthetic_faces.write_synthetic_faces(str(tmp_path / 'a'), seed=3, **kwargs)
  other = synthetic_faces.write_synthetic_faces(str(tmp_path / 'b'), seed=4, **kwargs)
  read = lambda d, name: pathlib.Path(d, name).read_bytes()
  for name in ('train.rec', 'train.idx', 'property', 'synthetic.bin'):
    assert read(again.directory, name) == read(synth.directory, name)
  assert read(other.directory, 'train.rec') != read(synth.directory, 'train.rec')


# ---------------------------------------------------------------------------
# Lazily decoded images in data.Split.


def _eager(records, keys):
  return insightface.decode_jpegs([records.reader.read_image(k) for k in keys])


def test_lazy_images_index_like_an_array(records):
  lazy = faces.LazyImages.from_records(records.reader, records.image_keys, records.image_shape)
  eager = _eager(records, records.image_keys)
  assert lazy.shape == eager.shape and lazy.dtype == np.uint8 and len(lazy) == len(eager)
  for index in (0, 5, -1, slice(None), slice(3, 11, 2), slice(5, 5), np.array([4, 0, 4]),
                np.array([[1, 2], [7, 3], [0, 9]]), np.zeros((0,), np.int64), np.int64(-2)):
    np.testing.assert_array_equal(lazy[index], eager[index])
  np.testing.assert_array_equal(np.asarray(lazy), eager)
  with pytest.raises(IndexError):
    lazy[len(lazy)]
  with pytest.raises(IndexError):
    lazy[np.array([0, len(lazy)])]
  with pytest.raises(IndexError, match='integer array'):
    lazy[np.array([0.5])]
  part = lazy.take([3, 1])
  np.testing.assert_array_equal(part[:], eager[[3, 1]])
  both = part.concat(lazy.take([0]))
  assert len(both.sources) == 1
  np.testing.assert_array_equal(both[:], eager[[3, 1, 0]])


def test_lazy_images_from_two_sources(records, synth):
  pairs = faces.load_verification_set(synth.bin_path)
  lazy = faces.LazyImages.from_records(records.reader, records.image_keys[:3],
                                       records.image_shape)
  both = lazy.concat(pairs.images.take([5, 6]))
  assert len(both.sources) == 2
  np.testing.assert_array_equal(both[:], np.concatenate([lazy[:], pairs.images[[5, 6]]]))


def test_split_batches_and_merge_with_lazy_images(records):
  keys = records.image_keys[:30]
  lazy = faces.LazyImages.from_records(records.reader, keys, records.image_shape)
  labels = records.labels[:30]
  split = data.Split(lazy, labels)
  eager = data.Split(_eager(records, keys), labels)
  assert data.num_batches(split, 8) == 3
  for (xa, ya), (xb, yb) in zip(data.batches(split, 8, seed=1, epoch=2),
                                data.batches(eager, 8, seed=1, epoch=2), strict=True):
    assert isinstance(xa, np.ndarray)
    np.testing.assert_array_equal(xa, xb)
    np.testing.assert_array_equal(ya, yb)
  merged = data.merge(data.Split(lazy.take(np.arange(10)), labels[:10]),
                      data.Split(lazy.take(np.arange(10, 30)), labels[10:]))
  assert isinstance(merged.images, faces.LazyImages)
  np.testing.assert_array_equal(merged.images[:], eager.images)
  np.testing.assert_array_equal(merged.labels, labels)
  empty = data.Split(np.zeros((0, SIZE, SIZE, 3), np.uint8), np.zeros(0, np.int32))
  assert data.merge(split, empty).images is lazy
  with pytest.raises(ValueError, match='Cannot merge splits whose images are ndarray and '
                     'LazyImages'):
    data.merge(eager, split)
  with pytest.raises(ValueError, match='labels'):
    data.Split(lazy, labels[:5])


def test_prefetch_keeps_order_and_raises():
  assert list(data.prefetch(iter(range(20)), size=3)) == list(range(20))

  def failing():
    yield 1
    raise RuntimeError('boom')

  it = data.prefetch(failing())
  assert next(it) == 1
  with pytest.raises(RuntimeError, match='boom'):
    next(it)
  produced = []

  def endless():
    i = 0
    while True:
      produced.append(i)
      yield i
      i += 1

  it = data.prefetch(endless(), size=2)
  assert next(it) == 0
  it.close()  # Stops the producer: it runs at most a few items ahead.
  threading.Event().wait(0.3)
  assert len(produced) <= 5
  with pytest.raises(ValueError, match='positive int'):
    data.prefetch(iter([]), size=0)


# ---------------------------------------------------------------------------
# The proxy task.


def _identities(counts):
  labels = np.repeat(np.arange(len(counts)), counts)
  keys = 1 + np.random.default_rng(0).permutation(len(labels))  # Arbitrary record keys.
  return keys, labels


def test_select_proxy_invariants():
  counts = np.random.default_rng(1).integers(1, 60, 300)
  keys, labels = _identities(counts)
  label_of = dict(zip(keys.tolist(), labels.tolist()))
  k, m, v = 50, 40, 4
  index = faces.select_proxy(keys, labels, num_identities=k, images_per_identity=m,
                             valid_per_identity=v, seed=7)
  assert index.num_classes == k and len(np.unique(index.identities)) == k
  assert (counts[index.identities] >= m).all()
  chex.assert_shape([index.train_keys, index.train_labels], [(k * (m - v),)] * 2)
  chex.assert_shape([index.valid_keys, index.valid_labels], [(k * v,)] * 2)
  assert index.train_labels.dtype == index.valid_labels.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(index.train_labels), [m - v] * k)
  np.testing.assert_array_equal(np.bincount(index.valid_labels), [v] * k)
  assert not set(index.train_keys.tolist()) & set(index.valid_keys.tolist())
  assert len(set(index.train_keys.tolist())) == len(index.train_keys)
  for split_keys, split_labels in ((index.train_keys, index.train_labels),
                                   (index.valid_keys, index.valid_labels)):
    original = np.array([label_of[key] for key in split_keys.tolist()])
    np.testing.assert_array_equal(index.identities[split_labels], original)
  again = faces.select_proxy(keys, labels, num_identities=k, images_per_identity=m,
                             valid_per_identity=v, seed=7)
  chex.assert_trees_all_equal(tuple(index), tuple(again))
  other = faces.select_proxy(keys, labels, num_identities=k, images_per_identity=m,
                             valid_per_identity=v, seed=8)
  assert not np.array_equal(other.identities, index.identities)


def test_select_proxy_errors():
  keys, labels = _identities([40, 39, 41, 50])
  with pytest.raises(ValueError, match='Only 3 of the 4 identities have at least 40 images; '
                     'the proxy task needs 4'):
    faces.select_proxy(keys, labels, num_identities=4)
  index = faces.select_proxy(keys, labels, num_identities=3)
  np.testing.assert_array_equal(index.identities, [0, 2, 3])
  for bad in (dict(valid_per_identity=0), dict(valid_per_identity=40),
              dict(images_per_identity=-1), dict(num_identities=0)):
    with pytest.raises(ValueError):
      faces.select_proxy(keys, labels, **{'num_identities': 1, **bad})


def test_select_full_covers_every_image_once():
  counts = np.array([1, 4, 5, 9, 30])
  keys, labels = _identities(counts)
  index = faces.select_full(keys, labels, valid_per_identity=4, seed=2)
  everything = np.concatenate([index.train_keys, index.valid_keys])
  np.testing.assert_array_equal(np.sort(everything), np.sort(keys))
  np.testing.assert_array_equal(np.bincount(index.valid_labels, minlength=5), [0, 0, 4, 4, 4])
  label_of = dict(zip(keys.tolist(), labels.tolist()))
  np.testing.assert_array_equal(index.train_labels, [label_of[k] for k in index.train_keys])
  assert index.num_classes == 5
  with pytest.raises(ValueError, match='valid_per_identity must be a positive int'):
    faces.select_full(keys, labels, valid_per_identity=0)


def test_load_face_splits_proxy_and_cache(synth, records, tmp_path):
  path = str(tmp_path / 'proxy.npz')
  splits = faces.load_face_splits(synth.directory, num_identities=5, images_per_identity=10,
                                  valid_per_identity=2, seed=1, index_path=path)
  assert (len(splits.train), len(splits.valid), len(splits.test)) == (40, 10, 0)
  assert splits.num_classes == 5 and splits.image_shape == (SIZE, SIZE, 3)
  assert splits.mean == (0.5,) * 3 and splits.std == pytest.approx((128 / 255,) * 3)
  assert isinstance(splits.train.images, faces.LazyImages)
  chex.assert_shape(splits.test.images, (0, SIZE, SIZE, 3))
  # The index is record keys into the original train.rec; nothing else was written.
  assert sorted(os.listdir(tmp_path)) == ['proxy.npz']
  refs = splits.train.images.refs
  assert splits.train.images.sources == (splits.valid.images.sources[0],)
  label_of = dict(zip(records.image_keys.tolist(), records.labels.tolist()))
  original = np.array([label_of[k] for k in refs[:, 1].tolist()])
  index, meta = faces.load_index(path)
  np.testing.assert_array_equal(index.identities[splits.train.labels], original)
  assert meta['num_identities'] == 5 and meta['seed'] == 1
  np.testing.assert_array_equal(splits.valid.images[:], _eager(records, index.valid_keys))
  cached = faces.load_face_splits(synth.directory, num_identities=5, images_per_identity=10,
                                  valid_per_identity=2, seed=1, index_path=path)
  np.testing.assert_array_equal(cached.train.images.refs, refs)
  with pytest.raises(insightface.FaceDataError, match='proxy.npz: this face index was made'):
    faces.load_face_splits(synth.directory, num_identities=5, images_per_identity=10,
                           valid_per_identity=2, seed=2, index_path=path)
  with pytest.raises(ValueError, match='the proxy task needs 30'):
    faces.load_face_splits(synth.directory, num_identities=30, images_per_identity=10,
                           valid_per_identity=2)


def test_load_face_splits_full(synth, records):
  splits = faces.load_face_splits(synth.directory, proxy=False, valid_per_identity=2, seed=0)
  assert splits.num_classes == 24
  whole = data.merge(splits.train, splits.valid)
  assert isinstance(whole.images, faces.LazyImages)
  order = np.argsort(whole.images.refs[:, 1])
  np.testing.assert_array_equal(whole.images.refs[order, 1], records.image_keys)
  np.testing.assert_array_equal(whole.labels[order], records.labels)
  assert len(splits.valid) == 2 * 24
