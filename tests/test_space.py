"""Tests for nar_jax.space and nar_jax.counting: node lists, candidate rules, validation, counts."""

import zlib

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import ops, space
from nar_jax.models.iresnet import IResNet
from nar_jax.models.resnet import ResNet
import model_testing

ALL_OPS = set(ops.OP_NAMES)
PAPER_RESNET_CANDIDATES = ('conv3x3', 'sep3x3', 'sep5x5', 'max3x3', 'avg3x3')
FACE_CANDIDATES = ('conv3x3', 'sep3x3', 'max3x3', 'avg3x3')


def _num_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _random_arch(rng: np.random.Generator, sp: space.SearchSpace) -> tuple[int, ...]:
  """A random architecture allowed by the space (uniform over each node's candidates)."""
  mask = sp.candidate_mask()
  return tuple(int(rng.choice(np.flatnonzero(row))) for row in mask)


# ---------------------------------------------------------------------------
# Node lists.


@pytest.mark.parametrize('base,granularity,num_nodes', [
    ('resnet18', 'conv', 16), ('resnet18', 'block', 8),
    ('resnet20_wide', 'conv', 18), ('resnet20_wide', 'block', 9)])
def test_number_of_nodes(base, granularity, num_nodes):
  """ResNet-18-16 / -8 (paper), ResNet-20: 2 nodes per basic block at conv granularity."""
  sp = space.resnet_space(base, granularity)
  assert sp.num_nodes == num_nodes == len(sp.nodes)
  assert sp.granularity == granularity
  assert sp.baseline() == (ops.OP_NAMES.index('conv3x3'),) * num_nodes
  chex.assert_shape(sp.candidate_mask(), (num_nodes, len(ops.OP_NAMES)))
  assert len({n.name for n in sp.nodes}) == num_nodes  # names are unique


def test_resnet18_node_shapes():
  """Channels and strides of the CIFAR ResNet-18 nodes (64-128-256-512, first block downsamples)."""
  sp = space.resnet_space('resnet18', 'conv')
  shapes = [(n.in_channels, n.out_channels, n.stride) for n in sp.nodes]
  assert shapes == [
      (64, 64, 1), (64, 64, 1), (64, 64, 1), (64, 64, 1),
      (64, 128, 2), (128, 128, 1), (128, 128, 1), (128, 128, 1),
      (128, 256, 2), (256, 256, 1), (256, 256, 1), (256, 256, 1),
      (256, 512, 2), (512, 512, 1), (512, 512, 1), (512, 512, 1)]
  block = space.resnet_space('resnet18', 'block', width=0.5)
  assert [(n.in_channels, n.out_channels, n.stride) for n in block.nodes] == [
      (32, 32, 1), (32, 32, 1), (32, 64, 2), (64, 64, 1),
      (64, 128, 2), (128, 128, 1), (128, 256, 2), (256, 256, 1)]
  assert block.stem_channels == 32


# ---------------------------------------------------------------------------
# Candidate rules.


@pytest.mark.parametrize('granularity', ['conv', 'block'])
@pytest.mark.parametrize('width', [1.0, 0.0625])
def test_paper_rule_excludes_conv5x5_only(granularity, width):
  """'paper': only ops with no more params than conv3x3, i.e. everything except conv5x5."""
  sp = space.resnet_space('resnet18', granularity, width=width, rule='paper')
  for node in sp.nodes:
    assert node.candidates == PAPER_RESNET_CANDIDATES, node
  mask = sp.candidate_mask()
  assert not mask[:, ops.OP_NAMES.index('conv5x5')].any()
  assert mask.sum() == sp.num_nodes * 5


@pytest.mark.parametrize('granularity', ['conv', 'block'])
def test_all_rule_allows_every_op(granularity):
  sp = space.resnet_space('resnet18', granularity, rule='all')
  assert all(n.candidates == ops.OP_NAMES for n in sp.nodes)
  assert sp.candidate_mask().all()


