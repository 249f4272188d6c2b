"""insightface's face-data formats, read and written without MXNet.

Training data (``train.rec`` / ``train.idx`` / ``property``):

* ``train.rec`` is MXNet RecordIO. Each chunk is ``uint32 magic 0xced7230a``,
  ``uint32 lrecord`` (upper 3 bits: continuation flag, 0 whole record, 1
  first piece, 2 middle piece, 3 last piece; lower 29 bits: length), then the
  payload padded with zeros to a multiple of 4 bytes. MXNet's writer looks for
  the magic at every 4-byte-aligned position of a payload and cuts the record
  there (dropping those 4 bytes), so a reader re-joins the pieces *with* the
  magic between them.
* A record payload is the header ``struct 'IfQQ'`` (flag, label, id, id2,
  little-endian, 24 bytes), then ``flag`` float32 labels when ``flag > 0``
  (the label field is then 0), then the JPEG bytes (``mx.recordio.pack``).
* ``train.idx`` is text, one ``key<TAB>offset`` line per record
  (``MXIndexedRecordIO``).
* ``property`` is text ``num_classes,height,width`` (``85742,112,112``).
* insightface's layout (``face2rec2.py``): image records have keys
  ``1..N``; record 0 has labels ``[N + 1, N + 1 + C]``, the [start, end) keys
  of the C identity records; identity record ``N + 1 + i`` has labels
  ``[start, end)``, the keys of identity i's images. An image's header label
  is its class: the label field when ``flag == 0``, else ``labels[0]``
  (face2rec2 writes ``[class, 1.0]``). Files without an identity index (record
  0 an ordinary image) are read too: every record is an image.
* Checked when reading: the identity ranges cover the image keys ``1..N`` exactly
  once (no overlap, no gap that would drop images), ``property``'s
  ``num_classes`` is the number of identities, and a record's header id is
  its ``.idx`` key (a record whose id is 0, as some writers leave it, is not
  compared), which catches an ``.idx`` whose offsets point at other records.

Verification data (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin``): a pickle of
``(list of 2P JPEG byte strings, list of P booleans)``; pair i is images
``2i`` and ``2i + 1``. Pickles can run code when loaded: read only files from
a source you trust (the same holds for insightface's own loader).

Every problem with a file raises `FaceDataError` naming the file and the
offset or entry.
"""

from __future__ import annotations

import concurrent.futures
import io
import os
import pickle
import struct
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import numpy as np
from PIL import Image

MAGIC = 0xced7230a
_MAGIC_BYTES = struct.pack('<I', MAGIC)
_CHUNK = struct.Struct('<II')  # magic, lrecord
_HEADER = struct.Struct('<IfQQ')  # flag, label, id, id2 (MXNet's 'IfQQ')
_LENGTH_BITS = 29
_MAX_LENGTH = (1 << _LENGTH_BITS) - 1
_WHOLE, _FIRST, _MIDDLE, _LAST = 0, 1, 2, 3


class FaceDataError(ValueError):
  """A face-data file is missing, malformed or truncated (message names it)."""


class RecordHeader(NamedTuple):
  """The header of one record (MXNet's ``IRHeader``).

  Attributes:
    flag: number of float32 labels stored after the header (0: one scalar).
    label: the scalar label when ``flag == 0`` (else 0.0, as MXNet writes).
    id: record id (insightface: the record's key).
    id2: second id (insightface: 0).
    labels: float32 (flag,) labels; empty when ``flag == 0``.
  """

  flag: int
  label: float
  id: int
  id2: int
  labels: np.ndarray

  @property
  def class_label(self) -> float:
    """The image's class as insightface reads it: ``label`` or ``labels[0]``."""
    return float(self.labels[0]) if self.flag > 0 else float(self.label)


# Record payloads ---------------------------------------------------------------


def pack_record(label: float | Sequence[float], data: bytes = b'', *,
                id: int = 0, id2: int = 0) -> bytes:  # pylint: disable=redefined-builtin
  """A record payload, as ``mx.recordio.pack(IRHeader(0, label, id, id2), data)``.

  Args:
    label: a number (stored in the header, ``flag = 0``) or a sequence of
      numbers (stored as float32 after the header, ``flag = len(label)``).
    data: the bytes that follow (a JPEG for image records).
    id: header id.
    id2: header second id.

  Returns:
    The payload bytes.
  """
  if np.ndim(label) == 0:
    return _HEADER.pack(0, float(label), id, id2) + bytes(data)
  labels = np.asarray(label, np.float32).reshape(-1)
  return (_HEADER.pack(labels.size, 0.0, id, id2) + labels.astype('<f4').tobytes()
          + bytes(data))


