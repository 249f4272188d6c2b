"""ENAS's macro search space, operators *and* skip connections: the paper's NAS-Arch baseline.

A network of ``L`` layers (ENAS macro search, "general child"). Let ``x_0`` be the
stem's output and ``x_{j+1}`` the output of layer ``j``. Layer ``j`` applies its
operator to ``x_j`` (the previous layer's output), adds every earlier output
``x_t`` (``t < j``) whose skip bit ``S[j, t]`` is set, and (for ``j > 0``) a
BatchNorm. The direct input ``x_j`` is never a skip candidate, so layer ``j`` has
exactly ``j`` skip bits and layer 0 has none (the paper's ``t <= j - 2`` in eq. 4,
with 1-based nodes). After the *pool layers* (ENAS: ``L//3 - 1`` and ``2L//3 - 1``)
every output so far is downsampled by a factorized reduction, so that later
layers can still reach them.

**Encoding.** A joint architecture is one flat int32 vector of length
``L (L + 1) / 2`` (ENAS's ``sample_arc`` with ``search_whole_channels``): for each
layer ``j`` in order, its op index (into :data:`nar_jax.ops.OP_NAMES`) followed by
its ``j`` skip bits ``S[j, 0], ..., S[j, j-1]`` (0 or 1). Layer ``j``'s op sits at
position ``j (j + 1) / 2``; its skip bit ``t`` at ``j (j + 1) / 2 + 1 + t``. E.g.
with ``L = 3``: ``[op0, op1, S10, op2, S20, S21]``.

For people and ``arch.json`` the same architecture reads as one dict per layer,
``{'op': 'sep3x3', 'skips': ['stem', 'layer1']}``, where ``'stem'`` is ``x_0`` and
``'layer{t}'`` is ``x_{t+1}``, the output of layer ``t``
(:meth:`JointSpace.names`; :meth:`JointSpace.validate` accepts both forms).

The index helpers (:func:`op_positions`, :func:`split`, :func:`encode`) work on
NumPy and traced JAX arrays alike, with any leading batch dimensions.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import jax.numpy as jnp
import numpy as np

from nar_jax import ops


# ---------------------------------------------------------------------------------------
# The flat encoding.
# ---------------------------------------------------------------------------------------


def arch_length(num_layers: int) -> int:
  """Entries of a joint architecture vector: ``L`` ops plus ``L (L - 1) / 2`` skip bits."""
  return num_layers * (num_layers + 1) // 2


def op_positions(num_layers: int) -> np.ndarray:
  """``(L,)`` int: where each layer's op index sits in the flat vector."""
  j = np.arange(num_layers)
  return j * (j + 1) // 2


def skip_pairs(num_layers: int) -> np.ndarray:
  """``(L (L - 1) / 2, 2)`` int: the ``(layer j, source t)`` of each skip bit, in vector order."""
  return np.array([(j, t) for j in range(num_layers) for t in range(j)], np.int64).reshape(-1, 2)


def skip_positions(num_layers: int) -> np.ndarray:
  """``(L (L - 1) / 2,)`` int: where each skip bit of :func:`skip_pairs` sits in the vector."""
  pairs = skip_pairs(num_layers)
  return op_positions(num_layers)[pairs[:, 0]] + 1 + pairs[:, 1]


def is_op_position(num_layers: int) -> np.ndarray:
  """``(L (L + 1) / 2,)`` bool: True at op entries, False at skip bits."""
  flags = np.zeros(arch_length(num_layers), bool)
  flags[op_positions(num_layers)] = True
  return flags


def num_layers_of(length: int) -> int:
  """``L`` such that ``arch_length(L) == length``; ``ValueError`` if there is none."""
  num_layers = int(round((np.sqrt(8 * length + 1) - 1) / 2))
  if num_layers < 1 or arch_length(num_layers) != length:
    raise ValueError(f'a joint architecture has L (L + 1) / 2 entries for some L >= 1; '
                     f'got {length}')
  return num_layers