def test_allowed_restricts_candidates():
  """``allowed`` restricts the pool; the original op (conv3x3) is always kept; order is OP_NAMES'."""
  face = ('avg3x3', 'max3x3', 'sep3x3', 'conv3x3')  # deliberately out of order
  sp = space.resnet_space('resnet18', 'conv', rule='paper', allowed=face)
  assert all(n.candidates == ('conv3x3', 'sep3x3', 'max3x3', 'avg3x3') for n in sp.nodes)
  sp = space.resnet_space('resnet18', 'conv', rule='all', allowed=('sep5x5', 'conv5x5'))
  assert all(n.candidates == ('conv3x3', 'conv5x5', 'sep5x5') for n in sp.nodes)
  # 'paper' still applies inside ``allowed``: conv5x5 is too big even when allowed.
  sp = space.resnet_space('resnet18', 'conv', rule='paper', allowed=('conv5x5', 'max3x3'))
  assert all(n.candidates == ('conv3x3', 'max3x3') for n in sp.nodes)
  with pytest.raises(ValueError, match="unknown op 'conv7x7'"):
    space.resnet_space('resnet18', 'conv', allowed=('conv3x3', 'conv7x7'))


def test_paper_rule_depends_on_node_params():
  """The rule compares real parameter counts: at one channel, conv3x3 has 9 + 2 params, sep3x3
  9 + 1 + 2 and sep5x5 25 + 1 + 2, so both separable ops are dropped; pools (2) stay."""
  assert space.candidates_for('conv3x3', 1, 1, 1, 'conv', 'paper') == (
      'conv3x3', 'max3x3', 'avg3x3')
  assert space.candidates_for('conv3x3', 64, 64, 1, 'conv', 'paper') == PAPER_RESNET_CANDIDATES


def test_space_argument_errors():
  with pytest.raises(ValueError, match="unknown base network 'resnet50'"):
    space.resnet_space('resnet50')
  with pytest.raises(ValueError, match="granularity must be 'conv' or 'block', got 'cell'"):
    space.resnet_space('resnet18', 'cell')
  with pytest.raises(ValueError, match='width multiplier must be positive'):
    space.resnet_space('resnet18', width=0.0)
  with pytest.raises(ValueError, match="unknown candidate rule 'small'"):
    space.resnet_space('resnet18', rule='small')


# ---------------------------------------------------------------------------
# Counting.


@pytest.mark.parametrize('granularity', ['conv', 'block'])
def test_resnet18_reference_counts(granularity):
  """CIFAR ResNet-18 (32x32x3, 10 classes): 11.17M params, 0.556 G MACs (README, "Search
  spaces and operators")."""
  sp = space.resnet_space('resnet18', granularity)
  counts = model_testing.count_architecture(sp, sp.baseline(), (32, 32), 3, 10)
  assert abs(counts.params - 11.17e6) <= 0.005 * 11.17e6, counts
  assert abs(counts.macs - 0.556e9) <= 0.005 * 0.556e9, counts
  # Names and indices describe the same network.
  assert model_testing.count_architecture(sp, ['conv3x3'] * sp.num_nodes, (32, 32), 3, 10) == counts


def test_count_architecture_baseline_by_hand():
  """The ResNet-18 baseline params summed by hand: stem, 8 blocks, 3 projections, head."""
  conv = lambda k, cin, cout: k * k * cin * cout + 2 * cout  # conv + BN
  expected = conv(3, 3, 64)
  cin = 64
  for c in (64, 128, 256, 512):
    for b in range(2):
      expected += conv(3, cin, c) + conv(3, c, c)
      if cin != c:
        expected += conv(1, cin, c)
      cin = c
  expected += 512 * 10 + 10
  sp = space.resnet_space('resnet18', 'conv')
  assert model_testing.count_architecture(sp, sp.baseline(), (32, 32), 3, 10).params == expected


