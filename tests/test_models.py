"""Tests for nar_jax.models.resnet: supernet == fixed network, one trace, branch masks.

The supernet (``arch=None``) selects each node's branch with ``nn.switch`` on a traced
op index; the fixed network (``arch=...``) only holds the chosen ops. For any
architecture, the supernet run with ``op_indices=arch`` must compute exactly what the
fixed network computes on ``select_branches(supernet_variables, arch)``.

Variables are built with ``jax.eval_shape(init)`` and then filled with random NumPy
values: (a) every parameter and BatchNorm statistic (including running means and
variances, which ``init`` sets to 0 and 1) is non-trivial, so a wrong branch or a wrong
statistic shows up in the logits, and (b) no ``init`` (96 random initialisers for a
ResNet-18 supernet) needs compiling on a 2-core CPU.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import controller, ops, space
from nar_jax.models.nodes import branch_mask, select_branches
from nar_jax.models.resnet import ResNet

from model_testing import random_variables, leaf_paths, assert_gradients_follow_mask

NUM_CLASSES = 5
IMAGE_SHAPE = (4, 8, 8, 3)
NUM_ARCHS = 3  # random architectures compared per granularity
TOL = dict(atol=1e-4, rtol=1e-4)


@dataclasses.dataclass
class Setup:
  space: space.SearchSpace
  net: ResNet
  variables: dict
  images: jax.Array
  run: callable                   # jitted supernet: (variables, images, arch) -> outputs
  archs: list                     # tuples of op indices
  supernet_out: list              # run(...) for each arch
  fixed_out: list                 # the fixed network's (eval logits, train logits, stats)


def _apply_both_modes(net, variables, images, *op_indices):
  """(eval logits, train logits, train-updated batch_stats) of one network."""
  eval_logits = net.apply(variables, images, *op_indices, train=False)
  train_logits, updates = net.apply(variables, images, *op_indices, train=True,
                                    mutable=['batch_stats'])
  return eval_logits, train_logits, updates['batch_stats']


@pytest.fixture(scope='module', params=['conv', 'block'])
def setup(request) -> Setup:
  """A width-1/16 ResNet-18 supernet (rule 'all': every op at every node) and, for a few
  random architectures, its outputs and the matching fixed network's outputs."""
  granularity = request.param
  sp = space.resnet_space('resnet18', granularity, width=0.0625, rule='all')
  net = ResNet(sp, NUM_CLASSES)
  images = jnp.asarray(np.random.default_rng(0).standard_normal(IMAGE_SHAPE), jnp.float32)
  baseline = jnp.asarray(sp.baseline(), jnp.int32)
  shapes = jax.eval_shape(lambda x, a: net.init(jax.random.key(0), x, a, train=False),
                          images, baseline)
  variables = random_variables(shapes, seed=1 if granularity == 'conv' else 2)

  # One compiled function serves every architecture; chex fails the test that
  # triggers a second trace. chex counts traces per function *code*, shared by both
  # granularities of this fixture, so reset the counter first.
  chex.clear_trace_counter()

  @chex.assert_max_traces(n=1)
  def run(variables, images, op_indices):
    return _apply_both_modes(net, variables, images, op_indices)

  run = jax.jit(run)
  mask = jnp.asarray(sp.candidate_mask())
  keys = jax.random.split(jax.random.key(10), NUM_ARCHS)
  archs = [tuple(int(a) for a in controller.uniform_sample(k, mask)) for k in keys]
  supernet_out, fixed_out = [], []
  for arch in archs:
    supernet_out.append(run(variables, images, jnp.asarray(arch, jnp.int32)))
    fixed = ResNet(sp, NUM_CLASSES, arch=arch)
    # jit: one compilation per fixed net is cheaper than op-by-op dispatch on CPU.
    fixed_run = jax.jit(lambda v, x, fixed=fixed: _apply_both_modes(fixed, v, x))
    fixed_out.append(fixed_run(select_branches(variables, arch), images))
  return Setup(sp, net, variables, images, run, archs, supernet_out, fixed_out)


# ---------------------------------------------------------------------------
# Supernet == fixed network.


def test_fixed_variables_are_the_selected_branches(setup):
  """select_branches keeps exactly one op subtree per node: the fixed net's own variables."""
  for arch in setup.archs:
    fixed = ResNet(setup.space, NUM_CLASSES, arch=arch)
    shapes = jax.eval_shape(lambda x: fixed.init(jax.random.key(0), x, train=False),
                            setup.images)
    selected = select_branches(setup.variables, arch)
    chex.assert_trees_all_equal_shapes(selected, shapes)
    for i, op in enumerate(arch):
      assert list(selected['params'][f'node{i:02d}']) == [ops.OP_NAMES[op]]


