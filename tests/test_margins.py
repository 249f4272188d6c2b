"""Tests for nar_jax.margins: combined margin values and gradients, logits, loss, cosine head.

The reference is a direct float64 NumPy implementation of insightface's formula through
the angle, ``cos(m1 * arccos(c) + m2) - m3`` (with ArcFace's fallback for ``m1 == 1``),
and its derivatives are central finite differences of that reference: an independent
route from the implementation's ``cos * cos(m) - sin * sin(m)`` and autodiff.
"""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import margins
from nar_jax.margins import Margin

ARCFACE = Margin.arcface()
COSFACE = Margin.cosface()
COMBINED = Margin(64.0, 1.0, 0.3, 0.2)      # insightface's ArcFace + CosFace combination
MULTIPLICATIVE = Margin(64.0, 0.9, 0.4, 0.15)
ALL_MARGINS = [ARCFACE, COSFACE, COMBINED, MULTIPLICATIVE]
FD_STEP = 1e-6


def reference_target(c, margin: Margin):
  """float64 NumPy ``cos(m1 * theta + m2) - m3`` with ArcFace's fallback (``m1 == 1`` only)."""
  c = np.asarray(c, np.float64)
  body = np.cos(margin.m1 * np.arccos(c) + margin.m2)
  if margin.m1 == 1.0:
    threshold = math.cos(math.pi - margin.m2)
    body = np.where(c > threshold, body, c - math.sin(math.pi - margin.m2) * margin.m2)
  return body - margin.m3


def reference_derivative(c, margin: Margin):
  """Central finite difference of :func:`reference_target`."""
  c = np.asarray(c, np.float64)
  return (reference_target(c + FD_STEP, margin) - reference_target(c - FD_STEP, margin)) / (
      2 * FD_STEP)


def _points(margin: Margin) -> np.ndarray:
  """Cosines spread over (-1, 1), with points just either side of ArcFace's threshold
  (kept further than the finite-difference step from it)."""
  threshold = math.cos(math.pi - margin.m2)
  grid = np.array([-0.999, -0.95, -0.6, -0.2, 0.0, 0.3, 0.7, 0.95, 0.999])
  near = np.array([threshold - 0.01, threshold - 1e-4, threshold + 1e-4, threshold + 0.01])
  return np.sort(np.concatenate([grid, near[(near > -0.9999) & (near < 0.9999)]]))


@pytest.mark.parametrize('margin', ALL_MARGINS, ids=['arcface', 'cosface', 'combined', 'm1'])
def test_target_cosine_values_equal_reference(margin):
  c = _points(margin)
  got = jax.jit(margins.target_cosine, static_argnums=1)(jnp.asarray(c, jnp.float32), margin)
  np.testing.assert_allclose(got, reference_target(c, margin), rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize('margin', ALL_MARGINS, ids=['arcface', 'cosface', 'combined', 'm1'])
def test_target_cosine_gradients_equal_reference(margin):
  """The gradient flows through the margin on both sides of the threshold."""
  c = _points(margin)
  grad = jax.jit(jax.vmap(jax.grad(margins.target_cosine), in_axes=(0, None)), static_argnums=1)
  got = grad(jnp.asarray(c, jnp.float32), margin)
  np.testing.assert_allclose(got, reference_derivative(c, margin), rtol=2e-3, atol=1e-4)


def test_arcface_fallback_on_both_sides_of_the_threshold():
  """Hand values at m = 0.5: cos(theta + m) above cos(pi - m) = -0.8776, the fallback
  cos(theta) - sin(pi - m) * m (slope 1) at and below it."""
  m = 0.5
  threshold = math.cos(math.pi - m)
  above, below = threshold + 0.05, threshold - 0.05
  c = jnp.asarray([above, threshold, below], jnp.float32)
  got = margins.target_cosine(c, ARCFACE)
  expected = [math.cos(math.acos(above) + m), threshold - math.sin(math.pi - m) * m,
              below - math.sin(math.pi - m) * m]
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  grads = jax.vmap(jax.grad(margins.target_cosine), in_axes=(0, None))(c, ARCFACE)
  # Above: d/dc cos(acos(c) + m) = cos(m) + c sin(m) / sqrt(1 - c^2); below: 1.
  slope_above = math.cos(m) + above * math.sin(m) / math.sqrt(1 - above ** 2)
  np.testing.assert_allclose(grads, [slope_above, 1.0, 1.0], rtol=1e-4)
  # A port that stops the gradient through the margin would give 0 (or 1) above it.
  assert abs(slope_above - 1.0) > 0.5


@pytest.mark.parametrize('margin', ALL_MARGINS, ids=['arcface', 'cosface', 'combined', 'm1'])
def test_target_cosine_finite_at_the_ends(margin):
  c = jnp.asarray([-1.0, 1.0], jnp.float32)
  values, grads = jax.vmap(jax.value_and_grad(margins.target_cosine), in_axes=(0, None))(c, margin)
  chex.assert_tree_all_finite((values, grads))
  np.testing.assert_allclose(values, reference_target(np.asarray(c), margin), atol=1e-3)


def test_cosface_is_a_constant_shift():
  c = jnp.linspace(-1.0, 1.0, 11)
  np.testing.assert_allclose(margins.target_cosine(c, COSFACE), c - 0.35, atol=1e-6)
  grads = jax.vmap(jax.grad(margins.target_cosine), in_axes=(0, None))(c, COSFACE)
  np.testing.assert_allclose(grads, 1.0, atol=1e-6)


# ---------------------------------------------------------------------------
# Logits and loss.


def _cosines(shape, seed):
  return jnp.asarray(np.random.default_rng(seed).uniform(-0.99, 0.99, shape), jnp.float32)


def test_margin_logits_change_only_the_target():
  cos = _cosines((6, 5), 0)
  labels = jnp.asarray([0, 1, 2, 3, 4, 2])
  logits = margins.margin_logits(cos, labels, ARCFACE)
  chex.assert_shape(logits, (6, 5))
  expected = 64.0 * np.asarray(cos, np.float64)
  rows = np.arange(6)
  expected[rows, labels] = 64.0 * reference_target(np.asarray(cos)[rows, labels], ARCFACE)
  np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-4)


