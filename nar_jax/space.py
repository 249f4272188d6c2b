"""Search spaces: a proven base network as an ordered list of searchable nodes.

The skip structure of the base network is fixed (NAR, paper section 3.3); only the
operator of each node is searched. A node records the shapes it maps between, the
base network's original operator and the candidates it may take instead.

An *architecture* is a tuple with one entry per node: op names for people and files
(``arch.json``), or indices into :data:`nar_jax.ops.OP_NAMES` for the controller and
the supernet. :meth:`SearchSpace.validate` turns either form into indices and
rejects anything malformed before it can reach a ``lax.switch`` (which would
silently clamp an out-of-range index).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from nar_jax import ops

Granularity = Literal['conv', 'block']
Family = Literal['resnet', 'ir']


@dataclasses.dataclass(frozen=True)
class Node:
  """One searchable position of the base network.

  Attributes:
    name: human-readable position, e.g. ``stage2.block0.conv1``.
    in_channels, out_channels, stride: the shapes the node maps between.
    original: the base network's operator at this node.
    candidates: the operators this node may take, in :data:`ops.OP_NAMES` order.
  """

  name: str
  in_channels: int
  out_channels: int
  stride: int
  original: str
  candidates: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Stage:
  """``num_blocks`` residual blocks of ``channels``; the first block has ``stride``."""

  num_blocks: int
  channels: int
  stride: int


@dataclasses.dataclass(frozen=True)
class Stem:
  """The layers before the first stage: a ``kernel x kernel`` conv of the stem channels at
  ``stride``, BatchNorm and ReLU, then a ``pool_window x pool_window`` max pool at
  ``pool_stride`` (``pool_window=0``: no pool)."""

  kernel: int
  stride: int
  pool_window: int = 0
  pool_stride: int = 1

  def out_hw(self, image_hw: tuple[int, int]) -> tuple[int, int]:
    """Height and width of the stem's output (the first stage's input), SAME padding."""
    hw = tuple(ops.same_padding(s, self.kernel, self.stride)[1] for s in image_hw)
    if self.pool_window:
      hw = tuple(ops.same_padding(s, self.pool_window, self.pool_stride)[1] for s in hw)
    return hw


STEMS = {
    # CIFAR ResNets (and the IR networks): 3x3 conv at stride 1, no pool.
    'cifar': Stem(3, 1),
    # ImageNet ResNets (He et al. 2016): 7x7 conv at stride 2, 3x3 max pool at stride 2;
    # the first stage runs at 56x56 for 224x224 inputs.
    'imagenet': Stem(7, 2, 3, 2),
}


class _Nodes:
  """What every operator space is: an ordered tuple of :class:`Node` s (``self.nodes``)
  and the architectures over them."""

  @property
  def num_nodes(self) -> int:
    return len(self.nodes)

  def candidate_mask(self) -> np.ndarray:
    """``(num_nodes, len(OP_NAMES))`` bool: which ops each node may take."""
    return np.array([[op in n.candidates for op in ops.OP_NAMES] for n in self.nodes])

  def branch_table(self) -> np.ndarray:
    """``(num_nodes, len(OP_NAMES))`` int32: op index -> branch index of the node, -1 if not allowed."""
    table = np.full((self.num_nodes, len(ops.OP_NAMES)), -1, np.int32)
    for i, n in enumerate(self.nodes):
      for j, op in enumerate(n.candidates):
        table[i, ops.OP_NAMES.index(op)] = j
    return table

  def baseline(self) -> tuple[int, ...]:
    """The base network itself: every node at its original operator (op indices)."""
    return tuple(ops.OP_NAMES.index(n.original) for n in self.nodes)

  def validate(self, arch: Sequence[int | str] | np.ndarray) -> tuple[int, ...]:
    """Checks an architecture and returns it as op indices.

    Args:
      arch: one entry per node, op names or op indices.

    Raises:
      ValueError: naming the problem: wrong length, unknown op name, index out of
        range, or an op the node does not allow.
    """
    arch = list(np.asarray(arch).tolist()) if isinstance(arch, np.ndarray) else list(arch)
    if len(arch) != self.num_nodes:
      raise ValueError(f'architecture has {len(arch)} entries but search space {self.name!r} '
                       f'has {self.num_nodes} nodes')
    indices = []
    for i, (entry, node) in enumerate(zip(arch, self.nodes)):
      if isinstance(entry, str):
        ops.check_op_name(entry)
        index = ops.OP_NAMES.index(entry)
      elif isinstance(entry, (int, np.integer)) and not isinstance(entry, bool):
        index = int(entry)
        if not 0 <= index < len(ops.OP_NAMES):
          raise ValueError(f'op index {index} at node {i} ({node.name}) is out of range '
                           f'[0, {len(ops.OP_NAMES)})')
      else:
        raise ValueError(f'architecture entry {entry!r} at node {i} is neither an op name nor an index')
      if ops.OP_NAMES[index] not in node.candidates:
        raise ValueError(f'op {ops.OP_NAMES[index]!r} is not a candidate of node {i} ({node.name}); '
                         f'candidates: {", ".join(node.candidates)}')
      indices.append(index)
    return tuple(indices)

  def names(self, arch: Sequence[int | str]) -> list[str]:
    """The architecture as op names (validated)."""
    return [ops.OP_NAMES[i] for i in self.validate(arch)]


@dataclasses.dataclass(frozen=True)
class NodeSpace(_Nodes):
  """An operator space of any network: its name and its searchable nodes, in the order
  the network runs them (README, "Refining your own network").

  Attributes:
    name: the space's name (``report.md``, ``arch.json``).
    nodes: one :class:`Node` per searchable layer.
  """

  name: str
  nodes: tuple[Node, ...]


@dataclasses.dataclass(frozen=True)
class SearchSpace(_Nodes):
  """A residual base network and its searchable nodes.

  ``family`` names the skeleton around the nodes:

  * ``'resnet'``: basic-block ResNet (:class:`nar_jax.models.resnet.ResNet`). With
    ``granularity='conv'`` every 3x3 conv of a block is a node (two per block: the
    paper's ResNet-18-16); with ``granularity='block'`` a node is a whole residual
    body ``op -> BN -> ReLU -> op -> BN`` (ResNet-18-8): choosing operator ``op``
    for that node sets both layers of the body to ``op``.
  * ``'ir'``: ArcFace's LResNet-E-IR (:class:`nar_jax.models.iresnet.IResNet`),
    always at conv granularity: unit ``BN -> node -> PReLU -> node``, where the
    second node carries the unit's stride, then the "E" output block producing an
    ``embedding_size`` embedding (see :func:`ir_space`).

  ``stem`` names the layers before the first stage (:data:`STEMS`): ``'cifar'`` (3x3
  conv, stride 1) or, for basic-block ResNets, ``'imagenet'`` (7x7 conv at stride 2 and
  a 3x3 max pool at stride 2). It changes neither the nodes nor their candidates, so an
  architecture searched with one stem is valid with the other.
  """

  name: str
  granularity: Granularity
  stem_channels: int
  stages: tuple[Stage, ...]
  nodes: tuple[Node, ...]
  family: Family = 'resnet'
  embedding_size: int | None = None  # 'ir' only: features of the face embedding
  stem: str = 'cifar'

  @property
  def stem_layers(self) -> Stem:
    """The :class:`Stem` named by ``stem``."""
    return STEMS[self.stem]


# ---------------------------------------------------------------------------------------
# Candidate rules.
# ---------------------------------------------------------------------------------------


def node_params(op: str, in_channels: int, out_channels: int, stride: int,
                granularity: Granularity) -> int:
  """Trainable parameters of ``op`` at a node (a whole body for block granularity)."""
  counts, _ = ops.count_op(op, in_channels, out_channels, stride, (8, 8))
  if granularity == 'block':
    second, _ = ops.count_op(op, out_channels, out_channels, 1, (8, 8))
    counts += second
  return counts.params


def candidates_for(original: str, in_channels: int, out_channels: int, stride: int,
                   granularity: Granularity, rule: str,
                   allowed: Sequence[str] | None = None) -> tuple[str, ...]:
  """A node's candidates under ``rule``.

  * ``'paper'``: only operators with no more parameters than the original (paper
    section 3.4: "no more parameters than the architecture operators").
  * ``'all'``: every operator.

  ``allowed`` further restricts to a subset of op names (e.g. the face task's
  conv3x3, sep3x3, max3x3, avg3x3). The original operator is always a candidate.
  """
  pool = tuple(allowed) if allowed else ops.OP_NAMES
  for op in pool:
    ops.check_op_name(op)
  if rule == 'all':
    chosen = set(pool)
  elif rule == 'paper':
    limit = node_params(original, in_channels, out_channels, stride, granularity)
    chosen = {op for op in pool
              if node_params(op, in_channels, out_channels, stride, granularity) <= limit}
  else:
    raise ValueError(f"unknown candidate rule {rule!r}; use 'paper' or 'all'")
  chosen.add(original)
  return tuple(op for op in ops.OP_NAMES if op in chosen)


# ---------------------------------------------------------------------------------------
# Base networks.
# ---------------------------------------------------------------------------------------

BASE_NETWORKS = {
    # name: (stem channels, stages as (blocks, channels, stride))
    'resnet18': (64, ((2, 64, 1), (2, 128, 2), (2, 256, 2), (2, 512, 2))),
    'resnet20_wide': (64, ((3, 64, 1), (3, 128, 2), (3, 256, 2))),
}


def scaled(channels: int, width: float) -> int:
  """Channels times the width multiplier, at least 1."""
  return max(1, int(round(channels * width)))


def check_stem(stem: str) -> None:
  """Raises ``ValueError`` unless ``stem`` is one of :data:`STEMS`."""
  if stem not in STEMS:
    raise ValueError(f"stem must be one of {', '.join(STEMS)}, got {stem!r}")


def resnet_space(base: str = 'resnet18', granularity: Granularity = 'conv', width: float = 1.0,
                 rule: str = 'paper', allowed: Sequence[str] | None = None,
                 stem: str = 'cifar') -> SearchSpace:
  """A basic-block ResNet as a search space.

  Args:
    base: ``'resnet18'`` (ResNet-18: [2,2,2,2] blocks of 64-128-256-512) or
      ``'resnet20_wide'`` (ResNet-20 with 64/128/256 channels, the paper's Table 1
      baseline).
    granularity: ``'conv'`` (a node per 3x3 conv) or ``'block'`` (a node per body).
    width: multiplier on every channel count (small CPU configs use < 1).
    rule: candidate rule, see :func:`candidates_for`.
    allowed: optional subset of op names the candidates are drawn from.
    stem: ``'cifar'`` (3x3 conv, stride 1, no max pool) or ``'imagenet'`` (7x7 conv at
      stride 2 and a 3x3 max pool at stride 2: ImageNet ResNet-18 with
      ``base='resnet18'``), see :data:`STEMS`. The nodes are the same for both.
  """
  check_stem(stem)
  if base not in BASE_NETWORKS:
    raise ValueError(f'unknown base network {base!r}; known: {", ".join(BASE_NETWORKS)}')
  if granularity not in ('conv', 'block'):
    raise ValueError(f"granularity must be 'conv' or 'block', got {granularity!r}")
  if width <= 0:
    raise ValueError(f'width multiplier must be positive, got {width}')
  stem_channels, stage_defs = BASE_NETWORKS[base]
  stages = tuple(Stage(b, scaled(c, width), s) for b, c, s in stage_defs)
  nodes = []
  in_ch = scaled(stem_channels, width)
  for si, stage in enumerate(stages):
    for bi in range(stage.num_blocks):
      stride = stage.stride if bi == 0 else 1
      prefix = f'stage{si + 1}.block{bi}'
      if granularity == 'block':
        layers = [(f'{prefix}.body', in_ch, stage.channels, stride)]
      else:
        layers = [(f'{prefix}.conv1', in_ch, stage.channels, stride),
                  (f'{prefix}.conv2', stage.channels, stage.channels, 1)]
      for name, cin, cout, s in layers:
        cands = candidates_for('conv3x3', cin, cout, s, granularity, rule, allowed)
        nodes.append(Node(name, cin, cout, s, 'conv3x3', cands))
      in_ch = stage.channels
  suffix = '16' if granularity == 'conv' else '8'
  name = f'{base}-{suffix}' if base == 'resnet18' else f'{base}-{granularity}'
  return SearchSpace(name, granularity, scaled(stem_channels, width), stages, tuple(nodes),
                     stem=stem)


IR_UNITS = {
    # depth: units per stage of LResNet<depth>E-IR (insightface's fresnet)
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
}
IR_CHANNELS = (64, 128, 256, 512)
IR_STEM_CHANNELS = 64
FACE_OPS = ('conv3x3', 'sep3x3', 'max3x3', 'avg3x3')


def ir_space(depth: int = 50, width: float = 1.0, rule: str = 'paper',
             allowed: Sequence[str] | None = FACE_OPS, embedding_size: int = 512) -> SearchSpace:
  """ArcFace's LResNet<depth>E-IR as a search space (README, "Faces: refining
  LResNet50E-IR with ArcFace").

  Stem conv3x3 of 64 channels at stride 1, then four stages of IR units with
  64-128-256-512 channels whose first unit has stride 2. A unit is
  ``BN -> conv1 -> BN -> PReLU -> conv2 -> BN`` plus a shortcut; its two 3x3 convs are
  the nodes: ``conv1`` maps ``in -> out`` at stride 1 and ``conv2`` maps ``out -> out``
  with the unit's stride (IR-50: 24 units, 48 nodes).

  Args:
    depth: 18, 34, 50 or 100.
    width: multiplier on every channel count (not on ``embedding_size``).
    rule: candidate rule, see :func:`candidates_for`.
    allowed: op names the candidates are drawn from (default: the paper's face set
      conv3x3, sep3x3, max3x3, avg3x3); ``None`` for every op.
    embedding_size: features of the "E" output (512 in ArcFace).
  """
  if depth not in IR_UNITS:
    raise ValueError(f'unknown IR depth {depth!r}; known: {", ".join(map(str, IR_UNITS))}')
  if width <= 0:
    raise ValueError(f'width multiplier must be positive, got {width}')
  if embedding_size <= 0:
    raise ValueError(f'embedding size must be positive, got {embedding_size}')
  stages = tuple(Stage(n, scaled(c, width), 2) for n, c in zip(IR_UNITS[depth], IR_CHANNELS))
  nodes = []
  in_ch = scaled(IR_STEM_CHANNELS, width)
  for si, stage in enumerate(stages):
    for ui in range(stage.num_blocks):
      stride = stage.stride if ui == 0 else 1
      prefix = f'stage{si + 1}.unit{ui}'
      for name, cin, s in ((f'{prefix}.conv1', in_ch, 1), (f'{prefix}.conv2', stage.channels, stride)):
        cands = candidates_for('conv3x3', cin, stage.channels, s, 'conv', rule, allowed)
        nodes.append(Node(name, cin, stage.channels, s, 'conv3x3', cands))
      in_ch = stage.channels
  return SearchSpace(f'ir{depth}', 'conv', scaled(IR_STEM_CHANNELS, width), stages, tuple(nodes),
                     family='ir', embedding_size=embedding_size)