def test_supernet_equals_fixed_eval_mode(setup):
  """Eval mode (running BN statistics): identical logits for every architecture."""
  for arch, sup, fix in zip(setup.archs, setup.supernet_out, setup.fixed_out):
    chex.assert_shape(sup[0], (IMAGE_SHAPE[0], NUM_CLASSES))
    chex.assert_trees_all_close(sup[0], fix[0], **TOL, custom_message=str(arch))


def test_supernet_equals_fixed_train_mode_logits(setup):
  """Train mode (batch statistics): identical logits for every architecture."""
  for arch, sup, fix in zip(setup.archs, setup.supernet_out, setup.fixed_out):
    chex.assert_trees_all_close(sup[1], fix[1], **TOL, custom_message=str(arch))


def test_architectures_actually_differ(setup):
  """Guards the equality tests: different architectures give different logits, so a
  supernet that ignored op_indices could not pass them."""
  logits = [sup[0] for sup in setup.supernet_out]
  for i in range(len(logits)):
    for j in range(i + 1, len(logits)):
      if setup.archs[i] != setup.archs[j]:
        assert not np.allclose(logits[i], logits[j], atol=1e-3)


def test_supernet_equals_fixed_train_mode_batch_stats(setup):
  """Train mode: the supernet's updated BN statistics, restricted to the architecture,
  equal the fixed network's updated statistics (stem, shortcuts and selected branches)."""
  for arch, sup, fix in zip(setup.archs, setup.supernet_out, setup.fixed_out):
    chex.assert_trees_all_close(select_branches(sup[2], arch), fix[2], **TOL,
                                custom_message=str(arch))


def test_train_mode_leaves_unselected_branches_untouched(setup):
  """BN statistics of branches that did not run keep their values exactly; those outside
  nodes (stem, shortcut BNs) are updated."""
  before = setup.variables['batch_stats']
  for arch, sup in zip(setup.archs, setup.supernet_out):
    after = sup[2]
    chex.assert_trees_all_equal_structs(after, before)
    used = branch_mask(before, jnp.asarray(arch))
    for (path, b), a, u in zip(jax.tree_util.tree_leaves_with_path(before),
                               jax.tree.leaves(after), jax.tree.leaves(used)):
      if not bool(u):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert not np.allclose(after['stem_bn']['mean'], before['stem_bn']['mean'])


def test_supernet_gradients_equal_fixed_gradients(monkeypatch):
  """Train-mode parameter gradients: on the selected branches (and stem, shortcuts, head)
  they equal the fixed network's; every unselected branch gets exactly zero gradient.

  Compiling the backward pass of a whole ResNet-18 supernet is slow on CPU, so this runs
  on a two-block base network registered just for the test (same code paths: a stride-1
  block and a downsampling block with a projection shortcut), with three candidates:
  a dense conv, a separable conv and a pool (no kernel at stride-1 nodes, a 1x1
  projection at the channel-changing node).
  """
  monkeypatch.setitem(space.BASE_NETWORKS, 'tiny', (4, ((1, 4, 1), (1, 8, 2))))
  sp = space.resnet_space('tiny', 'conv', rule='all', allowed=('conv3x3', 'sep3x3', 'max3x3'))
  net = ResNet(sp, NUM_CLASSES)
  images = jnp.asarray(np.random.default_rng(3).standard_normal(IMAGE_SHAPE), jnp.float32)
  shapes = jax.eval_shape(lambda x, a: net.init(jax.random.key(0), x, a, train=False),
                          images, jnp.asarray(sp.baseline(), jnp.int32))
  variables = random_variables(shapes, seed=4)
  target = jax.nn.one_hot(jnp.arange(IMAGE_SHAPE[0]) % NUM_CLASSES, NUM_CLASSES)

  def loss(model, params, batch_stats, *op_indices):
    logits, _ = model.apply({'params': params, 'batch_stats': batch_stats}, images,
                            *op_indices, train=True, mutable=['batch_stats'])
    return -jnp.mean(jnp.sum(target * jax.nn.log_softmax(logits), axis=-1))

  supernet_grad = jax.jit(jax.grad(lambda p, a: loss(net, p, variables['batch_stats'], a)))
  # Pools at some nodes, convs at others: exercises branches with and without kernels.
  archs = [tuple(ops.OP_NAMES.index(op) for op in names) for names in (
      ('sep3x3', 'max3x3', 'max3x3', 'conv3x3'), ('max3x3', 'conv3x3', 'sep3x3', 'sep3x3'))]
  for arch in archs:
    grads = supernet_grad(variables['params'], jnp.asarray(arch, jnp.int32))
    fixed = ResNet(sp, NUM_CLASSES, arch=arch)
    fixed_vars = select_branches(variables, arch)
    fixed_grads = jax.jit(jax.grad(lambda p: loss(fixed, p, fixed_vars["batch_stats"])))(
        fixed_vars['params'])
    chex.assert_trees_all_close(select_branches(grads, arch), fixed_grads, **TOL)
    used = branch_mask(grads, jnp.asarray(arch))
    assert_gradients_follow_mask(grads, used)


