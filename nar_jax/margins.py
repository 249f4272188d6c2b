"""Additive angular / cosine margins for face recognition (ArcFace, CosFace, combined).

A margin head compares an L2-normalised embedding with L2-normalised class weights,
so its outputs are cosines ``cos(theta_j)`` in [-1, 1]. Training replaces the target
class's cosine by insightface's combined margin

    cos(m1 * theta_y + m2) - m3

and multiplies every logit by the scale ``s``: ArcFace is ``(m1, m2, m3) = (1, 0.5, 0)``,
CosFace ``(1, 0, 0.35)``, insightface's combined margins e.g. ``(1, 0.3, 0.2)``.

For ``m1 == 1`` the margin is computed as ``cos * cos(m2) - sin * sin(m2)`` with
``sin = sqrt(1 - cos^2)``, and the gradient flows through it (no ``stop_gradient``,
unlike some public ports). Where ``theta + m2`` would pass ``pi``, i.e. where
``cos(theta) <= cos(pi - m2)``, the target is ``cos(theta) - sin(pi - m2) * m2`` instead
(ArcFace's fallback, which keeps the target logit decreasing in ``theta``). For
``m1 != 1`` the angle is ``arccos(cos)`` and, as in insightface's combined margin,
there is no fallback.
"""

from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

SIN_FLOOR = 1e-12
"""Lower clip of ``1 - cos^2`` before the square root: no infinite gradient at |cos| = 1."""
ARCCOS_CLIP = 1e-7
"""``arccos`` is evaluated on ``cos`` clipped to [-1 + ARCCOS_CLIP, 1 - ARCCOS_CLIP]."""
NORM_EPS = 1e-12
"""Floor of the squared norm in :func:`l2_normalize`."""


@dataclasses.dataclass(frozen=True)
class Margin:
  """The combined margin ``s * (cos(m1 * theta + m2) - m3)`` on the target logit.

  Attributes:
    scale: ``s``, multiplies every logit (64 in ArcFace).
    m1: multiplicative angular margin (1 for none).
    m2: additive angular margin in radians, in [0, pi) (ArcFace 0.5).
    m3: additive cosine margin (CosFace 0.35).
  """

  scale: float = 64.0
  m1: float = 1.0
  m2: float = 0.5
  m3: float = 0.0

  def __post_init__(self):
    if not self.scale > 0:
      raise ValueError(f'margin scale s must be positive, got {self.scale}')
    if not self.m1 > 0:
      raise ValueError(f'multiplicative margin m1 must be positive, got {self.m1}')
    if not 0 <= self.m2 < math.pi:
      raise ValueError(f'angular margin m2 must lie in [0, pi), got {self.m2}')
    if not self.m3 >= 0:
      raise ValueError(f'cosine margin m3 must be non-negative, got {self.m3}')

  @classmethod
  def arcface(cls, scale: float = 64.0, m: float = 0.5) -> 'Margin':
    """ArcFace: ``s * cos(theta + m)``."""
    return cls(scale, 1.0, m, 0.0)

  @classmethod
  def cosface(cls, scale: float = 64.0, m: float = 0.35) -> 'Margin':
    """CosFace: ``s * (cos(theta) - m)``."""
    return cls(scale, 1.0, 0.0, m)


def target_cosine(cosine: jax.Array, margin: Margin) -> jax.Array:
  """``cos(m1 * theta + m2) - m3`` elementwise for ``cosine = cos(theta)`` (any shape).

  ``m1 == 1`` uses ``cos * cos(m2) - sin * sin(m2)`` and ArcFace's fallback
  ``cos - sin(pi - m2) * m2`` where ``cos <= cos(pi - m2)``; ``m1 != 1`` uses
  ``arccos`` without a fallback. Differentiable everywhere, finite at ``|cos| = 1``.
  """
  cosine = jnp.asarray(cosine)
  if margin.m1 == 1.0:
    sine = jnp.sqrt(jnp.maximum(1.0 - cosine * cosine, SIN_FLOOR))
    shifted = cosine * math.cos(margin.m2) - sine * math.sin(margin.m2)
    fallback = cosine - math.sin(math.pi - margin.m2) * margin.m2
    body = jnp.where(cosine > math.cos(math.pi - margin.m2), shifted, fallback)
  else:
    theta = jnp.arccos(jnp.clip(cosine, -1.0 + ARCCOS_CLIP, 1.0 - ARCCOS_CLIP))
    body = jnp.cos(margin.m1 * theta + margin.m2)
  return body - margin.m3


def margin_logits(cosine: jax.Array, labels: jax.Array | None, margin: Margin) -> jax.Array:
  """Scaled logits ``(B, C)`` from head cosines ``(B, C)``.

  With ``labels (B,)`` (int class indices) the target class's cosine is replaced by
  :func:`target_cosine` (training); with ``labels=None`` the logits are plain
  ``s * cos(theta)`` (accuracy, search rewards). Labels outside ``[0, C)`` get no
  margin (they cannot be checked under ``jit``; validate them upstream).
  """
  if labels is None:
    return margin.scale * cosine
  if labels.shape != cosine.shape[:1]:
    raise ValueError(f'labels {labels.shape} do not match cosines {cosine.shape}: '
                     'expected one class index per row')
  is_target = jnp.arange(cosine.shape[-1]) == labels[:, None]
  target = target_cosine(jnp.take_along_axis(cosine, labels[:, None], axis=-1), margin)
  return margin.scale * jnp.where(is_target, target, cosine)


def margin_loss(cosine: jax.Array, labels: jax.Array, margin: Margin) -> jax.Array:
  """Mean softmax cross entropy of :func:`margin_logits` (the ArcFace / CosFace loss)."""
  logits = margin_logits(cosine, labels, margin)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """``x / ||x||`` along ``axis`` (a zero vector stays zero)."""
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), NORM_EPS))


class CosineHead(nn.Module):
  """Cosines between L2-normalised features and L2-normalised class weights.

  Parameter ``weight (num_classes, D)`` (insightface's ``fc7_weight``), initialised
  normal with standard deviation 0.01. Computes in float32 whatever the input dtype.
  """

  num_classes: int

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    """``features (B, D)`` -> cosines ``(B, num_classes)`` in [-1, 1]."""
    weight = self.param('weight', nn.initializers.normal(0.01),
                        (self.num_classes, features.shape[-1]), jnp.float32)
    features = l2_normalize(features.astype(jnp.float32))
    return features @ l2_normalize(weight).T
