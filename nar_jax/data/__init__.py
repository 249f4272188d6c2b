"""Datasets in host memory and on-device augmentation.

`load_splits` returns a dataset's train / valid / test splits as NumPy arrays;
`batches` yields deterministic minibatches; `normalize` and `augment` run on
the device inside jitted steps.
"""

from nar_jax.data.augment import augment
from nar_jax.data.augment import normalize
from nar_jax.data.augment import random_crop
from nar_jax.data.augment import random_flip
from nar_jax.data.sources import batches
from nar_jax.data.sources import channel_stats
from nar_jax.data.sources import DatasetNotPreparedError
from nar_jax.data.sources import load_splits
from nar_jax.data.sources import merge
from nar_jax.data.sources import num_batches
from nar_jax.data.sources import Split
from nar_jax.data.sources import Splits

__all__ = [
    'DatasetNotPreparedError',
    'Split',
    'Splits',
    'augment',
    'batches',
    'channel_stats',
    'load_splits',
    'merge',
    'normalize',
    'num_batches',
    'random_crop',
    'random_flip',
]
