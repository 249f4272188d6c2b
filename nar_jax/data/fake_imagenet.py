"""A tiny ``imagenet2012`` in the real TFDS format, written without TensorFlow.

`write_fake_imagenet` runs TFDS's own ``imagenet2012`` builder (its version, its
features: the image as JPEG bytes, a 1000-class label, the file name; its
``array_record`` shards) on generated JPEGs instead of the ILSVRC tars, so
`nar_jax.data.imagenet.open_split` reads it exactly as it reads a real copy. TFDS
stores an image given as a file object byte for byte (no re-encoding), which is why
writing needs no TensorFlow. It backs the tests and the input benchmark.

The JPEGs have varied sizes, smooth random content with some noise (so they compress
about as much as photographs), and every seventh is greyscale, as some ImageNet
files are. Everything is a pure function of the seed.
"""

from __future__ import annotations

import io
from typing import NamedTuple

import numpy as np
from PIL import Image

from nar_jax.data import imagenet

_NOISE = 12.0  # pixel units
_GREY_EVERY = 7


class FakeImage(NamedTuple):
  """One written example: its ``file_name``, ``label``, decoded ``height x width`` and
  the ``jpeg`` bytes stored."""

  file_name: str
  label: int
  height: int
  width: int
  jpeg: bytes


def fake_jpeg(rng: np.random.Generator, height: int, width: int, grey: bool = False,
              quality: int = 90) -> bytes:
  """A JPEG of a smooth random ``height x width`` picture plus noise (RGB or greyscale)."""
  channels = 1 if grey else 3
  coarse = rng.uniform(0, 255, (4, 4, channels)).astype(np.float32)
  smooth = np.asarray(Image.fromarray(coarse[..., 0] if grey else coarse.astype(np.uint8))
                      .resize((width, height), Image.BICUBIC), np.float32)
  pixels = smooth + _NOISE * rng.standard_normal(smooth.shape)
  image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), 'L' if grey else 'RGB')
  f = io.BytesIO()
  image.save(f, format='JPEG', quality=quality)
  return f.getvalue()


def write_fake_imagenet(data_dir: str, sizes: dict[str, int] | None = None,
                        num_classes: int = 4, sides: tuple[int, int] = (40, 120),
                        seed: int = 0) -> dict[str, list[FakeImage]]:
  """Prepares a fake ``imagenet2012`` in ``data_dir`` (as ``tfds build`` would).

  Args:
    data_dir: the TFDS data directory; the copy lands in
      ``<data_dir>/imagenet2012/<version>/``.
    sizes: examples per split (default 20 train, 10 validation).
    num_classes: labels used, ``0 .. num_classes - 1`` in turn (the label feature
      still has ImageNet's 1000 classes).
    sides: each image's height and width are drawn uniformly in this range.
    seed: the images and their sizes.

  Returns:
    ``{split: [FakeImage, ...]}`` in writing order (TFDS stores its own order).
  """
  # pylint: disable-next=g-import-not-at-top
  from tensorflow_datasets.datasets.imagenet2012 import imagenet2012_dataset_builder as real

  sizes = {'train': 20, 'validation': 10} if sizes is None else dict(sizes)
  unknown = set(sizes) - set(imagenet.SPLITS)
  if unknown:
    raise ValueError(f'unknown splits {sorted(unknown)}; imagenet2012 has {imagenet.SPLITS}')
  made = {}
  for s, (split, count) in enumerate(sorted(sizes.items())):
    rng = np.random.default_rng([seed, s])
    made[split] = []
    for i in range(count):
      label = i % num_classes
      h, w = (int(v) for v in rng.integers(sides[0], sides[1] + 1, 2))
      name = (f'n{label:08d}_{i}.JPEG' if split == 'train'
              else f'ILSVRC2012_val_{i + 1:08d}.JPEG')
      jpeg = fake_jpeg(rng, h, w, grey=i % _GREY_EVERY == _GREY_EVERY - 1)
      made[split].append(FakeImage(name, label, h, w, jpeg))

  class FakeImagenet2012(real.Builder, skip_registration=True):
    """The real builder with generated examples instead of the ILSVRC tars."""

    name = imagenet.NAME  # Written where tfds.data_source('imagenet2012') looks.

    @classmethod
    def get_metadata(cls):
      return real.Builder.get_metadata()  # Read beside the real builder's code.

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate(split) for split in made}

    def _generate(self, split):
      for image in made[split]:
        yield image.file_name, {'image': io.BytesIO(image.jpeg), 'label': image.label,
                                'file_name': image.file_name}

  builder = FakeImagenet2012(data_dir=data_dir, file_format='array_record')
  builder.download_and_prepare()
  return made