@pytest.mark.parametrize('base,granularity,rule,width', [
    ('resnet18', 'conv', 'all', 0.125),
    ('resnet18', 'block', 'all', 0.125),
    ('resnet18', 'conv', 'paper', 0.0625),
    ('resnet20_wide', 'block', 'all', 0.0625),
])
def test_analytic_params_equal_initialised_fixed_network(base, granularity, rule, width):
  """count_architecture's params == the params of the initialised fixed ResNet(arch=...).

  jax.eval_shape traces ``init`` without computing anything. Odd image sizes exercise
  the SAME-padding output sizes along the way; the baseline is included.
  """
  sp = space.resnet_space(base, granularity, width=width, rule=rule)
  rng = np.random.default_rng(zlib.crc32(f'{base}{granularity}{rule}'.encode()))
  archs = [sp.baseline()] + [_random_arch(rng, sp) for _ in range(4)]
  images = jax.ShapeDtypeStruct((2, 15, 15, 3), jnp.float32)
  for arch in archs:
    model = ResNet(sp, 7, arch=arch)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    analytic = model_testing.count_architecture(sp, arch, (15, 15), 3, 7)
    assert _num_params(variables['params']) == analytic.params, sp.names(arch)


@pytest.mark.parametrize('make_space', [
    lambda rule: space.resnet_space('resnet18', 'conv', rule=rule),
    lambda rule: space.resnet_space('resnet18', 'block', rule=rule),
    lambda rule: space.resnet_space('resnet20_wide', 'conv', rule=rule),
    lambda rule: space.ir_space(18, rule=rule, allowed=None),
], ids=['resnet18-conv', 'resnet18-block', 'resnet20_wide-conv', 'ir18'])
def test_paper_rule_never_grows_the_network(make_space):
  """Under 'paper', replacing any node's op by any of its candidates never adds params,
  and every candidate but the original strictly reduces them."""
  sp = make_space('paper')
  base_counts = model_testing.count_architecture(sp, sp.baseline(), (32, 32), 3, 10)
  for j, node in enumerate(sp.nodes):
    for op in node.candidates:
      arch = list(sp.baseline())
      arch[j] = ops.OP_NAMES.index(op)
      counts = model_testing.count_architecture(sp, arch, (32, 32), 3, 10)
      if op == node.original:
        assert counts == base_counts
      else:
        assert counts.params < base_counts.params, (node.name, op)
        assert counts.macs < base_counts.macs, (node.name, op)
  # The rule is not vacuous: with 'all', conv5x5 at any node is larger.
  sp_all = make_space('all')
  arch = list(sp_all.baseline())
  arch[0] = ops.OP_NAMES.index('conv5x5')
  assert model_testing.count_architecture(sp_all, arch, (32, 32), 3, 10).params > base_counts.params


# ---------------------------------------------------------------------------
# LResNet-E-IR (face) spaces.


def test_ir50_nodes():
  """IR-50: 24 units, 48 nodes; conv1 maps in -> out at stride 1, conv2 out -> out with the
  unit's stride, 2 in the first unit of every stage; face candidates everywhere."""
  sp = space.ir_space(50)
  assert sp.family == 'ir' and sp.granularity == 'conv' and sp.name == 'ir50'
  assert sp.num_nodes == 48 and sp.stem_channels == 64 and sp.embedding_size == 512
  assert [(st.num_blocks, st.channels, st.stride) for st in sp.stages] == [
      (3, 64, 2), (4, 128, 2), (14, 256, 2), (3, 512, 2)]
  expected, cin = [], 64
  for units, c in ((3, 64), (4, 128), (14, 256), (3, 512)):
    for u in range(units):
      expected += [(cin, c, 1), (c, c, 2 if u == 0 else 1)]
      cin = c
  assert [(n.in_channels, n.out_channels, n.stride) for n in sp.nodes] == expected
  assert sp.nodes[0].name == 'stage1.unit0.conv1' and sp.nodes[47].name == 'stage4.unit2.conv2'
  assert sp.nodes[7].name == 'stage2.unit0.conv2' and sp.nodes[7].stride == 2
  assert len({n.name for n in sp.nodes}) == 48
  assert all(n.candidates == FACE_CANDIDATES and n.original == 'conv3x3' for n in sp.nodes)
  assert sp.baseline() == (ops.OP_NAMES.index('conv3x3'),) * 48
  np.testing.assert_array_equal(sp.candidate_mask().sum(axis=1), 4)


@pytest.mark.parametrize('depth,num_nodes', [(18, 16), (34, 32), (50, 48), (100, 98)])
def test_ir_depths(depth, num_nodes):
  sp = space.ir_space(depth, width=0.125)
  assert sp.num_nodes == num_nodes and sp.name == f'ir{depth}'
  assert [st.channels for st in sp.stages] == [8, 16, 32, 64] and sp.stem_channels == 8


