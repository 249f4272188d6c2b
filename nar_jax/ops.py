"""The operator library: every candidate operator a search-space node can take.

An operator maps an NHWC activation ``(B, H, W, C_in)`` to ``(B, H/s, W/s, C_out)``
(SAME padding, stride ``s``) and always ends with its own BatchNorm, so that every
branch of a supernet node owns its normalisation statistics.

Each operator is described by a *recipe* (:func:`recipe`): an optional pooling window
followed by a list of convolution layers. The Flax module :class:`Operator` is built
from the recipe, and the analytic parameter / MAC counts (:func:`count_op`) are
computed from the same recipe, so the two cannot drift apart.

All convolutions go through :func:`conv2d`, a convolution with a hand-written VJP
whose two gradient convolutions are expressed in the canonical NHWC/HWIO layout.
Inside ``lax.switch`` branches XLA:CPU otherwise leaves the weight-gradient
convolution in a non-canonical layout that falls to a generic loop ~40x slower
(README, "Design notes": convolutions inside switch branches); with this VJP a
convolution costs the same inside a branch as outside it. Values and gradients equal
``lax.conv_general_dilated``'s.

Every operator's BatchNorm is :class:`BatchNorm`: flax ``nn.BatchNorm``'s semantics and
variables with a hand-written backward pass (:func:`batch_norm_train`), which makes the
supernet's gradient ~900 fusions smaller and its compile shorter.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

OP_NAMES: tuple[str, ...] = ('conv3x3', 'conv5x5', 'sep3x3', 'sep5x5', 'max3x3', 'avg3x3')
"""Global operator vocabulary; an architecture stores indices into this tuple."""

_DIMENSION_NUMBERS = ('NHWC', 'HWIO', 'NHWC')
BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

# ---------------------------------------------------------------------------------------
# Convolution with a canonical-layout VJP.
# ---------------------------------------------------------------------------------------


def same_padding(size: int, kernel: int, stride: int) -> tuple[tuple[int, int], int]:
  """TensorFlow-style SAME padding for one spatial dimension.

  Returns:
    ``((pad_low, pad_high), output_size)`` with ``output_size = ceil(size / stride)``.
  """
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return (total // 2, total - total // 2), out


def _forward_conv(x, kernel, stride, groups=1):
  pads = [same_padding(x.shape[d], kernel.shape[d - 1], stride)[0] for d in (1, 2)]
  return lax.conv_general_dilated(
      x, kernel, (stride, stride), pads, dimension_numbers=_DIMENSION_NUMBERS,
      feature_group_count=groups)


def _varying_axes(x) -> frozenset:
  """Mesh axes along which ``x`` varies inside ``shard_map`` (empty outside)."""
  aval = jax.typeof(x)
  axis_type = getattr(aval, 'manual_axis_type', None)  # jax 0.10
  if axis_type is not None:
    return frozenset(axis_type.varying)
  return frozenset(getattr(aval, 'vma', ()))  # earlier and later spellings


def _vary_like(x: jax.Array, param: jax.Array) -> jax.Array:
  """``param`` cast to vary along every mesh axis ``x`` varies along (inside ``shard_map``).

  JAX casts a replicated operand implicitly for built-in ops; a ``custom_vjp`` needs the
  cast explicitly, and the cast's transpose then sums the parameter's cotangent over
  devices.
  """
  missing = tuple(sorted(_varying_axes(x) - _varying_axes(param)))
  return jax.lax.pcast(param, missing, to='varying') if missing else param


def conv2d(x: jax.Array, kernel: jax.Array, stride: int = 1, groups: int = 1) -> jax.Array:
  """SAME convolution, ``x (B, H, W, C_in)``, ``kernel (k, k, C_in/groups, C_out)``.

  Returns ``(B, ceil(H/stride), ceil(W/stride), C_out)``. ``groups`` is 1 (dense) or
  ``C_in == C_out`` (depthwise). Both forms are fast inside ``lax.switch`` branches:

  * dense: ``lax.conv_general_dilated`` with a VJP whose gradient convolutions are
    written in canonical layouts;
  * depthwise: a sum of ``k*k`` shifted, strided slices scaled per channel, which
    XLA fuses into one loop (its grouped convolution is ~3x slower on CPU).

  Inside ``shard_map`` a replicated kernel is first cast to vary like ``x``, as JAX
  does implicitly for built-in ops, so that the kernel's cotangent is summed over
  devices by the cast's transpose.
  """
  if groups != 1:
    if not (groups == x.shape[-1] == kernel.shape[-1] and kernel.shape[2] == 1):
      raise ValueError(f'conv2d supports groups == 1 or depthwise (groups == C_in == C_out); '
                       f'got groups={groups}, input {x.shape}, kernel {kernel.shape}')
    return _depthwise(x, kernel, stride)
  return _conv2d(x, _vary_like(x, kernel), stride)


@functools.partial(jax.checkpoint, static_argnums=(2,))
def _depthwise(x, kernel, stride):
  """Depthwise SAME convolution as ``sum_ij x_pad[:, i::s, j::s] * kernel[i, j]``.

  Rematerialised (``jax.checkpoint``): the backward pass re-slices ``x`` instead of
  keeping the ``k*k`` shifted windows as residuals. Outside a conditional XLA fuses
  those slices anyway; inside a ``lax.switch`` branch every residual becomes a
  materialised branch output (and every *other* branch writes zeros into its slot),
  which made a supernet step ~2x slower than the fixed network's.
  """
  k = kernel.shape[0]
  (ph, out_h), (pw, out_w) = (same_padding(x.shape[d], k, stride) for d in (1, 2))
  padded = jnp.pad(x, ((0, 0), ph, pw, (0, 0)))
  taps = jnp.split(kernel.reshape(k * k, kernel.shape[-1]), k * k)  # one op: k*k (1, C) rows
  out = None
  for i in range(k):
    for j in range(k):
      window = lax.slice(padded, (0, i, j, 0),
                         (x.shape[0], i + (out_h - 1) * stride + 1, j + (out_w - 1) * stride + 1,
                          x.shape[3]), (1, stride, stride, 1))
      term = window * taps[i * k + j]
      out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv2d(x, kernel, stride):
  return _forward_conv(x, kernel, stride, 1)


def _conv2d_fwd(x, kernel, stride):
  return _forward_conv(x, kernel, stride, 1), (x, kernel)


def _conv2d_bwd(stride, residuals, dy):
  x, kernel = residuals
  k = kernel.shape[0]
  pads, outs = zip(*(same_padding(x.shape[d], k, stride) for d in (1, 2)))
  sizes = (x.shape[1], x.shape[2])

  # Weight gradient: a convolution of x (batch <- C_in, features <- B) with dy as the
  # kernel (I <- B, O <- C_out) dilated by the stride. High padding may be negative: it
  # crops the rows the forward pass never read.
  w_pads = [(p[0], k + (o - 1) * stride - s - p[0]) for p, o, s in zip(pads, outs, sizes)]
  x_t = jnp.transpose(x, (3, 1, 2, 0))          # (C_in, H, W, B)
  dy_t = jnp.transpose(dy, (1, 2, 0, 3))        # (H_out, W_out, B, C_out)
  d_kernel = lax.conv_general_dilated(
      x_t, dy_t, (1, 1), w_pads, rhs_dilation=(stride, stride),
      dimension_numbers=_DIMENSION_NUMBERS)
  d_kernel = jnp.transpose(d_kernel, (1, 2, 0, 3)).astype(kernel.dtype)  # (k, k, C_in/g, C_out)

  # Input gradient: the stride-dilated dy convolved with the spatially flipped kernel.
  flipped = jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2))  # (k, k, C_out, C_in)
  x_pads = []
  for p, o, s in zip(pads, outs, sizes):
    low = k - 1 - p[0]
    x_pads.append((low, s + k - 1 - ((o - 1) * stride + 1) - low))
  dx = lax.conv_general_dilated(
      dy, flipped.astype(dy.dtype), (1, 1), x_pads, lhs_dilation=(stride, stride),
      dimension_numbers=_DIMENSION_NUMBERS)
  return dx.astype(x.dtype), d_kernel


_conv2d.defvjp(_conv2d_fwd, _conv2d_bwd)


class Conv(nn.Module):
  """SAME convolution without bias (a BatchNorm always follows), using :func:`conv2d`."""

  features: int
  kernel_size: int
  stride: int = 1
  groups: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[-1]
    if in_features % self.groups:
      raise ValueError(f'input channels {in_features} not divisible by groups {self.groups}')
    # He init over fan-out; a depthwise filter's fan (in and out) is its k*k window.
    fan = 'fan_in' if self.groups > 1 else 'fan_out'
    kernel = self.param(
        'kernel', nn.initializers.variance_scaling(2.0, fan, 'normal'),
        (self.kernel_size, self.kernel_size, in_features // self.groups, self.features),
        jnp.float32)
    return conv2d(x.astype(self.dtype), kernel.astype(self.dtype), self.stride, self.groups)


# ---------------------------------------------------------------------------------------
# BatchNorm with a hand-written VJP.
# ---------------------------------------------------------------------------------------


def _moments(xf: jax.Array, axis_name: str | None) -> tuple[jax.Array, jax.Array]:
  """Per-channel mean and biased variance ``(C,)`` of float32 ``xf (..., C)``.

  ``E[x^2] - E[x]^2`` clipped at 0, both means in one ``pmean`` over ``axis_name``
  (flax's ``use_fast_variance``).
  """
  axes = tuple(range(xf.ndim - 1))
  moments = jnp.stack([xf.mean(axes), jnp.square(xf).mean(axes)])
  if axis_name is not None:
    moments = lax.pmean(moments, axis_name)
  return moments[0], jnp.maximum(moments[1] - jnp.square(moments[0]), 0.0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _bn_train(x, scale, bias, epsilon, axis_name, dtype):
  return _bn_train_fwd(x, scale, bias, epsilon, axis_name, dtype)[0]


def _bn_train_fwd(x, scale, bias, epsilon, axis_name, dtype):
  xf = x.astype(jnp.float32)
  mean, var = _moments(xf, axis_name)
  inv = lax.rsqrt(var + epsilon)
  y = ((xf - mean) * (inv * scale) + bias).astype(dtype)
  return (y, mean, var), (x, mean, inv, scale)


def _bn_train_bwd(epsilon, axis_name, dtype, residuals, cotangents):
  """The textbook BatchNorm backward: two per-channel sums, one elementwise pass.

  ``dx = scale * inv * (dy - E[dy] - x_hat * E[dy * x_hat]) + (dmean + 2 dvar (x - mean)) / N``
  with the expectations over the ``N`` examples and positions of every device.
  """
  del epsilon, dtype
  x, mean, inv, scale = residuals
  dy, d_mean, d_var = cotangents
  xf = x.astype(jnp.float32)
  g = dy.astype(jnp.float32)
  centered = xf - mean
  x_hat = centered * inv
  axes = tuple(range(x.ndim - 1))
  sums = jnp.stack([g.sum(axes), (g * x_hat).sum(axes)])  # local d_bias, d_scale
  count = x.size // x.shape[-1]
  if axis_name is not None:
    count = count * lax.psum(1, axis_name)
    expectations = lax.psum(sums, axis_name) / count
  else:
    expectations = sums / count
  dx = (scale * inv) * (g - expectations[0] - x_hat * expectations[1])
  dx = dx + (d_mean + 2.0 * d_var * centered) / count
  return dx.astype(x.dtype), sums[1], sums[0]


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float,
                     axis_name: str | None, dtype: Any) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm of ``x (..., C)`` over all but the channel axis.

  Returns ``(y, mean, var)``: ``y = (x - mean) * rsqrt(var + epsilon) * scale + bias``
  in ``dtype``, and the float32 batch mean and biased variance ``(C,)`` (synchronised
  over ``axis_name`` when given). Statistics and normalisation run in float32, as in
  flax's ``nn.BatchNorm``, whose values and gradients these equal; the backward pass
  is written by hand (two fused per-channel sums and one elementwise pass instead of
  autodiff's ~24 fusions per BatchNorm), which shortens the supernet step's compile.
  Inside ``shard_map``, replicated ``scale`` / ``bias`` are cast to vary like ``x``
  (see :func:`conv2d`) so that their cotangents are summed over devices.
  """
  return _bn_train(x, _vary_like(x, scale), _vary_like(x, bias), epsilon, axis_name, dtype)


class BatchNorm(nn.Module):
  """BatchNorm over the last (channel) axis with flax ``nn.BatchNorm``'s semantics.

  Same variables (``params``: ``scale``, ``bias``; ``batch_stats``: ``mean``, ``var``,
  all float32 ``(C,)``), running averages ``momentum * old + (1 - momentum) * batch``
  (biased variance), statistics synchronised over ``axis_name`` in training, none of
  that while initialising. Training mode uses :func:`batch_norm_train`.
  """

  use_running_average: bool
  axis_name: str | None = None
  momentum: float = BN_MOMENTUM
  epsilon: float = BN_EPSILON
  dtype: Any = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = (x.shape[-1],)
    ra_mean = self.variable('batch_stats', 'mean', lambda: jnp.zeros(features, jnp.float32))
    ra_var = self.variable('batch_stats', 'var', lambda: jnp.ones(features, jnp.float32))
    scale = self.param('scale', self.scale_init, features, jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, features, jnp.float32)
    if self.use_running_average:
      mul = lax.rsqrt(ra_var.value + self.epsilon) * scale
      return ((x.astype(jnp.float32) - ra_mean.value) * mul + bias).astype(self.dtype)
    initializing = self.is_initializing()
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon,
                                    None if initializing else self.axis_name, self.dtype)
    if not initializing:
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


