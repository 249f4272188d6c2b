"""Synthetic faces written in insightface's real file formats.

`write_synthetic_faces` draws K identities, each a smooth face-like template
(skin tone, oval, hair, eyes, nose, mouth at identity-specific places, plus a
low-frequency identity texture), and writes every image as a JPEG of a
shifted, re-lit, noisy view of its template on a random background into a
genuine ``train.rec`` / ``train.idx`` / ``property``, and verification pairs
of *other* identities into a genuine ``.bin``. It backs the tests and the
``:smoke`` config, so the whole face pipeline runs offline.

Some JPEGs carry a comment (COM) segment holding the RecordIO magic twice at
4-byte-aligned payload offsets; MXNet's writer splits such records into three
pieces (one of them empty), so readers are exercised on split records. The
images still decode: decoders skip comments.

Everything is a pure function of the seed (one random stream per identity
and per image).
"""

from __future__ import annotations

import io
import os
from typing import NamedTuple

import numpy as np
from PIL import Image

from nar_jax.data import insightface

_MAX_SHIFT = 1 / 16  # of the image size
_NOISE = 6.0  # pixel units


class SyntheticFaceFiles(NamedTuple):
  """What `write_synthetic_faces` wrote.

  Attributes:
    directory: holds ``train.rec``, ``train.idx``, ``property`` and the ``.bin``.
    bin_path: the verification file.
    images_per_identity: int (K,) images written for each training identity.
    split_records: number of training records MXNet's framing split.
  """

  directory: str
  bin_path: str
  images_per_identity: np.ndarray
  split_records: int


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  """(size, size) y and x coordinates in [-1, 1]."""
  c = np.linspace(-1.0, 1.0, size)
  return np.meshgrid(c, c, indexing='ij')


def _smooth_field(rng: np.random.Generator, size: int, cells: int, channels: int) -> np.ndarray:
  """float (size, size, channels) bilinear upsampling of a random (cells, cells) grid."""
  coarse = rng.standard_normal((cells, cells, channels))
  pos = np.linspace(0, cells - 1, size)
  w = np.maximum(0.0, 1.0 - np.abs(pos[:, None] - np.arange(cells)[None]))
  return np.einsum('hi,wj,ijc->hwc', w, w, coarse, optimize=True)


