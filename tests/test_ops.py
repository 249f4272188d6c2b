"""Tests for nar_jax.ops: operator shapes, analytic counts and the custom-VJP conv2d."""

import itertools
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nar_jax import ops

# ---------------------------------------------------------------------------
# Helpers.


def _num_params(params) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(params))


def _reference_conv(x, kernel, stride, groups=1):
  """XLA's own SAME convolution: the ground truth for :func:`ops.conv2d`."""
  return jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), 'SAME', dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
      feature_group_count=groups)


def _value_and_grads(conv, x, kernel, cotangent):
  """Output of ``conv(x, kernel)`` and the VJP of ``cotangent`` w.r.t. x and kernel."""
  out, vjp = jax.vjp(conv, x, kernel)
  dx, dk = vjp(cotangent)
  return out, dx, dk


def _jit_value_and_grads(conv, x, kernel, cotangent):
  """:func:`_value_and_grads` compiled as one program (much faster than op-by-op)."""
  return jax.jit(lambda a, b, c: _value_and_grads(conv, a, b, c))(x, kernel, cotangent)


def _random_inputs(seed, batch, height, width, channels, kernel_shape, stride):
  """Input, kernel and output cotangent (NumPy RNG: no per-shape compilation)."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((batch, height, width, channels), np.float32)
  kernel = rng.standard_normal(kernel_shape, np.float32) / math.sqrt(np.prod(kernel_shape[:3]))
  out_shape = (batch, -(-height // stride), -(-width // stride), kernel_shape[-1])
  cotangent = rng.standard_normal(out_shape, np.float32)
  return jnp.asarray(x), jnp.asarray(kernel), jnp.asarray(cotangent)


# ---------------------------------------------------------------------------
# same_padding.


@pytest.mark.parametrize('size,kernel,stride', [(8, 3, 1), (8, 3, 2), (7, 3, 2), (7, 5, 2),
                                                (7, 1, 2), (6, 5, 1), (5, 3, 3)])
def test_same_padding_output_size_and_total(size, kernel, stride):
  """SAME output is ceil(size / stride); the padding makes the last window fit exactly."""
  (low, high), out = ops.same_padding(size, kernel, stride)
  assert out == math.ceil(size / stride)
  assert (out - 1) * stride + kernel <= size + low + high
  assert high - low in (0, 1)  # TensorFlow convention: the extra pixel goes on the high side.


# ---------------------------------------------------------------------------
# Operator shapes and parameter counts.

_SHAPE_CASES = list(itertools.product(
    ops.OP_NAMES,
    [1, 2],               # stride
    [(4, 4), (4, 8)],     # (in_channels, out_channels): same and changed
    [(8, 8), (7, 7), (7, 6)],  # even, odd and mixed spatial sizes
))


@pytest.mark.parametrize('op,stride,channels,hw', _SHAPE_CASES)
def test_operator_output_shape_and_param_count(op, stride, channels, hw):
  """Every op maps (B,H,W,Cin) -> (B,ceil(H/s),ceil(W/s),Cout), with exactly the analytic params.

  The parameter count of the initialised module is compared with ``count_op`` (the
  analytic count that also drives the 'paper' candidate rule and the reports), and
  ``count_op``'s output size is compared with the module's.
  """
  cin, cout = channels
  # Abstract evaluation traces the real module code without compiling anything; the
  # numerical behaviour of every op is exercised by the train-mode test below.
  x = jax.ShapeDtypeStruct((2, *hw, cin), jnp.float32)
  module = ops.Operator(op, cout, stride)
  variables = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), x)
  y = jax.eval_shape(lambda v, x: module.apply(v, x, train=False), variables, x)
  expected_hw = (math.ceil(hw[0] / stride), math.ceil(hw[1] / stride))
  chex.assert_shape(y, (2, *expected_hw, cout))
  assert y.dtype == jnp.float32

  counts, out_hw = ops.count_op(op, cin, cout, stride, hw)
  assert out_hw == expected_hw
  assert _num_params(variables['params']) == counts.params
  # BatchNorm statistics exist but are not counted as trainable parameters.
  assert _num_params(variables['batch_stats']) == 2 * cout


# Every op with stride 2 and a channel change; the pools also without a projection (no conv).
@pytest.mark.parametrize('op,stride,cout', [(op, 2, 8) for op in ops.OP_NAMES] +
                         [('max3x3', 1, 4), ('avg3x3', 1, 4)])
def test_operator_runs_and_train_mode_updates_batch_stats(op, stride, cout):
  """Each operator runs (odd 7x7 input) and in train mode its own BatchNorm normalises the
  output and updates its running statistics."""
  x = jnp.asarray(np.random.default_rng(1).standard_normal((4, 7, 7, 4), np.float32) + 3.0)
  module = ops.Operator(op, cout, stride)

  @jax.jit
  def init_and_train_apply(x):
    variables = module.init(jax.random.key(0), x, train=False)
    return variables, module.apply(variables, x, train=True, mutable=['batch_stats'])

  variables, (y, updates) = init_and_train_apply(x)
  size = math.ceil(7 / stride)
  chex.assert_shape(y, (4, size, size, cout))
  chex.assert_tree_all_finite(y)
  # Train-mode output is batch-normalised per channel: zero mean, unit variance.
  np.testing.assert_allclose(np.mean(y, axis=(0, 1, 2)), 0.0, atol=1e-4)
  np.testing.assert_allclose(np.var(y, axis=(0, 1, 2)), 1.0, atol=1e-2)
  mean = updates['batch_stats']['bn']['mean']
  assert not np.allclose(mean, variables['batch_stats']['bn']['mean'])


@pytest.mark.parametrize('stride', [1, 2])
@pytest.mark.parametrize('hw', [(32, 32), (7, 9)])
def test_count_op_macs_match_hand_formula(stride, hw):
  """MACs of conv3x3 and sep5x5 against the textbook formulas.

  conv KxK: K*K*Cin*Cout*Ho*Wo.  sep KxK: depthwise K*K*Cin*Ho*Wo + pointwise Cin*Cout*Ho*Wo.
  Params: the kernels plus 2*Cout BatchNorm scale and bias.
  """
  cin, cout = 16, 24
  ho, wo = math.ceil(hw[0] / stride), math.ceil(hw[1] / stride)

  counts, out_hw = ops.count_op('conv3x3', cin, cout, stride, hw)
  assert out_hw == (ho, wo)
  assert counts.macs == 9 * cin * cout * ho * wo
  assert counts.params == 9 * cin * cout + 2 * cout

  counts, out_hw = ops.count_op('sep5x5', cin, cout, stride, hw)
  assert out_hw == (ho, wo)
  assert counts.macs == 25 * cin * ho * wo + cin * cout * ho * wo
  assert counts.params == 25 * cin + cin * cout + 2 * cout


def test_count_op_pooling():
  """Pooling costs no MACs; a channel change adds a 1x1 projection after the pool."""
  for op in ('max3x3', 'avg3x3'):
    counts, out_hw = ops.count_op(op, 8, 8, 2, (9, 9))
    assert out_hw == (5, 5)
    assert counts == ops.Counts(2 * 8, 0)
    counts, out_hw = ops.count_op(op, 8, 16, 2, (9, 9))
    assert counts == ops.Counts(8 * 16 + 2 * 16, 8 * 16 * 5 * 5)


# ---------------------------------------------------------------------------
# conv2d: values and gradients equal lax.conv_general_dilated's.

_DENSE_CASES = [
    # (kernel, stride, height, width, c_in, c_out)
    (1, 1, 8, 8, 3, 5),
    (1, 2, 7, 7, 4, 4),
    (3, 1, 8, 8, 4, 4),
    (3, 1, 7, 5, 3, 6),
    (3, 2, 8, 8, 4, 8),
    (3, 2, 7, 7, 4, 8),
    (3, 2, 6, 9, 5, 3),
    (5, 1, 8, 8, 4, 4),
    (5, 2, 7, 7, 3, 6),
    (5, 2, 8, 6, 6, 2),
]


@pytest.mark.parametrize('k,stride,h,w,cin,cout', _DENSE_CASES)
def test_conv2d_dense_matches_lax(k, stride, h, w, cin, cout):
  """Dense conv2d (custom VJP) equals lax's SAME conv in value, d/dx and d/dkernel."""
  x, kernel, ct = _random_inputs(k * 100 + h, 2, h, w, cin, (k, k, cin, cout), stride)
  got = _jit_value_and_grads(lambda a, b: ops.conv2d(a, b, stride), x, kernel, ct)
  want = _jit_value_and_grads(lambda a, b: _reference_conv(a, b, stride), x, kernel, ct)
  chex.assert_shape(got[0], (2, math.ceil(h / stride), math.ceil(w / stride), cout))
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


