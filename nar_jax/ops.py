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
from typing import Any, Literal, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
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


def pool(x: jax.Array, kind: Literal['max', 'avg'], window: int, stride: int) -> jax.Array:
  """SAME ``window x window`` max or average pooling of ``x (B, H, W, C)`` at ``stride``
  (the average over the valid pixels only); ``(B, ceil(H/stride), ceil(W/stride), C)``."""
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
      x = pool(x, r.pool, r.pool_window, r.pool_stride)
    for i, layer in enumerate(r.convs):
      x = Conv(layer.out_channels, layer.kernel, layer.stride, layer.groups, self.dtype,
               name=f'conv{i}')(x)
    return batch_norm(train, self.bn_axis_name, self.dtype, name='bn', epsilon=self.bn_epsilon)(x)


# ---------------------------------------------------------------------------------------
# Branch bodies and the operator choice: 'switch' (one XLA conditional per node) or
# 'select' (no conditional: one superkernel built from the chosen op's parameters).
# ---------------------------------------------------------------------------------------

CHOICES: tuple[str, ...] = ('switch', 'select')
"""Implementations of a supernet node's operator choice (see :class:`Choice`)."""

RELU = 'relu'
"""A body layer: ReLU."""


def default_choice(platform: str) -> str:
  """The operator choice used when none is configured, for ``platform``
  (``jax.devices()[0].platform``).

  ``'switch'`` on CPU, where it measured faster (README, "Performance": the superkernel
  multiplies a node's arithmetic while XLA:CPU's conditionals cost nothing extra).
  ``'select'`` elsewhere: on GPUs each conditional reads its index on the host (~0.27 ms,
  a stream stall), which 'select' avoids; that trade is not measured yet.
  """
  return 'switch' if platform == 'cpu' else 'select'



@dataclasses.dataclass(frozen=True)
class OperatorLayer:
  """A body layer: the branch's operator (an :class:`Operator` named ``name``)."""

  name: str
  stride: int = 1


@dataclasses.dataclass(frozen=True)
class ConvBNLayer:
  """A body layer: a 1x1 convolution ``conv`` and a BatchNorm ``bn``, one per branch
  (ENAS's ``inp_conv`` / ``inp_bn``), the same shape for every op."""

  conv: str
  bn: str


def check_choice(choice: str) -> None:
  """Raises ``ValueError`` unless ``choice`` is one of :data:`CHOICES`."""
  if choice not in CHOICES:
    raise ValueError(f"choice must be one of {', '.join(CHOICES)}, got {choice!r}")


class Branch(nn.Module):
  """Operator ``op`` run through ``body`` (a tuple of :data:`RELU`, :class:`OperatorLayer`,
  :class:`ConvBNLayer`), every layer mapping to ``out_channels``."""

  op: str
  body: tuple
  out_channels: int
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    for layer in self.body:
      if layer == RELU:
        x = nn.relu(x)
      elif isinstance(layer, ConvBNLayer):
        x = Conv(self.out_channels, 1, dtype=self.dtype, name=layer.conv)(x)
        x = batch_norm(train, self.bn_axis_name, self.dtype, name=layer.bn,
                       epsilon=self.bn_epsilon)(x)
      else:
        x = Operator(self.op, self.out_channels, layer.stride, self.dtype, self.bn_axis_name,
                     self.bn_epsilon, name=layer.name)(x, train)
    return x


def superkernel_size(choices: Sequence[str]) -> int:
  """The side of the dense kernel that expresses every op of ``choices``: the largest
  window (max pooling needs 1: it is computed beside the convolution)."""
  return max(1 if op == 'max3x3' else 3 if op == 'avg3x3' else int(op[-1]) for op in choices)