def split(arch: Any, num_layers: int) -> tuple[Any, Any]:
  """Flat vectors ``(..., L (L + 1) / 2)`` -> ``(ops (..., L), skips (..., L, L))``.

  ``skips[..., j, t]`` is layer ``j``'s bit for source ``x_t`` (0 where ``t >= j``),
  same dtype as ``arch``. NumPy in, NumPy out; JAX (also traced) in, JAX out.
  """
  xp = np if isinstance(arch, np.ndarray) else jnp
  arch = xp.asarray(arch)
  if arch.shape[-1] != arch_length(num_layers):
    raise ValueError(f'joint architecture of {num_layers} layers has {arch_length(num_layers)} '
                     f'entries, got shape {arch.shape}')
  ops_ = arch[..., op_positions(num_layers)]
  index = np.zeros((num_layers, num_layers), np.int64)
  pairs = skip_pairs(num_layers)
  index[pairs[:, 0], pairs[:, 1]] = skip_positions(num_layers)
  lower = np.tril(np.ones((num_layers, num_layers), bool), -1)
  skips = xp.where(lower, arch[..., index], xp.zeros((), arch.dtype))
  return ops_, skips


def encode(ops_: Any, skips: Any) -> Any:
  """Inverse of :func:`split`: ``ops (..., L)``, ``skips (..., L, L)`` -> flat int32 vectors.

  Entries of ``skips`` on or above the diagonal are ignored.
  """
  xp = np if isinstance(ops_, np.ndarray) and isinstance(skips, np.ndarray) else jnp
  ops_, skips = xp.asarray(ops_), xp.asarray(skips)
  num_layers = ops_.shape[-1]
  if skips.shape[-2:] != (num_layers, num_layers):
    raise ValueError(f'skips must end in ({num_layers}, {num_layers}) for {num_layers} ops; '
                     f'got {skips.shape}')
  parts = []
  for j in range(num_layers):
    parts.append(ops_[..., j:j + 1])
    parts.append(skips[..., j, :j])
  return xp.concatenate([p.astype(xp.int32) for p in parts], axis=-1)


def needed_reductions(skips: Any, pool_layers: Sequence[int]) -> Any:
  """Which factorized reductions an architecture uses: ``(..., len(pool_layers), L + 1)`` bool.

  At pool layer ``p`` the outputs ``x_0 .. x_{p+1}`` are reduced; the reduced ``x_t``
  is needed iff it is the next layer's input (``t == p + 1``) or some later layer
  ``j > p`` skips from ``x_t``. Entries ``t > p + 1`` are False. Works on traced
  ``skips (..., L, L)``.
  """
  xp = np if isinstance(skips, np.ndarray) else jnp
  num_layers = skips.shape[-1]
  if not pool_layers:
    return xp.zeros(skips.shape[:-2] + (0, num_layers + 1), bool)
  rows = []
  for p in pool_layers:
    later = xp.any(skips[..., p + 1:, :] != 0, axis=-2)               # (..., L)
    later = xp.concatenate([later, xp.zeros(later.shape[:-1] + (1,), bool)], axis=-1)
    t = np.arange(num_layers + 1)
    rows.append((later & (t <= p + 1)) | (t == p + 1))
  return xp.stack(rows, axis=-2)


# ---------------------------------------------------------------------------------------
# The space.
# ---------------------------------------------------------------------------------------


def source_name(t: int) -> str:
  """Readable name of output ``x_t``: ``'stem'`` or ``'layer{t-1}'``."""
  return 'stem' if t == 0 else f'layer{t - 1}'