def _blob(y, x, cy, cx, ry, rx) -> np.ndarray:
  """A soft elliptic bump of height 1 at (cy, cx) with radii (ry, rx)."""
  return np.exp(-(((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2))


def face_template(rng: np.random.Generator, size: int) -> tuple[np.ndarray, np.ndarray]:
  """One identity: float RGB (size, size, 3) face in [0, 255] and its (size, size) mask."""
  y, x = _grid(size)
  skin = rng.uniform(90, 235) * np.array([1.0, rng.uniform(0.75, 0.9), rng.uniform(0.6, 0.8)])
  hair = rng.uniform(10, 120, 3)
  cy, ry, rx = rng.uniform(0.0, 0.1), rng.uniform(0.62, 0.78), rng.uniform(0.48, 0.62)
  oval = 1 / (1 + np.exp(((y - cy) ** 2 / ry ** 2 + x ** 2 / rx ** 2 - 1) * 12))
  face = skin + 18 * _smooth_field(rng, size, 5, 3)
  hairline = rng.uniform(-0.6, -0.3)
  hair_mask = oval * (1 / (1 + np.exp((y - hairline) * 25)))
  face = face * (1 - hair_mask[..., None]) + hair * hair_mask[..., None]
  ex, ey, er = rng.uniform(0.2, 0.38), rng.uniform(-0.3, -0.05), rng.uniform(0.05, 0.1)
  eye_colour = rng.uniform(0, 90, 3)
  for sx in (-1, 1):
    eye = _blob(y, x, ey, sx * ex, er * 0.7, er * 1.4)[..., None]
    face = face * (1 - eye) + eye_colour * eye
    brow = _blob(y, x, ey - rng.uniform(0.1, 0.18), sx * ex, 0.03, 0.14)[..., None]
    face = face * (1 - 0.6 * brow) + hair * 0.6 * brow
  nose = _blob(y, x, rng.uniform(0.05, 0.2), 0.0, 0.15, rng.uniform(0.04, 0.08))[..., None]
  face = face * (1 - 0.25 * nose)
  mouth = _blob(y, x, rng.uniform(0.32, 0.5), 0.0, rng.uniform(0.03, 0.06),
                rng.uniform(0.12, 0.25))[..., None]
  face = face * (1 - mouth) + rng.uniform([120, 30, 30], [200, 90, 90]) * mouth
  return np.clip(face, 0, 255), oval


def face_view(template: tuple[np.ndarray, np.ndarray], rng: np.random.Generator) -> np.ndarray:
  """A uint8 (size, size, 3) view: shifted, re-lit, noisy, on a random background."""
  face, mask = template
  size = face.shape[0]
  max_shift = max(1, round(size * _MAX_SHIFT))
  dy, dx = rng.integers(-max_shift, max_shift + 1, 2)
  face = np.roll(face, (dy, dx), axis=(0, 1))
  mask = np.roll(mask, (dy, dx), axis=(0, 1))[..., None]
  background = rng.uniform(30, 220, 3) + 25 * _smooth_field(rng, size, 3, 3)
  x = face * mask + background * (1 - mask)
  y, xs = _grid(size)
  light = rng.uniform(0.75, 1.25) + rng.uniform(-0.25, 0.25) * xs + rng.uniform(-0.15, 0.15) * y
  x = x * light[..., None] + rng.uniform(-15, 15)
  x += _NOISE * rng.standard_normal(x.shape)
  return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """JPEG bytes of a uint8 (H, W, 3) image."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def insert_comment(jpeg: bytes, comment: bytes) -> bytes:
  """Adds a COM segment at `comment_position` (its body starts 4 bytes later)."""
  if len(comment) > 65533:
    raise ValueError(f'A JPEG comment holds at most 65533 bytes, got {len(comment)}.')
  pos = comment_position(jpeg)
  segment = b'\xff\xfe' + (len(comment) + 2).to_bytes(2, 'big') + comment
  return jpeg[:pos] + segment + jpeg[pos:]


def comment_position(jpeg: bytes) -> int:
  """Where `insert_comment` puts a COM segment: after SOI and a leading APP0."""
  if jpeg[2:4] == b'\xff\xe0':
    return 4 + int.from_bytes(jpeg[4:6], 'big')
  return 2


def magic_comment(payload_offset: int) -> bytes:
  """A COM body putting the RecordIO magic twice at 4-byte-aligned payload offsets.

  Args:
    payload_offset: offset in the record payload where the comment body starts.
  """
  magic = insightface.MAGIC.to_bytes(4, 'little')
  return b'\0' * (-payload_offset % 4) + magic + magic + b' nar_jax synthetic face'


def _image_counts(spec: int | tuple[int, int], k: int, rng: np.random.Generator) -> np.ndarray:
  if isinstance(spec, (int, np.integer)):
    low = high = int(spec)
  else:
    low, high = (int(v) for v in spec)
  if not 1 <= low <= high:
    raise ValueError(f'images_per_identity must be a count >= 1 or a range (low, high) with '
                     f'1 <= low <= high, got {spec!r}.')
  return rng.integers(low, high + 1, k)


def write_synthetic_faces(
    directory: str,
    *,
    num_identities: int = 64,
    images_per_identity: int | tuple[int, int] = (8, 16),
    image_size: int = 112,
    num_pairs: int = 200,
    verification_identities: int = 20,
    bin_name: str = 'synthetic.bin',
    magic_every: int = 5,
    quality: int = 90,
    seed: int = 0,
) -> SyntheticFaceFiles:
  """Writes a synthetic insightface training set and a verification ``.bin``.

  Args:
    directory: output directory (created; existing files are overwritten).
    num_identities: K training identities.
    images_per_identity: images of each training identity: a count, or an
      inclusive range ``(low, high)`` drawn per identity from the seed (so
      that some identities fall short of a proxy task's M).
    image_size: height and width (112 like insightface; tests use e.g. 32).
    num_pairs: P verification pairs, laid out like LFW: 10 contiguous folds
      (sizes as `verification` cuts them), each with its same-identity pairs
      first, then as many different-identity pairs (one more same pair in an
      odd-sized fold).
    verification_identities: identities of the pairs (disjoint from the
      training identities), at least 2.
    bin_name: file name of the ``.bin``.
    magic_every: every this many training images (counting from image 0)
      carry the RecordIO magic in a JPEG comment, so their records are split;
      0 disables it.
    quality: JPEG quality.
    seed: everything is a pure function of it.

  Returns:
    `SyntheticFaceFiles`.
  """
  if num_identities < 1 or verification_identities < 2 or num_pairs < 1:
    raise ValueError(
        f'Need num_identities >= 1, verification_identities >= 2 and num_pairs >= 1, got '
        f'{num_identities}, {verification_identities}, {num_pairs}.')
  if image_size < 8:
    raise ValueError(f'image_size must be at least 8, got {image_size}.')
  os.makedirs(directory, exist_ok=True)
  counts = _image_counts(images_per_identity, num_identities, np.random.default_rng([seed, 0]))
  template = lambda i: face_template(np.random.default_rng([seed, 1, i]), image_size)
  view = lambda t, i, j: face_view(t, np.random.default_rng([seed, 2, i, j]))
  header_bytes = len(insightface.pack_record([0, 1.0]))  # What write_face_dataset writes.

  identities, n = [], 0
  for i in range(num_identities):
    t = template(i)
    images = []
    for j in range(counts[i]):
      jpeg = encode_jpeg(view(t, i, j), quality)
      if magic_every and n % magic_every == 0:
        body = header_bytes + comment_position(jpeg) + 4
        jpeg = insert_comment(jpeg, magic_comment(body))
      images.append(jpeg)
      n += 1
    identities.append(images)
  split = insightface.write_face_dataset(directory, identities, (image_size, image_size))

  pairs_rng = np.random.default_rng([seed, 3])
  vt = [template(num_identities + v) for v in range(verification_identities)]
  issame = _lfw_layout(num_pairs)
  jpegs = []
  for p, same in enumerate(issame):
    a = int(pairs_rng.integers(verification_identities))
    b = a if same else int((a + pairs_rng.integers(1, verification_identities))
                           % verification_identities)
    for side, who in enumerate((a, b)):
      jpegs.append(encode_jpeg(view(vt[who], num_identities + who, 2 * p + side), quality))
  bin_path = os.path.join(directory, bin_name)
  insightface.write_bin(bin_path, jpegs, issame)
  return SyntheticFaceFiles(directory, bin_path, counts, split)


def _lfw_layout(num_pairs: int, num_folds: int = 10) -> list[bool]:
  """issame flags: contiguous folds, each same pairs first then different pairs."""
  sizes = np.full(min(num_folds, num_pairs), num_pairs // min(num_folds, num_pairs))
  sizes[:num_pairs % len(sizes)] += 1
  flags: list[bool] = []
  for s in sizes:
    flags += [True] * ((s + 1) // 2) + [False] * (s // 2)
  return flags