_DEPTHWISE_CASES = [
    # (kernel, stride, height, width, channels)
    (3, 1, 8, 8, 4),
    (3, 2, 8, 8, 4),
    (3, 2, 7, 7, 3),
    (5, 1, 7, 6, 5),
    (5, 2, 7, 7, 4),
    (5, 2, 8, 5, 2),
]


@pytest.mark.parametrize('k,stride,h,w,c', _DEPTHWISE_CASES)
def test_conv2d_depthwise_matches_lax(k, stride, h, w, c):
  """Depthwise conv2d (groups == C) equals lax's conv with feature_group_count=C, with grads."""
  x, kernel, ct = _random_inputs(k * 100 + h + c, 2, h, w, c, (k, k, 1, c), stride)
  got = _jit_value_and_grads(lambda a, b: ops.conv2d(a, b, stride, groups=c), x, kernel, ct)
  want = _jit_value_and_grads(lambda a, b: _reference_conv(a, b, stride, groups=c), x, kernel, ct)
  chex.assert_shape(got[0], (2, math.ceil(h / stride), math.ceil(w / stride), c))
  chex.assert_trees_all_equal_shapes_and_dtypes(got, want)
  chex.assert_trees_all_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('groups,kind', [(1, 'dense'), (4, 'depthwise')])