def test_margin_logits_without_labels_are_scaled_cosines():
  cos = _cosines((3, 4), 1)
  for margin in ALL_MARGINS:
    np.testing.assert_allclose(margins.margin_logits(cos, None, margin), margin.scale * cos,
                               rtol=1e-6)
  small = Margin(scale=10.0)
  np.testing.assert_allclose(margins.margin_logits(cos, None, small), 10.0 * cos, rtol=1e-6)


@pytest.mark.parametrize('margin', [ARCFACE, COMBINED], ids=['arcface', 'combined'])
def test_margin_loss_and_gradient_equal_reference(margin):
  """Loss and d loss / d cosines against float64 NumPy: softmax cross entropy of the
  margin logits, chain rule through the reference margin derivative at the targets."""
  # Rows 0-1 put the target below ArcFace's threshold (fallback), the rest above.
  cos = np.asarray(_cosines((5, 7), 2), np.float64)
  labels = np.array([1, 3, 0, 6, 2])
  cos[0, 1], cos[1, 3] = -0.95, -0.9
  cos32 = jnp.asarray(cos, jnp.float32)
  cos = np.asarray(cos32, np.float64)  # the exact float32 inputs
  rows = np.arange(5)
  logits = margin.scale * cos
  logits[rows, labels] = margin.scale * reference_target(cos[rows, labels], margin)
  shifted = logits - logits.max(axis=1, keepdims=True)
  prob = np.exp(shifted) / np.exp(shifted).sum(axis=1, keepdims=True)
  loss = -np.mean(np.log(prob[rows, labels]))
  onehot = np.eye(7)[labels]
  d_logits = (prob - onehot) / 5
  d_cos = margin.scale * d_logits
  d_cos[rows, labels] *= reference_derivative(cos[rows, labels], margin)

  got_loss, got_grad = jax.jit(jax.value_and_grad(margins.margin_loss), static_argnums=2)(
      cos32, jnp.asarray(labels), margin)
  np.testing.assert_allclose(got_loss, loss, rtol=1e-4)
  np.testing.assert_allclose(got_grad, d_cos, rtol=2e-3, atol=1e-5)


def test_margin_logits_label_shape_error():
  with pytest.raises(ValueError, match=r'labels \(3,\) do not match cosines \(2, 4\)'):
    margins.margin_logits(jnp.zeros((2, 4)), jnp.zeros((3,), jnp.int32), ARCFACE)


@pytest.mark.parametrize('kwargs,pattern', [
    (dict(scale=0.0), 'scale s must be positive'),
    (dict(m1=0.0), 'm1 must be positive'),
    (dict(m2=-0.1), r'm2 must lie in \[0, pi\)'),
    (dict(m2=4.0), r'm2 must lie in \[0, pi\)'),
    (dict(m3=-0.2), 'm3 must be non-negative'),
])
def test_margin_argument_errors(kwargs, pattern):
  with pytest.raises(ValueError, match=pattern):
    Margin(**kwargs)


def test_presets():
  assert Margin.arcface() == Margin(64.0, 1.0, 0.5, 0.0) == Margin()
  assert Margin.cosface() == Margin(64.0, 1.0, 0.0, 0.35)
  assert Margin.arcface(32.0, 0.4) == Margin(32.0, 1.0, 0.4, 0.0)


# ---------------------------------------------------------------------------
# Cosine head.


def test_cosine_head_equals_normalised_dot_product():
  rng = np.random.default_rng(3)
  features = rng.standard_normal((4, 6)).astype(np.float32)
  head = margins.CosineHead(5)
  variables = head.init(jax.random.key(0), jnp.asarray(features))
  chex.assert_shape(variables['params']['weight'], (5, 6))
  weight = rng.standard_normal((5, 6)).astype(np.float32)
  cos = head.apply({'params': {'weight': jnp.asarray(weight)}}, jnp.asarray(features))
  expected = (features / np.linalg.norm(features, axis=1, keepdims=True)) @ (
      weight / np.linalg.norm(weight, axis=1, keepdims=True)).T
  np.testing.assert_allclose(cos, expected, rtol=1e-5, atol=1e-6)
  # Invariant to the scale of a feature (and of a class weight).
  scaled = head.apply({'params': {'weight': jnp.asarray(weight * 3.0)}},
                      jnp.asarray(features * np.array([[0.1], [1.0], [7.0], [100.0]], np.float32)))
  np.testing.assert_allclose(scaled, expected, rtol=1e-5, atol=1e-6)
  assert cos.dtype == jnp.float32


def test_l2_normalize_keeps_zero_vectors_finite():
  x = jnp.asarray([[3.0, 4.0], [0.0, 0.0]])
  np.testing.assert_allclose(margins.l2_normalize(x), [[0.6, 0.8], [0.0, 0.0]], rtol=1e-6)
  grads = jax.grad(lambda x: margins.l2_normalize(x).sum())(x)
  chex.assert_tree_all_finite(grads)