@dataclasses.dataclass(frozen=True)
class JointSpace:
  """ENAS's macro space: ``num_layers`` layers, one op and ``j`` skip bits at layer ``j``.

  Build it with :func:`joint_space`, which checks the arguments and fills the defaults.

  Attributes:
    num_layers: ``L``.
    channels: width of the first stage (stem and layers before the first pool).
    candidates: ops every layer may take, in :data:`ops.OP_NAMES` order.
    pool_layers: layers after which every output is downsampled (stride 2).
    widen: double the channels at every reduction (ENAS's fixed networks) or keep
      them (ENAS's search).
    baseline_op: the op of :meth:`baseline`.
  """

  num_layers: int
  channels: int
  candidates: tuple[str, ...]
  pool_layers: tuple[int, ...]
  widen: bool
  baseline_op: str

  @property
  def name(self) -> str:
    return f'enas_macro-{self.num_layers}'

  @property
  def num_nodes(self) -> int:
    """Alias of ``num_layers``: one operator node per layer (as ``SearchSpace``)."""
    return self.num_layers

  @property
  def arch_length(self) -> int:
    return arch_length(self.num_layers)

  def op_positions(self) -> np.ndarray:
    return op_positions(self.num_layers)

  def skip_positions(self) -> np.ndarray:
    return skip_positions(self.num_layers)

  def split(self, arch: Any) -> tuple[Any, Any]:
    return split(arch, self.num_layers)

  def stage_of(self, layer: int) -> int:
    """Stage of ``layer`` (0 before the first pool layer's reduction)."""
    return sum(layer > p for p in self.pool_layers)

  def stage_channels(self, stage: int) -> int:
    return self.channels * (2 ** stage if self.widen else 1)

  def candidate_mask(self) -> np.ndarray:
    """``(L, len(OP_NAMES))`` bool: which ops each layer may take (all layers alike)."""
    row = np.array([op in self.candidates for op in ops.OP_NAMES])
    return np.tile(row, (self.num_layers, 1))

  def baseline(self) -> tuple[int, ...]:
    """A ResNet-like chain: every layer ``baseline_op``; every odd layer ``j`` skips from
    ``x_{j-1}``, the input of layer ``j - 1``, so layers ``(j-1, j)`` form a residual
    block ``x_{j+1} = f_j(f_{j-1}(x_{j-1})) + x_{j-1}``."""
    op = ops.OP_NAMES.index(self.baseline_op)
    skips = np.zeros((self.num_layers, self.num_layers), np.int32)
    for j in range(1, self.num_layers, 2):
      skips[j, j - 1] = 1
    return tuple(int(a) for a in encode(np.full(self.num_layers, op), skips))

  def validate(self, arch: Sequence[Any] | np.ndarray) -> tuple[int, ...]:
    """Checks an architecture and returns it as the flat int tuple.

    Args:
      arch: the flat vector (ints, or a NumPy array), or the readable form: one dict
        ``{'op': name or index, 'skips': [source names]}`` per layer.

    Raises:
      ValueError: naming the problem: wrong length, an entry that is not an int, an
        op index out of range or not a candidate, a skip bit other than 0/1, an
        unknown or not-earlier skip source.
    """
    if isinstance(arch, np.ndarray):
      arch = arch.tolist()
    arch = list(arch)
    if arch and all(isinstance(a, dict) for a in arch):
      arch = self._from_names(arch)
    if len(arch) != self.arch_length:
      raise ValueError(f'joint architecture has {len(arch)} entries but space {self.name!r} '
                       f'({self.num_layers} layers) needs {self.arch_length}')
    for i, entry in enumerate(arch):
      if not isinstance(entry, (int, np.integer)) or isinstance(entry, bool):
        raise ValueError(f'joint architecture entry {entry!r} at position {i} is not an int')
    arch = [int(a) for a in arch]
    for j, pos in enumerate(self.op_positions()):
      self._check_op(j, arch[pos])
    for (j, t), pos in zip(skip_pairs(self.num_layers), self.skip_positions()):
      if arch[pos] not in (0, 1):
        raise ValueError(f'skip bit of layer {j} from {source_name(t)} (position {pos}) must be '
                         f'0 or 1, got {arch[pos]}')
    return tuple(arch)

  def _check_op(self, layer: int, index: int) -> None:
    if not 0 <= index < len(ops.OP_NAMES):
      raise ValueError(f'op index {index} at layer {layer} is out of range '
                       f'[0, {len(ops.OP_NAMES)})')
    if ops.OP_NAMES[index] not in self.candidates:
      raise ValueError(f'op {ops.OP_NAMES[index]!r} at layer {layer} is not a candidate; '
                       f'candidates: {", ".join(self.candidates)}')

  def _from_names(self, layers: list[dict]) -> list[int]:
    """Readable form -> flat list (checked for structure here, for values by validate)."""
    if len(layers) != self.num_layers:
      raise ValueError(f'joint architecture lists {len(layers)} layers but space {self.name!r} '
                       f'has {self.num_layers}')
    flat = []
    for j, layer in enumerate(layers):
      if set(layer) != {'op', 'skips'}:
        raise ValueError(f"layer {j} must have exactly the keys 'op' and 'skips', got "
                         f'{sorted(layer)}')
      op = layer['op']
      if isinstance(op, str):
        ops.check_op_name(op)
        op = ops.OP_NAMES.index(op)
      sources = {source_name(t): t for t in range(j)}
      bits = [0] * j
      for name in layer['skips']:
        if name not in sources:
          raise ValueError(f'layer {j} cannot skip from {name!r}; its skip sources are '
                           f'{", ".join(sources) or "none"}')
        if bits[sources[name]]:
          raise ValueError(f'layer {j} lists skip source {name!r} twice')
        bits[sources[name]] = 1
      flat += [op] + bits
    return flat

  def names(self, arch: Sequence[Any] | np.ndarray) -> list[dict[str, Any]]:
    """The architecture in readable form (validated): ``[{'op': ..., 'skips': [...]}, ...]``."""
    ops_, skips = split(np.asarray(self.validate(arch)), self.num_layers)
    return [{'op': ops.OP_NAMES[int(ops_[j])],
             'skips': [source_name(t) for t in range(j) if skips[j, t]]}
            for j in range(self.num_layers)]