def unpack_record(payload: bytes, where: str = 'record') -> tuple[RecordHeader, bytes]:
  """Splits a record payload into its header and data (``mx.recordio.unpack``).

  Args:
    payload: the record's bytes (pieces already re-joined).
    where: names the record in error messages (file, key, offset).

  Returns:
    ``(header, data)``.

  Raises:
    FaceDataError: the payload is shorter than its header says.
  """
  if len(payload) < _HEADER.size:
    raise FaceDataError(
        f'{where}: payload of {len(payload)} bytes is shorter than the '
        f'{_HEADER.size}-byte record header.')
  flag, label, id_, id2 = _HEADER.unpack_from(payload)
  end = _HEADER.size + 4 * flag
  if len(payload) < end:
    raise FaceDataError(
        f'{where}: header says {flag} float32 labels follow, but the payload '
        f'has only {len(payload) - _HEADER.size} bytes after the header.')
  labels = np.frombuffer(payload, '<f4', flag, _HEADER.size).astype(np.float32)
  return RecordHeader(flag, label, id_, id2, labels), payload[end:]


# RecordIO framing ---------------------------------------------------------------


def frame_record(payload: bytes) -> tuple[bytes, int]:
  """Frames one record as MXNet's RecordIO writer does (dmlc RecordIOWriter).

  The payload is cut at every 4-byte-aligned occurrence of the magic (those 4
  bytes are dropped; the reader puts them back), the pieces get flags 1, 2,
  ..., 3 (a record without the magic is one chunk with flag 0), and the last
  piece is padded with zeros to 4 bytes. Earlier pieces are multiples of 4
  bytes long by construction.

  Args:
    payload: the record payload, shorter than 2**29 bytes.

  Returns:
    ``(chunks, pieces)``: the bytes to append to the ``.rec`` file and the
    number of chunks the record became (1 when it was not split).
  """
  n = len(payload)
  if n > _MAX_LENGTH:
    raise ValueError(f'A record payload must be shorter than 2**29 bytes, got {n}.')
  out = []
  start = 0
  for i in range(0, n - n % 4, 4):
    if payload[i:i + 4] == _MAGIC_BYTES:
      flag = _FIRST if start == 0 else _MIDDLE
      out.append(_CHUNK.pack(MAGIC, flag << _LENGTH_BITS | (i - start)))
      out.append(payload[start:i])
      start = i + 4
  flag = _WHOLE if start == 0 else _LAST
  out.append(_CHUNK.pack(MAGIC, flag << _LENGTH_BITS | (n - start)))
  out.append(payload[start:])
  out.append(b'\0' * (-n % 4))
  return b''.join(out), (len(out) - 1) // 2


def write_rec(rec_path: str, idx_path: str,
              records: Iterable[tuple[int, bytes]]) -> int:
  """Writes an indexed RecordIO pair (``MXIndexedRecordIO.write_idx``).

  Args:
    rec_path: the ``.rec`` file to create (overwritten).
    idx_path: the ``.idx`` file to create: ``key<TAB>offset`` per record.
    records: ``(key, payload)`` pairs, written in this order.

  Returns:
    The number of records that were split into several chunks.
  """
  split = 0
  with open(rec_path, 'wb') as rec, open(idx_path, 'w') as idx:
    for key, payload in records:
      chunks, pieces = frame_record(payload)
      idx.write(f'{int(key)}\t{rec.tell()}\n')
      rec.write(chunks)
      split += pieces > 1
  return split


def write_property(directory: str, num_classes: int, height: int, width: int) -> str:
  """Writes ``directory/property`` as ``num_classes,height,width``; returns its path."""
  path = os.path.join(directory, 'property')
  with open(path, 'w') as f:
    f.write(f'{int(num_classes)},{int(height)},{int(width)}')
  return path