def batch_norm(train: bool, axis_name: str | None, dtype: Any, name: str | None = None,
               scale_init=nn.initializers.ones, epsilon: float = BN_EPSILON) -> BatchNorm:
  """The project's BatchNorm: momentum 0.9, eps 1e-5 (IR networks: 2e-5), float32 statistics."""
  return BatchNorm(use_running_average=not train, axis_name=axis_name if train else None,
                   momentum=BN_MOMENTUM, epsilon=epsilon, dtype=dtype, scale_init=scale_init,
                   name=name)


# ---------------------------------------------------------------------------------------
# Operator recipes: the single definition behind both the modules and the counts.
# ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ConvLayer:
  """One bias-free convolution of a recipe."""

  kernel: int
  in_channels: int
  out_channels: int
  stride: int = 1
  groups: int = 1


@dataclasses.dataclass(frozen=True)
class Recipe:
  """An operator: optional pooling (kind, window, stride), then convs, then BatchNorm."""

  pool: Literal['max', 'avg'] | None
  pool_window: int
  pool_stride: int
  convs: tuple[ConvLayer, ...]
  out_channels: int


def check_op_name(op: str) -> None:
  """Raises ``ValueError`` naming the known ops if ``op`` is not one of them."""
  if op not in OP_NAMES:
    raise ValueError(f'unknown op {op!r}; known ops: {", ".join(OP_NAMES)}')