def test_ir_space_argument_errors():
  with pytest.raises(ValueError, match='unknown IR depth 52; known: 18, 34, 50, 100'):
    space.ir_space(52)
  with pytest.raises(ValueError, match='width multiplier must be positive'):
    space.ir_space(50, width=-1.0)
  with pytest.raises(ValueError, match='embedding size must be positive'):
    space.ir_space(50, embedding_size=0)
  with pytest.raises(ValueError, match="unknown candidate rule 'small'"):
    space.ir_space(50, rule='small')
  with pytest.raises(ValueError, match="unknown op 'conv7x7'"):
    space.ir_space(50, allowed=('conv7x7',))


def test_ir_candidate_rule():
  """Without ``allowed`` the paper rule drops conv5x5 and sep5x5 stays (fewer params than
  conv3x3 at 64+ channels); 'all' with the face set keeps exactly the face set."""
  sp = space.ir_space(50, allowed=None)
  assert all(n.candidates == PAPER_RESNET_CANDIDATES for n in sp.nodes)
  sp = space.ir_space(50, rule='all')
  assert all(n.candidates == FACE_CANDIDATES for n in sp.nodes)


def test_ir50_reference_counts():
  """LResNet50E-IR at 112x112 without the classifier: 43.6M params (0.5%), 6.31 G MACs (1%)
  (README, "Faces"); the 85,742-way margin head adds 85,742 x 512 weights and MACs."""
  sp = space.ir_space(50)
  counts = model_testing.count_architecture(sp, sp.baseline(), (112, 112), 3, 0)
  assert abs(counts.params - 43.6e6) <= 0.005 * 43.6e6, counts
  assert abs(counts.macs - 6.31e9) <= 0.01 * 6.31e9, counts
  with_head = model_testing.count_architecture(sp, sp.baseline(), (112, 112), 3, 85742)
  assert (with_head.params - counts.params, with_head.macs - counts.macs) == (
      85742 * 512, 85742 * 512)
  # A refined architecture is smaller: every node separable.
  sep = model_testing.count_architecture(sp, ['sep3x3'] * 48, (112, 112), 3, 0)
  assert sep.params < 0.5 * counts.params and sep.macs < 0.2 * counts.macs


def test_ir_count_by_hand():
  """IR-18 at width 1/8 on 16x16, params summed by hand: stem (conv, BN, PReLU), per unit
  BN + 2 conv3x3 nodes (conv, BN) + PReLU (+ projection), output BN, Dense, bias-only BN."""
  conv = lambda k, cin, cout: k * k * cin * cout + 2 * cout  # conv + BN
  expected = conv(3, 3, 8) + 8
  cin = 8
  for c in (8, 16, 32, 64):
    for u in range(2):
      expected += 2 * cin + conv(3, cin, c) + c + conv(3, c, c)
      if u == 0:
        expected += conv(1, cin, c)
      cin = c
  expected += 2 * 64 + 64 * 20 + 20 + 20  # 16x16 -> 1x1 after four stride-2 stages
  sp = space.ir_space(18, width=0.125, embedding_size=20)
  assert model_testing.count_architecture(sp, sp.baseline(), (16, 16), 3, 0).params == expected
  assert model_testing.count_architecture(sp, sp.baseline(), (16, 16), 3, 7).params == (
      expected + 7 * 20)


@pytest.mark.parametrize('width,rule,hw', [(0.0625, 'paper', (15, 15)), (0.125, 'all', (20, 13))])
def test_ir_analytic_params_equal_initialised_fixed_network(width, rule, hw):
  """count_architecture's params == the params of the initialised fixed IResNet(arch=...)
  (margin head included), by jax.eval_shape; odd sizes exercise SAME padding."""
  sp = space.ir_space(18, width=width, rule=rule, allowed=None, embedding_size=24)
  rng = np.random.default_rng(zlib.crc32(f'ir{width}{rule}'.encode()))
  archs = [sp.baseline()] + [_random_arch(rng, sp) for _ in range(3)]
  images = jax.ShapeDtypeStruct((2, *hw, 3), jnp.float32)
  for arch in archs:
    model = IResNet(sp, 7, arch=arch)
    variables = jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), images)
    analytic = model_testing.count_architecture(sp, arch, hw, 3, 7)
    assert _num_params(variables['params']) == analytic.params, sp.names(arch)