def write_face_dataset(directory: str, identities: Sequence[Sequence[bytes]],
                       image_size: tuple[int, int]) -> int:
  """Writes ``train.rec`` / ``train.idx`` / ``property`` in insightface's layout.

  Image records get keys ``1..N`` (identity 0's images first) and headers
  ``IRHeader(flag=2, labels=[class, 1.0], id=key, id2=0)`` as face2rec2 writes
  them; record 0 and the C identity records follow the module docstring.

  Args:
    directory: existing output directory.
    identities: for each class, the JPEG bytes of its images (at least one).
    image_size: ``(height, width)`` written to ``property``.

  Returns:
    The number of records that were split into several chunks.
  """
  sizes = [len(images) for images in identities]
  if not sizes or min(sizes) == 0:
    raise ValueError('write_face_dataset needs at least one identity and one image '
                     f'per identity, got image counts {sizes}.')
  num_images, num_ids = sum(sizes), len(sizes)
  first_id_key = num_images + 1
  starts = 1 + np.concatenate([[0], np.cumsum(sizes)])

  def records():
    yield 0, pack_record([first_id_key, first_id_key + num_ids], id=0)
    key = 1
    for c, images in enumerate(identities):
      for jpeg in images:
        yield key, pack_record([c, 1.0], jpeg, id=key)
        key += 1
    for c in range(num_ids):
      yield first_id_key + c, pack_record([starts[c], starts[c + 1]], id=first_id_key + c)

  split = write_rec(os.path.join(directory, 'train.rec'),
                    os.path.join(directory, 'train.idx'), records())
  write_property(directory, num_ids, *image_size)
  return split


def write_bin(path: str, jpegs: Sequence[bytes], issame: Sequence[bool]) -> None:
  """Writes a verification ``.bin``: pickle of ``(list of 2P bytes, list of P bools)``."""
  if len(jpegs) != 2 * len(issame):
    raise ValueError(f'A .bin needs 2 images per pair: got {len(jpegs)} images '
                     f'for {len(issame)} pairs.')
  with open(path, 'wb') as f:
    pickle.dump(([bytes(j) for j in jpegs], [bool(s) for s in issame]), f,
                protocol=pickle.HIGHEST_PROTOCOL)


# Reading -------------------------------------------------------------------------


def read_idx(idx_path: str) -> tuple[np.ndarray, np.ndarray]:
  """Reads a ``.idx`` file.

  Returns:
    ``(keys, offsets)``: int64 (R,) each, in file order.

  Raises:
    FaceDataError: missing file, malformed line (named by line number), or a
      key listed twice.
  """
  try:
    with open(idx_path) as f:
      lines = f.read().splitlines()
  except OSError as e:
    raise FaceDataError(f'{idx_path}: cannot read the RecordIO index ({e}).') from None
  keys, offsets = [], []
  for n, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    fields = line.split('\t')
    try:
      if len(fields) != 2:
        raise ValueError
      key, offset = int(fields[0]), int(fields[1])
      if offset < 0:
        raise ValueError
    except ValueError:
      raise FaceDataError(f'{idx_path}: line {n} is {line!r}, expected '
                          '"key<TAB>offset" with integers.') from None
    keys.append(key)
    offsets.append(offset)
  keys_arr = np.asarray(keys, np.int64)
  unique, counts = np.unique(keys_arr, return_counts=True)
  if (counts > 1).any():
    raise FaceDataError(f'{idx_path}: key {unique[counts > 1][0]} is listed more than once.')
  return keys_arr, np.asarray(offsets, np.int64)


def read_property(path: str) -> tuple[int, int, int]:
  """Reads insightface's ``property`` file: ``(num_classes, height, width)``."""
  try:
    with open(path) as f:
      text = f.read().strip()
  except OSError as e:
    raise FaceDataError(f'{path}: cannot read the property file ({e}).') from None
  try:
    values = tuple(int(v) for v in text.split(','))
    if len(values) != 3 or min(values) <= 0:
      raise ValueError
  except ValueError:
    raise FaceDataError(f'{path}: expected "num_classes,height,width" with positive '
                        f'integers (e.g. "85742,112,112"), got {text[:80]!r}.') from None
  return values  # pytype: disable=bad-return-type


