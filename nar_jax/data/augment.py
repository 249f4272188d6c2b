"""On-device normalisation and augmentation (pure JAX, jit-able).

Typical use inside a jitted train step, with a batch of uint8 images::

  x = normalize(images, splits.mean, splits.std)          # float32
  x = augment(key, x, crop_padding=4, flip=True)         # CIFAR's pad-4 crop

`crop_padding` and `flip` decide the shape of the computation, so they are
Python values (static under `jax.jit`): close over them or mark them static,
e.g. ``jax.jit(augment, static_argnames=('crop_padding', 'flip'))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

ArrayLike = jax.typing.ArrayLike


def normalize(
    images: ArrayLike,
    mean: Sequence[float] | ArrayLike,
    std: Sequence[float] | ArrayLike,
) -> jax.Array:
  """Scales uint8 images to [0, 1] and standardises each channel.

  Args:
    images: uint8 (B, H, W, C) (any leading shape works).
    mean: (C,) per-channel mean in [0, 1] units, e.g. `Splits.mean`.
    std: (C,) per-channel standard deviation in [0, 1] units, e.g.
      `Splits.std`.

  Returns:
    float32 array of the same shape: ``(images / 255 - mean) / std``.
  """
  images = jnp.asarray(images)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)
  channels = images.shape[-1]
  if mean.shape != (channels,) or std.shape != (channels,):
    raise ValueError(
        f'mean and std must have shape ({channels},) to match images of '
        f'shape {images.shape}, got {mean.shape} and {std.shape}.')
  return (images.astype(jnp.float32) / 255.0 - mean) / std


def random_crop(key: jax.Array, images: jax.Array,
                padding: int) -> jax.Array:
  """Zero-pads each image by `padding` per side and crops back at random.

  Every example gets its own offset, uniform over the ``(2p+1)^2`` positions,
  so the output is the input shifted by (dy, dx) in [-p, p]^2 with zeros
  shifted in.

  Args:
    key: PRNG key.
    images: (B, H, W, C).
    padding: p >= 0; 0 returns `images` unchanged.

  Returns:
    Array of the same shape and dtype as `images`.
  """
  if padding < 0:
    raise ValueError(f'crop padding must be >= 0, got {padding}.')
  if padding == 0:
    return images
  batch, height, width, channels = images.shape
  padded = jnp.pad(
      images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))
  offsets = jax.random.randint(key, (batch, 2), 0, 2 * padding + 1)

  def crop_one(image, offset):  # (H+2p, W+2p, C), (2,) -> (H, W, C)
    return lax.dynamic_slice(image, (offset[0], offset[1], 0),
                             (height, width, channels))

  return jax.vmap(crop_one)(padded, offsets)


def random_flip(key: jax.Array, images: jax.Array) -> jax.Array:
  """Mirrors each image left-right with probability 1/2.

  Args:
    key: PRNG key.
    images: (B, H, W, C).

  Returns:
    Array of the same shape and dtype; example i is ``images[i]`` or
    ``images[i, :, ::-1]``.
  """
  flip = jax.random.bernoulli(key, 0.5, (images.shape[0],))
  return jnp.where(flip[:, None, None, None], images[:, :, ::-1], images)


def augment(key: jax.Array, images: jax.Array, *, crop_padding: int,
            flip: bool) -> jax.Array:
  """Per-example random crop (after zero padding) and random horizontal flip.

  Apply it after `normalize` to pad with zeros in normalised units (the mean
  colour), as ENAS does for CIFAR-10.

  Args:
    key: PRNG key; the crop and the flip use independent subkeys.
    images: float (B, H, W, C).
    crop_padding: zero padding per side before the random crop; 0 disables
      the crop. Static.
    flip: whether to flip each example left-right with probability 1/2.
      Static.

  Returns:
    Augmented images, same shape and dtype as `images`. With
    ``crop_padding=0, flip=False`` this is the identity.
  """
  images = jnp.asarray(images)
  if images.ndim != 4:
    raise ValueError(
        f'augment expects (B, H, W, C) images, got shape {images.shape}.')
  crop_key, flip_key = jax.random.split(key)
  images = random_crop(crop_key, images, crop_padding)
  if flip:
    images = random_flip(flip_key, images)
  return images