# ---------------------------------------------------------------------------
# SearchSpace.validate / names.


@pytest.fixture(scope='module')
def sp16():
  return space.resnet_space('resnet18', 'conv', rule='paper')


def test_validate_accepts_names_indices_and_arrays(sp16):
  rng = np.random.default_rng(0)
  arch = _random_arch(rng, sp16)
  names = [ops.OP_NAMES[i] for i in arch]
  assert sp16.validate(arch) == arch
  assert sp16.validate(names) == arch
  assert sp16.validate(np.asarray(arch, np.int32)) == arch
  assert sp16.validate(list(np.asarray(arch, np.int64))) == arch  # NumPy integer entries
  mixed = [names[i] if i % 2 else arch[i] for i in range(len(arch))]
  assert sp16.validate(mixed) == arch
  result = sp16.validate(np.asarray(arch))
  assert isinstance(result, tuple) and all(type(i) is int for i in result)


def test_names_round_trip(sp16):
  rng = np.random.default_rng(1)
  for _ in range(5):
    arch = _random_arch(rng, sp16)
    names = sp16.names(arch)
    assert all(isinstance(n, str) for n in names) and len(names) == sp16.num_nodes
    assert sp16.validate(names) == arch
    assert sp16.names(names) == names


def test_validate_wrong_length(sp16):
  with pytest.raises(ValueError, match=r"has 15 entries but search space 'resnet18-16' has 16 nodes"):
    sp16.validate(sp16.baseline()[:-1])
  with pytest.raises(ValueError, match='has 17 entries'):
    sp16.validate(sp16.baseline() + (0,))


def test_validate_unknown_op_name(sp16):
  arch = list(sp16.names(sp16.baseline()))
  arch[3] = 'conv7x7'
  with pytest.raises(ValueError, match="unknown op 'conv7x7'"):
    sp16.validate(arch)


@pytest.mark.parametrize('bad', [6, -1, 100])
def test_validate_out_of_range_index(sp16, bad):
  arch = list(sp16.baseline())
  arch[5] = bad
  with pytest.raises(ValueError,
                     match=rf'op index {bad} at node 5 \(stage2.block0.conv2\) is out of range'):
    sp16.validate(arch)


def test_validate_op_not_allowed(sp16):
  """conv5x5 exists but is not a 'paper' candidate: rejected by name and by index."""
  arch = list(sp16.baseline())
  arch[2] = 'conv5x5'
  pattern = r"op 'conv5x5' is not a candidate of node 2 \(stage1.block1.conv1\)"
  with pytest.raises(ValueError, match=pattern):
    sp16.validate(arch)
  arch[2] = ops.OP_NAMES.index('conv5x5')
  with pytest.raises(ValueError, match=pattern):
    sp16.validate(arch)
  with pytest.raises(ValueError, match=pattern):
    sp16.names(arch)


@pytest.mark.parametrize('bad', [True, 1.0, None])
def test_validate_rejects_non_index_entries(sp16, bad):
  """Booleans and floats are not op indices (a bool would otherwise pass as 0 or 1)."""
  arch = list(sp16.baseline())
  arch[0] = bad
  with pytest.raises(ValueError, match='neither an op name nor an index'):
    sp16.validate(arch)


def test_branch_table_matches_candidates():
  """branch_table maps op index -> position in the node's candidates, -1 where not allowed."""
  sp = space.resnet_space('resnet18', 'block', rule='paper', allowed=('sep3x3', 'avg3x3'))
  table = sp.branch_table()
  chex.assert_shape(table, (8, len(ops.OP_NAMES)))
  expected_row = [0, -1, 1, -1, -1, 2]  # conv3x3, sep3x3, avg3x3
  np.testing.assert_array_equal(table, np.tile(expected_row, (8, 1)))
  np.testing.assert_array_equal(table >= 0, sp.candidate_mask())