class RecordReader:
  """Random access to the records of an indexed RecordIO file, by key.

  Opens the ``.rec`` once and reads with ``os.pread`` (no shared file
  position), so one reader can serve several threads at once.

  Attributes:
    rec_path: the ``.rec`` file.
    idx_path: its ``.idx`` file.
    keys: int64 (R,) record keys in ``.idx`` order.
  """

  def __init__(self, rec_path: str, idx_path: str | None = None):
    self.rec_path = os.fspath(rec_path)
    self.idx_path = (os.path.splitext(self.rec_path)[0] + '.idx'
                     if idx_path is None else os.fspath(idx_path))
    self.keys, offsets = read_idx(self.idx_path)
    try:
      self._fd = os.open(self.rec_path, os.O_RDONLY | getattr(os, 'O_BINARY', 0))
    except OSError as e:
      raise FaceDataError(f'{self.rec_path}: cannot open the RecordIO file ({e}).') from None
    self._size = os.fstat(self._fd).st_size
    self._offsets = dict(zip(self.keys.tolist(), offsets.tolist()))
    past = offsets >= self._size
    if past.any():
      i = int(np.flatnonzero(past)[0])
      os.close(self._fd)
      self._fd = None
      raise FaceDataError(
          f'{self.idx_path}: key {self.keys[i]} has offset {offsets[i]}, past the end '
          f'of {self.rec_path} ({self._size} bytes).')
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self.keys)

  def __contains__(self, key: int) -> bool:
    return int(key) in self._offsets

  def close(self) -> None:
    """Closes the file (idempotent)."""
    with self._lock:
      if self._fd is not None:
        os.close(self._fd)
        self._fd = None

  def __enter__(self) -> RecordReader:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self, _close=os.close):  # os may be gone at interpreter exit.
    if getattr(self, '_fd', None) is not None:
      _close(self._fd)

  def __repr__(self) -> str:
    return f'RecordReader({self.rec_path!r}, {len(self)} records)'

  def _pread(self, size: int, offset: int, what: str) -> bytes:
    if self._fd is None:
      raise ValueError(f'{self.rec_path}: the reader is closed.')
    data = os.pread(self._fd, size, offset)
    if len(data) != size:
      raise FaceDataError(
          f'{self.rec_path}: truncated {what} at offset {offset}: expected {size} '
          f'bytes, the file ends after {len(data)}.')
    return data

  def offset(self, key: int) -> int:
    """Byte offset of record `key` in the ``.rec`` file."""
    try:
      return self._offsets[int(key)]
    except KeyError:
      raise KeyError(f'{self.idx_path}: no record with key {key}.') from None

  def read(self, key: int) -> bytes:
    """The payload of record `key`, pieces re-joined with the magic between them.

    Raises:
      KeyError: unknown key.
      FaceDataError: bad magic, bad continuation flags or truncated data (the
        message names the file and the chunk's offset).
    """
    start = offset = self.offset(key)
    pieces = []
    while True:
      magic, lrecord = _CHUNK.unpack(self._pread(_CHUNK.size, offset, 'chunk header'))
      if magic != MAGIC:
        raise FaceDataError(
            f'{self.rec_path}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x}) at '
            f'offset {offset} (record {key}); the file or its .idx is corrupt.')
      flag, length = lrecord >> _LENGTH_BITS, lrecord & _MAX_LENGTH
      expected = (_WHOLE, _FIRST) if not pieces else (_MIDDLE, _LAST)
      if flag not in expected:
        raise FaceDataError(
            f'{self.rec_path}: chunk at offset {offset} (record {key} starting at '
            f'{start}) has continuation flag {flag}, expected one of {expected}.')
      pieces.append(self._pread(length, offset + _CHUNK.size, 'record payload'))
      if flag in (_WHOLE, _LAST):
        return _MAGIC_BYTES.join(pieces)
      offset += _CHUNK.size + length + (-length % 4)

  def where(self, key: int) -> str:
    """Names record `key` in messages: file, key and offset."""
    return f'{self.rec_path}: record {key} at offset {self.offset(key)}'

  def read_record(self, key: int) -> tuple[RecordHeader, bytes]:
    """``(header, data)`` of record `key` (data: the JPEG of an image record).

    Raises:
      FaceDataError: as `read`, or the record's header id is neither `key` nor 0
        (the ``.idx`` offset of `key` points at another record).
    """
    header, data = unpack_record(self.read(key), self.where(key))
    check_record_id(header, int(key), self.where(key), self.idx_path)
    return header, data

  def read_image(self, key: int) -> bytes:
    """The JPEG bytes of image record `key` (its header dropped)."""
    return self.read_record(key)[1]