# ---------------------------------------------------------------------------
# One trace for every architecture.


def test_one_trace_serves_many_architectures(setup):
  """The jitted supernet (wrapped in chex.assert_max_traces(n=1)) runs more architectures,
  including the baseline and the all-pooling net, without retracing."""
  mask = jnp.asarray(setup.space.candidate_mask())
  archs = [controller.uniform_sample(jax.random.key(100 + i), mask) for i in range(5)]
  archs.append(jnp.asarray(setup.space.baseline(), jnp.int32))
  archs.append(jnp.full((setup.space.num_nodes,), ops.OP_NAMES.index('max3x3'), jnp.int32))
  outputs = [setup.run(setup.variables, setup.images, a) for a in archs]
  for out in outputs:
    chex.assert_shape(out[:2], (IMAGE_SHAPE[0], NUM_CLASSES))
    chex.assert_tree_all_finite(out)
  assert not np.allclose(outputs[-1][0], outputs[-2][0], atol=1e-3)


def test_assert_max_traces_detects_a_retrace():
  """Control for the test above: the same harness fails when a function is retraced."""

  @chex.assert_max_traces(n=1)
  def static_arch(x, arch):
    return x * len(arch)

  f = jax.jit(static_arch, static_argnums=1)
  f(jnp.ones(2), (1, 2))
  with pytest.raises(AssertionError, match='traced'):
    f(jnp.ones(2), (1, 2, 3))


# ---------------------------------------------------------------------------
# branch_mask.


def test_branch_mask_marks_exactly_the_selected_branches(setup):
  """True exactly on the leaves select_branches keeps (everything outside nodes is True),
  also when the architecture is traced under jit."""
  jit_mask = jax.jit(branch_mask)
  for arch in setup.archs:
    for collection in ('params', 'batch_stats'):
      tree = setup.variables[collection]
      for mask in (branch_mask(tree, jnp.asarray(arch)), jit_mask(tree, jnp.asarray(arch))):
        chex.assert_trees_all_equal_structs(mask, tree)
        true_paths = {jax.tree_util.keystr(p)
                      for p, m in jax.tree_util.tree_leaves_with_path(mask) if bool(m)}
        assert true_paths == leaf_paths(select_branches(tree, arch))
        for path, m in jax.tree_util.tree_leaves_with_path(mask):
          assert m.shape == () and m.dtype == jnp.bool_
          if not jax.tree_util.keystr(path[:1]).startswith("['node"):
            assert bool(m), path
  # Sanity: each node contributes only its chosen op, so most node leaves are False.
  mask = branch_mask(setup.variables['params'], jnp.asarray(setup.archs[0]))
  num_true = sum(bool(m) for m in jax.tree.leaves(mask))
  assert 0 < num_true < len(jax.tree.leaves(mask))


# ---------------------------------------------------------------------------
# Misuse.


def test_op_indices_only_for_the_supernet(setup):
  """Fixed net + op_indices, or supernet without op_indices, raise a ValueError."""
  arch = setup.archs[0]
  fixed = ResNet(setup.space, NUM_CLASSES, arch=arch)
  fixed_vars = select_branches(setup.variables, arch)
  with pytest.raises(ValueError, match='pass op_indices to the supernet'):
    fixed.apply(fixed_vars, setup.images, jnp.asarray(arch), train=False)
  with pytest.raises(ValueError, match='pass op_indices to the supernet'):
    setup.net.apply(setup.variables, setup.images, train=False)
  with pytest.raises(ValueError, match='pass op_indices to the supernet'):
    setup.net.init(jax.random.key(0), setup.images, train=False)


def test_invalid_architectures_are_rejected_by_validate():
  """``lax.switch`` would silently clamp an out-of-range index (README, "Design
  notes": one compiled step), and the
  supernet's op->branch table maps a disallowed op to branch 0, so validation must catch
  both before an architecture reaches the network."""
  sp = space.resnet_space('resnet18', 'conv', width=0.0625, rule='paper')
  mask = jnp.asarray(sp.candidate_mask())
  # Everything the (masked) samplers produce is valid...
  for i in range(5):
    arch = controller.uniform_sample(jax.random.key(i), mask)
    assert sp.validate(np.asarray(arch)) == tuple(int(a) for a in arch)
  # ... and anything else is not: the error names the node and the problem.
  node = r'node 7 \(stage2\.block1\.conv2\)'
  for bad, pattern in [(len(ops.OP_NAMES), rf'op index 6 at {node} is out of range'),
                       (-1, rf'op index -1 at {node} is out of range'),
                       (ops.OP_NAMES.index('conv5x5'), rf"op 'conv5x5' is not a candidate of {node}")]:
    arch = np.asarray(sp.baseline())
    arch[7] = bad
    with pytest.raises(ValueError, match=pattern):
      sp.validate(arch)