def recipe(op: str, in_channels: int, out_channels: int, stride: int) -> Recipe:
  """The layers of operator ``op`` at a node mapping ``in_channels -> out_channels``.

  * ``convKxK``: one KxK convolution carrying the stride.
  * ``sepKxK``: depthwise KxK (carrying the stride) then pointwise 1x1 (channel change).
  * ``max3x3`` / ``avg3x3``: 3x3 pooling carrying the stride, then a 1x1 projection
    only when the channel count changes.
  """
  check_op_name(op)
  if op.startswith('conv'):
    k = int(op[4])
    return Recipe(None, 0, 0, (ConvLayer(k, in_channels, out_channels, stride),), out_channels)
  if op.startswith('sep'):
    k = int(op[3])
    return Recipe(None, 0, 0, (
        ConvLayer(k, in_channels, in_channels, stride, groups=in_channels),
        ConvLayer(1, in_channels, out_channels),
    ), out_channels)
  kind = 'max' if op.startswith('max') else 'avg'
  projection = (ConvLayer(1, in_channels, out_channels),) if in_channels != out_channels else ()
  return Recipe(kind, 3, stride, projection, out_channels)


@dataclasses.dataclass(frozen=True)
class Counts:
  """Trainable parameters and multiply-accumulates (convs and dense layers only)."""

  params: int
  macs: int

  def __add__(self, other: 'Counts') -> 'Counts':
    return Counts(self.params + other.params, self.macs + other.macs)