def check_record_id(header: RecordHeader, key: int, where: str, idx_path: str) -> None:
  """Raises `FaceDataError` unless ``header.id`` is `key` (or 0: not recorded).

  insightface's writers (``face2rec2``, ``im2rec``) store each record's key as its
  header id, so a mismatch means the ``.idx`` offset of `key` points at another
  record (offsets swapped, or an index of another ``.rec``).
  """
  if header.id not in (0, key):
    raise FaceDataError(
        f'{where}: the record there has header id {header.id}, not its key {key}: '
        f'{idx_path} points key {key} at another record (offsets swapped, or an index '
        'of another .rec?).')


class FaceRecords(NamedTuple):
  """An insightface training set: where each identity's images are.

  Attributes:
    reader: random access to the records.
    image_keys: int64 (N,) record keys of every image, grouped by identity.
    labels: int32 (N,) identity of each image, in [0, num_identities): the
      identity's position in the identity index (face2rec2 numbers classes in
      the same order, so this is also the header label there).
    num_identities: number of identities (C).
    image_shape: ``(height, width, 3)`` from ``property``.
    num_classes: ``num_classes`` from ``property``.
  """

  reader: RecordReader
  image_keys: np.ndarray
  labels: np.ndarray
  num_identities: int
  image_shape: tuple[int, int, int]
  num_classes: int


def open_face_records(directory: str, *, rec_name: str = 'train') -> FaceRecords:
  """Opens ``directory/{rec_name}.rec`` / ``.idx`` / ``property`` and indexes identities.

  With an identity index (record 0 has ``flag > 0``) this reads only record 0
  and the C identity records. Without one, every record is an image and its
  header is read (and its label kept) to group images by identity, with labels
  renumbered 0..C-1 in increasing order of the header labels.

  Raises:
    FaceDataError: missing or malformed files, inconsistent identity ranges.
  """
  num_classes, height, width = read_property(os.path.join(directory, 'property'))
  reader = RecordReader(os.path.join(directory, f'{rec_name}.rec'),
                        os.path.join(directory, f'{rec_name}.idx'))
  if 0 not in reader:
    raise FaceDataError(f'{reader.idx_path}: there is no record 0.')
  head, _ = reader.read_record(0)
  if head.flag > 0:
    keys, labels = _identity_index(reader, head)
    found = f'its identity index (record 0: [{int(head.labels[0])}, {int(head.labels[1])}))'
  else:
    keys, labels = _scan_labels(reader)
    found = 'the distinct labels of its image records'
  num_identities = int(labels.max()) + 1
  if num_classes != num_identities:
    raise FaceDataError(
        f'{os.path.join(directory, "property")}: says {num_classes} classes, but '
        f'{reader.rec_path} has {num_identities} identities ({found}); the property file '
        'belongs to another dataset, or the .rec is incomplete.')
  return FaceRecords(reader, keys, labels, num_identities, (height, width, 3), num_classes)


def _identity_index(reader: RecordReader, head: RecordHeader) -> tuple[np.ndarray, np.ndarray]:
  """Image keys and identity labels from record 0's identity range."""
  if head.flag < 2:
    raise FaceDataError(f'{reader.where(0)}: record 0 has {head.flag} label(s); an '
                        'identity index needs [first identity key, end key).')
  id_start, id_end = int(head.labels[0]), int(head.labels[1])
  if id_end <= id_start:
    raise FaceDataError(f'{reader.where(0)}: empty identity range [{id_start}, {id_end}).')
  keys, labels, ranges = [], [], []
  for c, id_key in enumerate(range(id_start, id_end)):
    if id_key not in reader:
      raise FaceDataError(f'{reader.idx_path}: identity record {id_key} (record 0 lists '
                          f'[{id_start}, {id_end})) is not in the index.')
    header, _ = reader.read_record(id_key)
    if header.flag < 2:
      raise FaceDataError(f'{reader.where(id_key)}: identity record has {header.flag} '
                          'label(s), expected [start, end).')
    a, b = int(header.labels[0]), int(header.labels[1])
    if not 0 < a < b <= id_start:
      raise FaceDataError(f'{reader.where(id_key)}: identity {c} has image range [{a}, {b}), '
                          f'expected 0 < start < end <= {id_start}.')
    keys.append(np.arange(a, b, dtype=np.int64))
    labels.append(np.full(b - a, c, np.int32))
    ranges.append((a, b, c, id_key))
  _check_identity_ranges(reader, ranges, id_start)
  keys_arr = np.concatenate(keys)
  missing = ~np.isin(keys_arr, reader.keys)
  if missing.any():
    raise FaceDataError(f'{reader.idx_path}: image record {keys_arr[missing][0]} (listed by '
                        'an identity record) is not in the index.')
  return keys_arr, np.concatenate(labels)