def operator_kernel(op: str, params: Any, in_channels: int, out_channels: int,
                    size: int) -> jax.Array:
  """The dense ``(size, size, in_channels, out_channels)`` float32 kernel of ``op``.

  ``params`` is the op's :class:`Operator` subtree (``conv0``, ``conv1``). ``convKxK``:
  its kernel; ``sepKxK``: depthwise times pointwise, ``dw[i, j, c] * pw[c, o]`` (no
  nonlinearity between them, so the product is the op); ``avg3x3``: a 3x3 box of the
  projection (or the identity), to be divided by the window's valid count
  (:func:`inverse_window_counts`); ``max3x3``: the 1x1 projection (or the identity),
  applied to the stride-1 max pool. Kernels smaller than ``size`` sit zero-padded in
  the centre, which SAME padding makes equal to the small kernel at any stride.
  """
  if op.startswith('conv'):
    kernel = params['conv0']['kernel']
  elif op.startswith('sep'):
    kernel = params['conv0']['kernel'][:, :, 0, :, None] * params['conv1']['kernel'][0, 0]
  else:
    tap = (params['conv0']['kernel'][0, 0] if in_channels != out_channels
           else jnp.eye(in_channels, dtype=jnp.float32))
    window = 3 if op == 'avg3x3' else 1
    kernel = jnp.broadcast_to(tap, (window, window, in_channels, out_channels))
  pad = (size - kernel.shape[0]) // 2
  return jnp.pad(kernel, ((pad, pad), (pad, pad), (0, 0), (0, 0)))


def inverse_window_counts(height: int, width: int, stride: int) -> np.ndarray:
  """``1 / count`` ``(1, H_out, W_out, 1)`` of the input pixels inside each SAME 3x3
  window at ``stride`` (average pooling without the padding)."""

  def counts(size):
    (low, _), out = same_padding(size, 3, stride)
    starts = np.arange(out) * stride - low
    return np.minimum(starts + 3, size) - np.maximum(starts, 0)

  return (1.0 / np.outer(counts(height), counts(width)))[None, :, :, None].astype(np.float32)


def selected_batch_norm(x: jax.Array, branch_index: jax.Array, params: Sequence[Any],
                        stats: Sequence[Any], train: bool, axis_name: str | None,
                        epsilon: float, dtype: Any) -> tuple[jax.Array, list[Any]]:
  """:class:`BatchNorm` of branch ``branch_index`` among per-branch variables.

  ``params[j]`` (``scale``, ``bias``) and ``stats[j]`` (``mean``, ``var``) are branch
  ``j``'s. Returns ``y`` and every branch's new statistics: the chosen branch's updated
  as :class:`BatchNorm` updates them (train mode), every other branch's unchanged.
  """
  pick = lambda group, name: lax.select_n(branch_index, *[g[name] for g in group])
  scale, bias = pick(params, 'scale'), pick(params, 'bias')
  if not train:
    mul = lax.rsqrt(pick(stats, 'var') + epsilon) * scale
    return ((x.astype(jnp.float32) - pick(stats, 'mean')) * mul + bias).astype(dtype), list(stats)
  y, mean, var = batch_norm_train(x, scale, bias, epsilon, axis_name, dtype)
  new = lambda old, batch: BN_MOMENTUM * old + (1 - BN_MOMENTUM) * batch
  return y, [{'mean': jnp.where(branch_index == j, new(s['mean'], mean), s['mean']),
              'var': jnp.where(branch_index == j, new(s['var'], var), s['var'])}
             for j, s in enumerate(stats)]


def selected_operator(x: jax.Array, branch_index: jax.Array, choices: Sequence[str],
                      params: Sequence[Any], stats: Sequence[Any], out_channels: int,
                      stride: int, train: bool, axis_name: str | None, epsilon: float,
                      dtype: Any) -> tuple[jax.Array, list[Any]]:
  """Operator ``choices[branch_index]`` of ``x (B, H, W, C_in)`` without a conditional.

  One SAME convolution at ``stride`` with the chosen op's :func:`operator_kernel` (the
  candidates' kernels picked by ``lax.select_n``); when ``max3x3`` is a candidate its
  stride-1 max pool of ``x`` replaces the input if chosen, when ``avg3x3`` is, the output
  is scaled by :func:`inverse_window_counts` if chosen; then :func:`selected_batch_norm`.
  ``params[j]`` / ``stats[j]``: choice ``j``'s :class:`Operator` subtrees. Returns
  ``(B, H/stride, W/stride, out_channels)`` and every choice's new BN statistics.
  """
  in_channels = x.shape[-1]
  size = superkernel_size(choices)
  kernel = lax.select_n(branch_index, *[
      operator_kernel(op, p, in_channels, out_channels, size) for op, p in zip(choices, params)])
  if 'max3x3' in choices:
    x = jnp.where(branch_index == choices.index('max3x3'), pool(x, 'max', 3, 1), x)
  y = conv2d(x.astype(dtype), kernel.astype(dtype), stride)
  if 'avg3x3' in choices:
    inverse = jnp.asarray(inverse_window_counts(x.shape[1], x.shape[2], stride), dtype)
    y = y * jnp.where(branch_index == choices.index('avg3x3'), inverse, jnp.ones((), dtype))
  return selected_batch_norm(y, branch_index, [p['bn'] for p in params],
                             [s['bn'] for s in stats], train, axis_name, epsilon, dtype)