ZERO = Counts(0, 0)


def count_conv(layer: ConvLayer, out_hw: tuple[int, int]) -> Counts:
  """Counts of one bias-free conv producing an ``out_hw`` map."""
  weights = layer.kernel * layer.kernel * (layer.in_channels // layer.groups) * layer.out_channels
  return Counts(weights, weights * out_hw[0] * out_hw[1])


def count_bn(channels: int) -> Counts:
  """BatchNorm scale and bias (running statistics are not trainable)."""
  return Counts(2 * channels, 0)


def count_op(op: str, in_channels: int, out_channels: int, stride: int,
             in_hw: tuple[int, int]) -> tuple[Counts, tuple[int, int]]:
  """Analytic counts of operator ``op`` on an ``in_hw`` input; returns (counts, out_hw)."""
  r = recipe(op, in_channels, out_channels, stride)
  hw = in_hw
  total = ZERO
  if r.pool is not None:
    hw = tuple(same_padding(s, r.pool_window, r.pool_stride)[1] for s in hw)
  for layer in r.convs:
    hw = tuple(same_padding(s, layer.kernel, layer.stride)[1] for s in hw)
    total += count_conv(layer, hw)
  return total + count_bn(r.out_channels), hw


def _pool(x, kind, window, stride):
  pads = [same_padding(x.shape[d], window, stride)[0] for d in (1, 2)]
  if kind == 'max':
    return nn.max_pool(x, (window, window), (stride, stride), pads)
  return nn.avg_pool(x, (window, window), (stride, stride), pads, count_include_pad=False)


class Operator(nn.Module):
  """One candidate operator: :func:`recipe` layers followed by BatchNorm (no activation)."""

  op: str
  out_channels: int
  stride: int = 1
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    r = recipe(self.op, x.shape[-1], self.out_channels, self.stride)
    if r.pool is not None:
      x = _pool(x, r.pool, r.pool_window, r.pool_stride)
    for i, layer in enumerate(r.convs):
      x = Conv(layer.out_channels, layer.kernel, layer.stride, layer.groups, self.dtype,
               name=f'conv{i}')(x)
    return batch_norm(train, self.bn_axis_name, self.dtype, name='bn', epsilon=self.bn_epsilon)(x)