def _check_identity_ranges(reader: RecordReader, ranges: list[tuple[int, int, int, int]],
                           id_start: int) -> None:
  """Raises `FaceDataError` unless the identities' image ranges tile ``[1, id_start)``.

  Args:
    reader: the records (names the file and the identity records in messages).
    ranges: ``(start, end, identity, identity record key)`` of every identity.
    id_start: the first identity record's key; image records are ``1..id_start - 1``.
  """
  ordered = sorted(ranges)
  previous_end, previous = 1, None
  for a, b, c, id_key in ordered:
    if a < previous_end:
      pa, pb, pc, _ = previous
      raise FaceDataError(
          f'{reader.where(id_key)}: identity {c} has image range [{a}, {b}), which overlaps '
          f'identity {pc}\'s [{pa}, {pb}); each image record must belong to one identity.')
    if a > previous_end:
      after = (f"after identity {previous[2]}'s [{previous[0]}, {previous[1]})" if previous
               else 'before the first identity')
      raise FaceDataError(
          f'{reader.where(id_key)}: image records [{previous_end}, {a}) belong to no identity '
          f"({after}, before identity {c}'s [{a}, {b})); they would be silently dropped.")
    previous_end, previous = b, (a, b, c, id_key)
  if previous_end != id_start:
    a, b, c, id_key = previous
    raise FaceDataError(
        f"{reader.where(id_key)}: image records [{previous_end}, {id_start}) belong to no "
        f"identity (after identity {c}'s [{a}, {b}), the last); they would be silently "
        'dropped.')


def _scan_labels(reader: RecordReader) -> tuple[np.ndarray, np.ndarray]:
  """Image keys and labels from every record's header (no identity index)."""

  def label(key):
    return reader.read_record(key)[0].class_label

  raw = np.asarray(list(thread_pool().map(label, reader.keys.tolist())))
  if not len(raw):
    raise FaceDataError(f'{reader.idx_path}: the index lists no records.')
  if (raw < 0).any() or not np.array_equal(raw, np.round(raw)):
    raise FaceDataError(f'{reader.rec_path}: image labels must be non-negative integers.')
  _, labels = np.unique(raw, return_inverse=True)
  order = np.argsort(labels, kind='stable')
  return reader.keys[order], labels[order].astype(np.int32)