class Choice(nn.Module):
  """A supernet node: one of ``choices`` (op names) run through ``body`` (:class:`Branch`),
  selected by a traced op index. Branch ``op``'s variables live under ``<op>/``.

  ``choice='switch'``: ``nn.switch`` over the branches (an XLA conditional, which on a
  GPU reads its index on the host). ``choice='select'``: no conditional; each
  :class:`OperatorLayer` is :func:`selected_operator`, each :class:`ConvBNLayer` a 1x1
  convolution with the chosen branch's kernel and :func:`selected_batch_norm`. Both
  compute the chosen branch's values, gradients (zero for the other branches) and BN
  statistics (the others' unchanged). ``init`` creates every branch's variables the
  same way for both.
  """

  choices: tuple[str, ...]
  body: tuple
  out_channels: int
  choice: str = 'switch'
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None
  bn_epsilon: float = BN_EPSILON

  @nn.compact
  def __call__(self, x: jax.Array, op_index: jax.Array | None, train: bool) -> jax.Array:
    check_choice(self.choice)

    def make(op):
      return Branch(op, self.body, self.out_channels, self.dtype, self.bn_axis_name,
                    self.bn_epsilon, name=op)

    if len(self.choices) == 1:
      return make(self.choices[0])(x, train)
    table = np.zeros(len(OP_NAMES), np.int32)
    for j, op in enumerate(self.choices):
      table[OP_NAMES.index(op)] = j
    branch_index = jnp.asarray(table)[op_index]
    if self.is_initializing():
      # Create every branch's variables; no switch needs compiling for that.
      return lax.select_n(branch_index, *[make(op)(x, train) for op in self.choices])
    if self.choice == 'switch':
      # Each branch builds its op inside the switch's scope (``mdl``), so that the
      # BatchNorm statistics it updates are carried out of the switch.
      fns = [lambda mdl, x, op=op: make(op)(x, train) for op in self.choices]
      return nn.switch(branch_index, fns, self, x)
    return self._select(x, branch_index, train)

  def _select(self, x: jax.Array, branch_index: jax.Array, train: bool) -> jax.Array:
    """The ``'select'`` implementation: reads every branch's variables, writes back the
    BN statistics (unchanged for the branches not chosen)."""
    params = [self.get_variable('params', op) for op in self.choices]
    stats = [self.get_variable('batch_stats', op) for op in self.choices]
    new_stats = [{} for _ in self.choices]
    for layer in self.body:
      if layer == RELU:
        x = nn.relu(x)
        continue
      if isinstance(layer, ConvBNLayer):
        kernel = lax.select_n(branch_index, *[p[layer.conv]['kernel'] for p in params])
        x = conv2d(x.astype(self.dtype), kernel.astype(self.dtype))
        x, updated = selected_batch_norm(
            x, branch_index, [p[layer.bn] for p in params], [s[layer.bn] for s in stats],
            train, self.bn_axis_name, self.bn_epsilon, self.dtype)
        name = layer.bn
      else:
        x, updated = selected_operator(
            x, branch_index, self.choices, [p[layer.name] for p in params],
            [s[layer.name] for s in stats], self.out_channels, layer.stride, train,
            self.bn_axis_name, self.bn_epsilon, self.dtype)
        updated = [{'bn': u} for u in updated]
        name = layer.name
      for new, u in zip(new_stats, updated):
        new[name] = u
    if train:
      for op, new in zip(self.choices, new_stats):
        self.put_variable('batch_stats', op, new)
    return x