def default_pool_layers(num_layers: int) -> tuple[int, ...]:
  """ENAS's pool layers ``(L//3 - 1, 2 L//3 - 1)`` (needs ``L >= 3``)."""
  distance = num_layers // 3
  return (distance - 1, 2 * distance - 1)


def joint_space(num_layers: int = 12, channels: int = 36,
                candidates: Sequence[str] | None = None,
                pool_layers: Sequence[int] | None = None, widen: bool = False,
                baseline_op: str = 'conv3x3') -> JointSpace:
  """ENAS's macro space (defaults: the CIFAR-10 search, 12 layers of 36 channels, 6 ops).

  Args:
    num_layers: ``L >= 1``.
    channels: first-stage width; even when there are pool layers (the factorized
      reduction concatenates two halves).
    candidates: op names every layer may take (default: all of :data:`ops.OP_NAMES`).
    pool_layers: strictly increasing layers in ``[0, L - 2]`` after which outputs are
      reduced; default :func:`default_pool_layers` (``()`` when ``L < 3``).
    widen: double channels at each reduction.
    baseline_op: op of the baseline chain; must be a candidate.
  """
  if num_layers < 1:
    raise ValueError(f'num_layers must be >= 1, got {num_layers}')
  if channels < 1:
    raise ValueError(f'channels must be >= 1, got {channels}')
  names = ops.OP_NAMES if candidates is None else tuple(candidates)
  if not names:
    raise ValueError('candidates must name at least one op')
  for op in names:
    ops.check_op_name(op)
  names = tuple(op for op in ops.OP_NAMES if op in names)
  if pool_layers is None:
    pool_layers = default_pool_layers(num_layers) if num_layers >= 3 else ()
  pool_layers = tuple(int(p) for p in pool_layers)
  if any(b <= a for a, b in zip(pool_layers, pool_layers[1:])):
    raise ValueError(f'pool_layers must be strictly increasing, got {pool_layers}')
  if any(not 0 <= p <= num_layers - 2 for p in pool_layers):
    raise ValueError(f'pool layers must lie in [0, {num_layers - 2}] (a reduction after the last '
                     f'layer would feed nothing), got {pool_layers}')
  if pool_layers and channels % 2:
    raise ValueError(f'channels must be even with pool layers (factorized reduction '
                     f'concatenates two halves), got {channels}')
  ops.check_op_name(baseline_op)
  if baseline_op not in names:
    raise ValueError(f'baseline op {baseline_op!r} is not a candidate ({", ".join(names)})')
  return JointSpace(num_layers, channels, names, pool_layers, widen, baseline_op)