def read_bin(path: str) -> tuple[list[bytes], np.ndarray]:
  """Reads a verification ``.bin`` (pickle; read only files you trust).

  Returns:
    ``(jpegs, issame)``: 2P JPEG byte strings and bool (P,) ``issame``; pair i
    is images ``2i`` and ``2i + 1``.

  Raises:
    FaceDataError: unreadable file, or a pickle of the wrong shape or type
      (the message names the entry).
  """
  try:
    with open(path, 'rb') as f:
      obj = pickle.load(f, encoding='bytes')
  except (OSError, pickle.UnpicklingError, EOFError, ValueError, TypeError,
          AttributeError, ImportError, IndexError) as e:
    raise FaceDataError(f'{path}: cannot unpickle the verification file '
                        f'({type(e).__name__}: {e}).') from None
  if not isinstance(obj, (tuple, list)) or len(obj) != 2:
    raise FaceDataError(f'{path}: expected a pickled pair (images, issame), got '
                        f'{type(obj).__name__}' + (f' of length {len(obj)}' if
                                                   isinstance(obj, (tuple, list)) else '') + '.')
  bins, issame = obj
  if isinstance(bins, (list, tuple)) and not len(bins) and hasattr(issame, '__len__') \
      and not len(issame):
    raise FaceDataError(f'{path}: the verification file has no pairs (entries 0 and 1, the '
                        'images and issame, are empty).')
  if not isinstance(bins, (list, tuple)):
    raise FaceDataError(f'{path}: entry 0 (the images) must be a list of JPEG byte '
                        f'strings, got {type(bins).__name__}.')
  try:
    flags = np.asarray(issame)
  except (ValueError, TypeError):
    flags = np.asarray(None)
  if flags.ndim != 1 or flags.dtype != bool:
    raise FaceDataError(f'{path}: entry 1 (issame) must be a 1-D list of booleans, got '
                        f'{type(issame).__name__} of dtype {flags.dtype}, shape {flags.shape}.')
  if len(bins) != 2 * len(flags):
    raise FaceDataError(f'{path}: {len(bins)} images for {len(flags)} pairs; expected '
                        f'{2 * len(flags)} (two per pair).')
  jpegs = []
  for i, b in enumerate(bins):
    if isinstance(b, np.ndarray) and b.dtype == np.uint8 and b.ndim == 1:
      b = b.tobytes()
    if not isinstance(b, (bytes, bytearray, memoryview)):
      raise FaceDataError(f'{path}: image {i} is a {type(b).__name__}, expected JPEG bytes.')
    jpegs.append(bytes(b))
  return jpegs, flags


# JPEG decoding -----------------------------------------------------------------

_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def thread_pool() -> concurrent.futures.ThreadPoolExecutor:
  """The shared decoding pool (one thread per CPU, at most 32).

  PIL and ``os.pread`` release the GIL, so threads decode in parallel. Do not
  submit work that waits on this pool from inside it.
  """
  global _POOL
  with _POOL_LOCK:
    if _POOL is None:
      _POOL = concurrent.futures.ThreadPoolExecutor(
          max_workers=min(32, os.cpu_count() or 1), thread_name_prefix='face-decode')
    return _POOL


def decode_jpeg(data: bytes, where: str = 'image',
                shape: tuple[int, int, int] | None = None) -> np.ndarray:
  """Decodes one JPEG to a uint8 (H, W, 3) RGB array with PIL.

  Args:
    data: the encoded bytes.
    where: names the image in error messages (file and key or entry).
    shape: the expected ``(H, W, 3)``, or None for any size.

  Raises:
    FaceDataError: undecodable bytes or a different size.
  """
  try:
    with Image.open(io.BytesIO(data)) as img:
      array = np.asarray(img if img.mode == 'RGB' else img.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
    raise FaceDataError(f'{where}: cannot decode the image ({e}).') from None
  if shape is not None and array.shape != tuple(shape):
    raise FaceDataError(f'{where}: decoded image has shape {array.shape}, expected '
                        f'{tuple(shape)}.')
  return array


def decode_many(fetch: Callable[[int], tuple[bytes, str]], count: int,
                shape: tuple[int, int, int]) -> np.ndarray:
  """Fetches and decodes `count` images in parallel into uint8 (count, H, W, 3).

  Args:
    fetch: ``fetch(i) -> (jpeg bytes, where)`` for i in ``range(count)``; it
      runs in the pool's threads, so reading overlaps decoding too.
    count: number of images.
    shape: ``(H, W, 3)`` every image must have.
  """
  out = np.empty((count, *shape), np.uint8)

  def work(i):
    data, where = fetch(i)
    out[i] = decode_jpeg(data, where, shape)

  for f in [thread_pool().submit(work, i) for i in range(count)]:
    f.result()
  return out


def decode_jpegs(jpegs: Sequence[bytes], shape: tuple[int, int, int] | None = None,
                 where: str = 'image') -> np.ndarray:
  """Decodes JPEGs in parallel: uint8 (N, H, W, 3); all must share one size.

  Args:
    jpegs: encoded images.
    shape: expected ``(H, W, 3)``; None takes the first image's.
    where: prefix naming the images' file in error messages (``where[i]``).
  """
  if shape is None:
    if not jpegs:
      raise ValueError('decode_jpegs needs a shape when there are no images.')
    shape = decode_jpeg(jpegs[0], f'{where}[0]').shape
  return decode_many(lambda i: (jpegs[i], f'{where}[{i}]'), len(jpegs), shape)
