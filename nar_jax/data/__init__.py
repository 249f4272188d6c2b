"""Datasets in host memory and on-device augmentation.

`load_splits` returns a dataset's train / valid / test splits as NumPy arrays;
`batches` yields deterministic minibatches; `normalize` and `augment` run on
the device inside jitted steps. Face data (insightface's ``train.rec`` and
verification ``.bin`` files) is decoded lazily: `load_face_splits` returns
splits of `LazyImages` (see `faces`, `insightface`, `synthetic_faces`).
ImageNet (TFDS ``imagenet2012``, read without TensorFlow) is streamed, not
loaded: `imagenet.batches` decodes and crops each epoch in a grain pipeline, and
`imagenet.ImageNetSplit` is that pipeline as a `StreamedSplit`, which `batches` and
`num_batches` hand to its own methods (see `imagenet`, `fake_imagenet`).
"""

from nar_jax.data.augment import augment
from nar_jax.data.augment import normalize
from nar_jax.data.augment import random_crop
from nar_jax.data.augment import random_flip
from nar_jax.data.faces import LazyImages
from nar_jax.data.faces import load_face_splits
from nar_jax.data.faces import load_verification_set
from nar_jax.data.prefetch import prefetch
from nar_jax.data.faces import VerificationSet
from nar_jax.data.insightface import FaceDataError
from nar_jax.data.sources import batches
from nar_jax.data.sources import channel_stats
from nar_jax.data.sources import DatasetNotPreparedError
from nar_jax.data.sources import load_splits
from nar_jax.data.sources import merge
from nar_jax.data.sources import num_batches
from nar_jax.data.sources import Split
from nar_jax.data.sources import Splits
from nar_jax.data.sources import StreamedSplit

__all__ = [
    'DatasetNotPreparedError',
    'FaceDataError',
    'LazyImages',
    'Split',
    'Splits',
    'StreamedSplit',
    'VerificationSet',
    'augment',
    'batches',
    'channel_stats',
    'load_face_splits',
    'load_splits',
    'load_verification_set',
    'merge',
    'normalize',
    'num_batches',
    'prefetch',
    'random_crop',
    'random_flip',
]