@pytest.mark.parametrize('stride,h', [(1, 8), (2, 7)])
def test_conv2d_inside_switch_branch_matches_lax(groups, kind, stride, h):
  """Inside a lax.switch branch picked by a traced index under jit, conv2d still equals lax.

  Branch 0 is conv2d, branch 1 a different (scaled, shifted) conv, so the test also
  proves the traced index really selects: index 1 must give the other branch's result.
  """
  c = 4
  k = 3
  kernel_shape = (k, k, 1, c) if groups > 1 else (k, k, c, c)
  x, kernel, ct = _random_inputs(7 + h, 2, h, h, c, kernel_shape, stride)

  def other(a, b):
    return 2.0 * ops.conv2d(a, b, stride, groups) + 1.0

  branches = [lambda a, b: ops.conv2d(a, b, stride, groups), other]

  @jax.jit
  def switched(index, a, b, cot):
    return _value_and_grads(lambda a, b: jax.lax.switch(index, branches, a, b), a, b, cot)

  want = _jit_value_and_grads(lambda a, b: _reference_conv(a, b, stride, groups), x, kernel, ct)
  chex.assert_trees_all_close(switched(jnp.int32(0), x, kernel, ct), want, atol=1e-4, rtol=1e-4)

  want_other = _jit_value_and_grads(lambda a, b: 2.0 * _reference_conv(a, b, stride, groups) + 1.0,
                                x, kernel, ct)
  chex.assert_trees_all_close(switched(jnp.int32(1), x, kernel, ct), want_other,
                              atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize('groups', [1, 4])
def test_conv2d_in_a_switch_keeps_only_its_input_for_the_backward_pass(groups):
  """The residuals a switch of 5x5 convs carries to its backward pass: the input, not the
  25 shifted windows of a depthwise conv (each a materialised activation in a branch).
  """
  c, k = 4, 5
  kernel_shape = (k, k, 1, c) if groups > 1 else (k, k, c, c)
  x, kernel, _ = _random_inputs(11, 2, 8, 8, c, kernel_shape, 1)
  branches = [lambda a, b: ops.conv2d(a, b, 1, groups),
              lambda a, b: 2.0 * ops.conv2d(a, b, 1, groups) + 1.0]

  @jax.jit
  def residuals(index, a, b):
    _, vjp = jax.vjp(lambda a, b: jax.lax.switch(index, branches, a, b), a, b)
    return vjp  # a pytree whose leaves are the saved residuals

  activations = [leaf for leaf in jax.tree.leaves(residuals(jnp.int32(0), x, kernel))
                 if leaf.ndim == 4 and leaf.shape[0] == x.shape[0]]
  assert len(activations) <= 2, [leaf.shape for leaf in activations]


def test_conv2d_eager_and_vmapped_grads_match_lax():
  """conv2d eager (no jit) equals lax; per-example kernel gradients under vmap (the custom
  VJP's batching rule) equal lax's."""
  x, kernel, _ = _random_inputs(3, 3, 7, 7, 4, (3, 3, 4, 6), 2)
  chex.assert_trees_all_close(ops.conv2d(x, kernel, 2), _reference_conv(x, kernel, 2),
                              atol=1e-4, rtol=1e-4)
  g = lambda a: jax.grad(lambda b: jnp.sum(ops.conv2d(a[None], b, 2) ** 2))(kernel)
  ref = lambda a: jax.grad(lambda b: jnp.sum(_reference_conv(a[None], b, 2) ** 2))(kernel)
  chex.assert_trees_all_close(jax.jit(jax.vmap(g))(x), jax.jit(jax.vmap(ref))(x),
                              atol=1e-4, rtol=1e-4)


def test_conv2d_rejects_unsupported_groups():
  """Only dense and depthwise convolutions are supported; other groupings raise."""
  x = jnp.ones((1, 4, 4, 4))
  with pytest.raises(ValueError, match='groups=2'):
    ops.conv2d(x, jnp.ones((3, 3, 2, 4)), 1, groups=2)


# ---------------------------------------------------------------------------
# Unknown operator names.


@pytest.mark.parametrize('bad', ['conv7x7', 'identity', 'Conv3x3', ''])
def test_unknown_op_raises_value_error_naming_it(bad):
  """recipe / check_op_name / count_op / Operator reject an unknown op by name."""
  pattern = f'unknown op {bad!r}'
  with pytest.raises(ValueError, match=pattern):
    ops.check_op_name(bad)
  with pytest.raises(ValueError, match=pattern):
    ops.recipe(bad, 4, 4, 1)
  with pytest.raises(ValueError, match=pattern):
    ops.count_op(bad, 4, 4, 1, (8, 8))
  with pytest.raises(ValueError, match=pattern):
    ops.Operator(bad, 4).init(jax.random.key(0), jnp.ones((1, 4, 4, 4)), train=False)


def test_known_ops_pass_check():
  """Every name of the vocabulary is accepted (the check is not vacuous the other way)."""
  for op in ops.OP_NAMES:
    ops.check_op_name(op)
    assert ops.recipe(op, 4, 8, 2).out_channels == 8


# ---------------------------------------------------------------------------
# BatchNorm: flax's nn.BatchNorm semantics with a hand-written backward pass.


def _bn_loss(module, params, batch_stats, x, weights):
  """``sum(y * weights)`` of a train-mode BatchNorm, and its updated statistics."""
  y, updates = module.apply({'params': params, 'batch_stats': batch_stats}, x,
                            mutable=['batch_stats'])
  return jnp.sum(y.astype(jnp.float32) * weights), updates['batch_stats']


def _bn_pair(dtype, axis_name=None, train=True):
  import flax.linen as nn
  reference = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=2e-5,
                           axis_name=axis_name, dtype=dtype, param_dtype=jnp.float32)
  return reference, ops.BatchNorm(use_running_average=not train, axis_name=axis_name,
                                  epsilon=2e-5, dtype=dtype)


def _bn_inputs(batch=8):
  keys = jax.random.split(jax.random.PRNGKey(0), 4)
  x = 3.0 * jax.random.normal(keys[0], (batch, 5, 5, 6)) + 1.5
  params = {'scale': jax.random.uniform(keys[1], (6,), minval=0.5, maxval=2.0),
            'bias': jax.random.normal(keys[2], (6,))}
  stats = {'mean': jnp.linspace(-1.0, 1.0, 6), 'var': jnp.linspace(0.5, 2.0, 6)}
  return x, params, stats, jax.random.normal(keys[3], x.shape)


@pytest.mark.parametrize('dtype, tol', [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_batch_norm_matches_flax_values_gradients_and_statistics(dtype, tol):
  reference, mine = _bn_pair(dtype)
  x, params, stats, weights = _bn_inputs()
  x = x.astype(dtype)
  # Same variables, names and initial values.
  chex.assert_trees_all_equal(mine.init(jax.random.PRNGKey(1), x),
                              reference.init(jax.random.PRNGKey(1), x))
  grad = jax.jit(jax.value_and_grad(_bn_loss, argnums=(1, 3), has_aux=True),
                 static_argnums=0)
  (loss, new_stats), (d_params, dx) = grad(mine, params, stats, x, weights)
  (ref_loss, ref_stats), (ref_d_params, ref_dx) = grad(reference, params, stats, x, weights)
  assert dx.dtype == dtype
  chex.assert_trees_all_close(loss, ref_loss, rtol=tol)
  chex.assert_trees_all_close(new_stats, ref_stats, rtol=1e-6, atol=1e-6)
  chex.assert_trees_all_close(d_params, ref_d_params, rtol=tol, atol=tol)
  chex.assert_trees_all_close(dx.astype(jnp.float32), ref_dx.astype(jnp.float32), rtol=tol,
                              atol=tol)
  # Running averages: 0.9 * old + 0.1 * batch (biased variance).
  xf = x.astype(jnp.float32)
  chex.assert_trees_all_close(new_stats['mean'], 0.9 * stats['mean'] + 0.1 * xf.mean((0, 1, 2)),
                              rtol=1e-5, atol=1e-6)
  chex.assert_trees_all_close(new_stats['var'], 0.9 * stats['var'] + 0.1 * xf.var((0, 1, 2)),
                              rtol=1e-4, atol=1e-5)


def test_batch_norm_eval_mode_uses_running_statistics_like_flax():
  reference, mine = _bn_pair(jnp.float32, train=False)
  x, params, stats, _ = _bn_inputs()
  variables = {'params': params, 'batch_stats': stats}
  y = mine.apply(variables, x)
  chex.assert_trees_all_close(y, reference.apply(variables, x), rtol=1e-6, atol=1e-6)
  expected = (x - stats['mean']) / jnp.sqrt(stats['var'] + 2e-5) * params['scale'] + params['bias']
  chex.assert_trees_all_close(y, expected, rtol=1e-5, atol=1e-5)


def test_batch_norm_synchronised_over_devices_equals_the_global_batch():
  """Under shard_map, 4 devices x 2 examples: statistics, gradients and updates of the
  whole batch of 8, equal to flax's synchronised BatchNorm."""
  x, params, stats, weights = _bn_inputs(batch=8)
  mesh = jax.make_mesh((4,), ('data',))
  P = jax.sharding.PartitionSpec

  def sharded_grad(module):
    def device(params, x, weights):
      def loss(params, x):
        value, new_stats = _bn_loss(module, params, stats, x, weights)
        return jax.lax.psum(value, 'data'), new_stats
      return jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(params, x)
    return jax.jit(jax.shard_map(device, mesh=mesh, in_specs=(P(), P('data'), P('data')),
                                 out_specs=((P(), P()), (P(), P('data')))))

  put = lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec))
  args = (put(params, P()), put(x, P('data')), put(weights, P('data')))
  reference, mine = _bn_pair(jnp.float32, axis_name='data')
  out = sharded_grad(mine)(*args)
  chex.assert_trees_all_close(out, sharded_grad(reference)(*args), rtol=1e-5, atol=1e-5)
  _, single = _bn_pair(jnp.float32)
  whole = jax.value_and_grad(_bn_loss, argnums=(1, 3), has_aux=True)(single, params, stats, x,
                                                                     weights)
  chex.assert_trees_all_close(out, whole, rtol=1e-5, atol=1e-5)


def test_batch_norm_train_statistics_outputs_have_their_gradients():
  """The (mean, var) outputs' cotangents reach x as d mean / dx = 1/N, d var / dx = 2 (x - mean) / N."""
  x, params, _, _ = _bn_inputs()
  a, b = jnp.linspace(-1.0, 1.0, 6), jnp.linspace(0.5, 1.5, 6)

  def through_ops(x):
    _, mean, var = ops.batch_norm_train(x, params['scale'], params['bias'], 1e-5, None,
                                        jnp.float32)
    return jnp.sum(mean * a + var * b)

  def plain(x):
    return jnp.sum(x.mean((0, 1, 2)) * a + x.var((0, 1, 2)) * b)

  chex.assert_trees_all_close(jax.grad(through_ops)(x), jax.grad(plain)(x), rtol=1e-4, atol=1e-6)
