"""The ENAS LSTM controller as pure functions: ``init`` / ``sample`` / ``log_prob``.

The controller emits one operator per node, autoregressively (ENAS macro search;
README, "Design notes": ENAS's controller and recipe): a one-layer LSTM without bias
(64 units, weights uniform in +-0.1) reads a learned start embedding at step 0 and
afterwards the embedding of the operator it just sampled; logits are
``tanh_constant * tanh(h @ W_softmax)``. Ops a node does not allow are masked out of its
softmax, so they are never sampled.

Everything is a pure function of ``(params, key, mask)`` and runs as one
``lax.scan`` over nodes, so sampling can live inside jitted training steps.

Variants (:data:`VARIANTS`, chosen by ``search.controller.kind``): ``'enas'`` is the
controller above, exactly. ENAS's controller has one softmax shared by every node and
only the previous op as input, so it cannot tell which node it decides: it learns a
per-node target slowly (README, "Controller variants"). ``'node_aware'`` adds a
learned embedding of the node's position to the LSTM input and a learned per-node
logit bias (zero at init, so the initial policy is ENAS's) after the tanh squashing.

The joint controller (``init_joint`` / ``sample_joint`` / ``log_prob_joint`` /
``most_likely_joint``) also samples ENAS's skip connections after each operator,
for the NAS-Arch baseline over :mod:`nar_jax.joint`'s macro space.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nar_jax import joint

Params = dict[str, jax.Array]

_MASKED_LOGIT = -1e9


class Sample(NamedTuple):
  """One sampled architecture.

  Attributes:
    arch: ``(num_nodes,)`` int32 op indices.
    log_prob: scalar, ``sum_j log p(a_j | a_<j)``.
    sample_entropy: scalar, ENAS's entropy bonus ``sum_j -log p(a_j) * p(a_j)``
      (of the sampled ops, no gradient).
    entropy: ``(num_nodes,)`` full entropy of each node's masked softmax.
  """

  arch: jax.Array
  log_prob: jax.Array
  sample_entropy: jax.Array
  entropy: jax.Array


def init(key: jax.Array, num_ops: int, hidden: int = 64, init_range: float = 0.1) -> Params:
  """Controller parameters, every weight uniform in ``[-init_range, init_range]``.

  Returns a dict with ``lstm_kernel (2H, 4H)`` (input and hidden stacked, gates
  i, f, o, g), ``start_embedding (H,)``, ``op_embedding (num_ops, H)`` and
  ``softmax_kernel (H, num_ops)``.
  """
  shapes = {
      'lstm_kernel': (2 * hidden, 4 * hidden),
      'start_embedding': (hidden,),
      'op_embedding': (num_ops, hidden),
      'softmax_kernel': (hidden, num_ops),
  }
  keys = jax.random.split(key, len(shapes))
  return {name: jax.random.uniform(k, shape, jnp.float32, -init_range, init_range)
          for k, (name, shape) in zip(keys, sorted(shapes.items()))}


class Variant(NamedTuple):
  """How a controller variant reads a node and scores its ops (pure functions).

  Attributes:
    init_extra: ``(key, num_nodes, num_ops, hidden, init_range) -> Params``, the
      parameters the variant adds to :func:`init`'s.
    step_input: ``(params, node, x (H,)) -> (H,)``, the LSTM input at ``node``'s op
      decision given the input ``x`` ENAS feeds there.
    logits: ``(params, node, h (H,), tanh_constant) -> (num_ops,)`` op logits (unmasked).
  """

  init_extra: Callable[..., Params]
  step_input: Callable[[Params, jax.Array, jax.Array], jax.Array]
  logits: Callable[[Params, jax.Array, jax.Array, float], jax.Array]


def _enas_logits(params: Params, node: jax.Array, h: jax.Array, tanh_constant: float):
  """ENAS: ``tanh_constant * tanh(h @ W_softmax)``, the same for every node."""
  return tanh_constant * jnp.tanh(h @ params['softmax_kernel'])


def _node_aware_extra(key: jax.Array, num_nodes: int, num_ops: int, hidden: int,
                      init_range: float) -> Params:
  """``node_embedding (num_nodes, H)`` uniform in ``+-init_range``, ``node_bias
  (num_nodes, num_ops)`` zero."""
  return {'node_embedding': jax.random.uniform(key, (num_nodes, hidden), jnp.float32,
                                               -init_range, init_range),
          'node_bias': jnp.zeros((num_nodes, num_ops), jnp.float32)}


ENAS = Variant(
    init_extra=lambda key, num_nodes, num_ops, hidden, init_range: {},
    step_input=lambda params, node, x: x,
    logits=_enas_logits)
"""ENAS's controller, exactly."""

NODE_AWARE = Variant(
    init_extra=_node_aware_extra,
    step_input=lambda params, node, x: x + params['node_embedding'][node],
    logits=lambda params, node, h, tanh_constant: (
        _enas_logits(params, node, h, tanh_constant) + params['node_bias'][node]))
"""ENAS's controller told which node it decides: the LSTM input plus the node's
embedding, the logits plus the node's bias."""

VARIANTS: dict[str, Variant] = {'enas': ENAS, 'node_aware': NODE_AWARE}
"""Controller variants by ``search.controller.kind``."""


def init_variant(key: jax.Array, variant: Variant, num_nodes: int, num_ops: int,
                 hidden: int = 64, init_range: float = 0.1) -> Params:
  """:func:`init`'s parameters (the same for the same ``key``) plus ``variant``'s."""
  params = init(key, num_ops, hidden, init_range)
  params.update(variant.init_extra(jax.random.fold_in(key, 1), num_nodes, num_ops, hidden,
                                   init_range))
  return params


def _lstm_cell(kernel: jax.Array, x: jax.Array, h: jax.Array, c: jax.Array):
  """ENAS's bias-free LSTM cell; ``x, h, c`` are ``(H,)``."""
  i, f, o, g = jnp.split(jnp.concatenate([x, h]) @ kernel, 4)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return h, c


def _masked_logits(variant: Variant, params: Params, node: jax.Array, h: jax.Array,
                   mask: jax.Array, tanh_constant: float, prior: jax.Array):
  """``variant``'s op logits of ``node`` plus its ``prior`` offsets, ops outside
  ``mask (num_ops,)`` at -1e9."""
  return jnp.where(mask, variant.logits(params, node, h, tanh_constant) + prior, _MASKED_LOGIT)


def _prior_or_zeros(prior: jax.Array | None, mask: jax.Array) -> jax.Array:
  return jnp.zeros(mask.shape, jnp.float32) if prior is None else jnp.asarray(prior, jnp.float32)


def original_prior(mask: np.ndarray, original: Sequence[int], original_prob: float) -> np.ndarray:
  """Logit offsets ``(num_nodes, num_ops)`` that start a search near the base network.

  With these offsets added to near-zero logits, node ``j`` picks its original operator
  ``original[j]`` with probability ``original_prob`` and each of its other ``K_j - 1``
  candidates with ``(1 - original_prob) / (K_j - 1)``: offset
  ``log(original_prob (K_j - 1) / (1 - original_prob))`` on the original op, 0 elsewhere.
  ``original_prob <= 1 / K_j`` (e.g. 0) leaves node ``j`` uniform (offset 0); a node with
  one candidate gets none.
  """
  if not 0.0 <= original_prob < 1.0:
    raise ValueError(f'original_prob must be in [0, 1), got {original_prob}')
  mask = np.asarray(mask, bool)
  prior = np.zeros(mask.shape, np.float32)
  for j, op in enumerate(original):
    others = int(mask[j].sum()) - 1
    if not mask[j, op]:
      raise ValueError(f'original op {op} of node {j} is not one of its candidates')
    if others > 0 and original_prob * (others + 1) > 1.0:
      prior[j, op] = np.log(original_prob * others / (1.0 - original_prob))
  return prior


def _entropy(log_p: jax.Array) -> jax.Array:
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _decode(params: Params, mask: jax.Array, tanh_constant: float, choose,
            variant: Variant = ENAS, prior: jax.Array | None = None):
  """Runs the LSTM over nodes; ``choose(node, log_p) -> op`` picks each node's op.

  Returns ``(arch (N,), log_p (N, K))`` where ``log_p`` are the masked log-softmaxes.
  ``prior``: optional ``(N, K)`` logit offsets (:func:`original_prior`).
  """
  hidden = params['start_embedding'].shape[0]

  def step(carry, inputs):
    h, c, x = carry
    node, node_mask, node_prior = inputs
    h, c = _lstm_cell(params['lstm_kernel'], variant.step_input(params, node, x), h, c)
    log_p = jax.nn.log_softmax(_masked_logits(variant, params, node, h, node_mask,
                                              tanh_constant, node_prior))
    op = choose(node, log_p)
    return (h, c, params['op_embedding'][op]), (op, log_p)

  zeros = jnp.zeros((hidden,), jnp.float32)
  num_nodes = mask.shape[0]
  _, (arch, log_p) = jax.lax.scan(step, (zeros, zeros, params['start_embedding']),
                                  (jnp.arange(num_nodes), mask, _prior_or_zeros(prior, mask)))
  return arch.astype(jnp.int32), log_p


def _summarise(arch: jax.Array, log_p: jax.Array) -> Sample:
  chosen = jnp.take_along_axis(log_p, arch[:, None], axis=1)[:, 0]
  sample_entropy = jax.lax.stop_gradient(jnp.sum(-chosen * jnp.exp(chosen)))
  return Sample(arch, jnp.sum(chosen), sample_entropy, _entropy(log_p))


def sample(params: Params, key: jax.Array, mask: jax.Array, tanh_constant: float = 1.5,
           variant: Variant = ENAS, prior: jax.Array | None = None) -> Sample:
  """Samples one architecture. ``mask (num_nodes, num_ops)`` bool marks allowed ops;
  ``params`` are ``variant``'s (:func:`init_variant`; :func:`init` for ENAS); ``prior``
  optional ``(num_nodes, num_ops)`` logit offsets (:func:`original_prior`)."""
  keys = jax.random.split(key, mask.shape[0])
  arch, log_p = _decode(params, mask, tanh_constant,
                        lambda node, lp: jax.random.categorical(keys[node], lp), variant, prior)
  return _summarise(arch, log_p)


def most_likely(params: Params, mask: jax.Array, tanh_constant: float = 1.5,
                variant: Variant = ENAS, prior: jax.Array | None = None) -> Sample:
  """Greedy decoding: the most likely op at every step."""
  arch, log_p = _decode(params, mask, tanh_constant, lambda node, lp: jnp.argmax(lp), variant,
                        prior)
  return _summarise(arch, log_p)


def log_probs(params: Params, arch: jax.Array, mask: jax.Array,
              tanh_constant: float = 1.5, variant: Variant = ENAS,
              prior: jax.Array | None = None) -> jax.Array:
  """Teacher-forced masked log-softmaxes ``(num_nodes, num_ops)`` for a given ``arch``."""
  _, log_p = _decode(params, mask, tanh_constant, lambda node, lp: arch[node], variant, prior)
  return log_p


def log_prob(params: Params, arch: jax.Array, mask: jax.Array,
             tanh_constant: float = 1.5, variant: Variant = ENAS,
             prior: jax.Array | None = None) -> Sample:
  """Scores a given ``arch (num_nodes,)``; the returned ``log_prob`` is differentiable."""
  return _summarise(jnp.asarray(arch, jnp.int32),
                    log_probs(params, arch, mask, tanh_constant, variant, prior))


def uniform_sample(key: jax.Array, mask: jax.Array, prior: jax.Array | None = None) -> jax.Array:
  """``(num_nodes,)`` int32: each node's op uniformly among its allowed ops (pretraining),
  or with ``prior`` from ``softmax(prior)`` over them (the untrained policy's start)."""
  logits = jnp.where(mask, _prior_or_zeros(prior, mask), _MASKED_LOGIT)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ---------------------------------------------------------------------------------------
# Joint controller: operators and skip connections (ENAS macro search, NAS-Arch baseline).
# ---------------------------------------------------------------------------------------

SKIP_TARGET = 0.4
"""ENAS macro search's target skip probability (``controller_skip_target``)."""

SKIP_WEIGHT = 0.8
"""ENAS macro search's weight of the skip penalty in the loss (``controller_skip_weight``)."""

JOINT_PARAM_GROUPS: dict[str, tuple[str, ...]] = {
    'ops': ('op_embedding', 'softmax_kernel'),
    'skips': ('attn_w1', 'attn_w2', 'attn_v'),
    'shared': ('lstm_kernel', 'start_embedding'),
}
"""Joint controller leaves by role: only op decisions read ``softmax_kernel`` and only
skip decisions the attention weights; ``op_embedding`` feeds the skip step's LSTM too
(and ``start_embedding`` and the LSTM serve both), so a split of gradient *leaves* is
ambiguous. :func:`nar_jax.reinforce.term_gradient_norms` splits gradient *terms*
instead."""


class JointSample(NamedTuple):
  """One joint architecture. The first four fields mean what :class:`Sample`'s do.

  Attributes:
    arch: ``(L (L + 1) / 2,)`` int32, the flat encoding of :mod:`nar_jax.joint`.
    log_prob: scalar ``op_log_prob + skip_log_prob``.
    sample_entropy: scalar, ENAS's bonus ``sum -log p * p`` over the sampled ops *and*
      skip bits (no gradient).
    entropy: ``(L,)`` full entropy of each layer's op softmax.
    op_log_prob: scalar ``sum_j log p(O_j | ...)``.
    skip_log_prob: scalar ``sum_j sum_{t<j} log p(S_jt | ...)``.
    skip_entropy: ``(L,)`` sum of the full entropies of layer ``j``'s skip decisions.
    skip_penalty: scalar, ENAS's KL skip penalty (:func:`sample_joint`), differentiable.
  """

  arch: jax.Array
  log_prob: jax.Array
  sample_entropy: jax.Array
  entropy: jax.Array
  op_log_prob: jax.Array
  skip_log_prob: jax.Array
  skip_entropy: jax.Array
  skip_penalty: jax.Array


def init_joint(key: jax.Array, num_ops: int, hidden: int = 64,
               init_range: float = 0.1) -> Params:
  """Joint controller parameters, all uniform in ``[-init_range, init_range]``.

  :func:`init`'s four weights plus the skip attention ``attn_w1 (H, H)``,
  ``attn_w2 (H, H)`` and ``attn_v (H,)`` (ENAS ``w_attn_1``, ``w_attn_2``, ``v_attn``).
  """
  op_key = jax.random.split(key)[0]
  return _init_joint(init(op_key, num_ops, hidden, init_range), key, hidden, init_range)


def init_joint_variant(key: jax.Array, variant: Variant, num_layers: int, num_ops: int,
                       hidden: int = 64, init_range: float = 0.1) -> Params:
  """:func:`init_joint`'s parameters (the same for the same ``key``) plus ``variant``'s,
  which act on the op decisions only."""
  op_key = jax.random.split(key)[0]
  return _init_joint(init_variant(op_key, variant, num_layers, num_ops, hidden, init_range),
                     key, hidden, init_range)


def _init_joint(op_params: Params, key: jax.Array, hidden: int, init_range: float) -> Params:
  """``op_params`` (drawn from ``key``'s first split) plus the skip attention weights
  (from its second)."""
  _, attn_key = jax.random.split(key)
  params = dict(op_params)
  shapes = {'attn_w1': (hidden, hidden), 'attn_w2': (hidden, hidden), 'attn_v': (hidden,)}
  keys = jax.random.split(attn_key, len(shapes))
  params.update({name: jax.random.uniform(k, shape, jnp.float32, -init_range, init_range)
                 for k, (name, shape) in zip(keys, sorted(shapes.items()))})
  return params


def _decode_joint(params: Params, mask: jax.Array, tanh_constant: float, choose_op,
                  choose_skips, variant: Variant = ENAS):
  """ENAS macro sampler as one ``lax.scan`` over layers.

  Layer ``j``: an LSTM step on the current input gives the op logits
  ``tanh_constant * tanh(h @ W_softmax)`` (masked); ``choose_op(j, log_p)`` picks the
  op. A second LSTM step on the op's embedding gives ``h``; each earlier layer ``t``
  is scored ``q_t = v . tanh(W1 anchor_t + W2 h)`` and its skip bit has 2-way logits
  ``tanh_constant * tanh([-q_t, q_t])``; ``choose_skips(j, log_p (L, 2)) -> (L,)``
  picks the bits (only ``t < j`` count). ``anchor_j = h``. The next input is the
  start embedding after layer 0, else the mean of the selected anchors
  ``sum_t S_jt anchor_t / (1 + sum_t S_jt)`` (ENAS: zero when no skip is selected).
  ``variant`` changes the op step's input and logits (:class:`Variant`).

  Returns ``(ops (L,), op_log_p (L, K), skips (L, L), skip_logits (L, L, 2))``;
  ``skips`` is zero on and above the diagonal.
  """
  num_layers = mask.shape[0]
  hidden = params['start_embedding'].shape[0]
  positions = jnp.arange(num_layers)

  def step(carry, inputs):
    h, c, x, anchors, anchors_w1 = carry
    layer, layer_mask = inputs
    h, c = _lstm_cell(params['lstm_kernel'], variant.step_input(params, layer, x), h, c)
    op_log_p = jax.nn.log_softmax(_masked_logits(variant, params, layer, h, layer_mask,
                                                 tanh_constant, 0.0))
    op = choose_op(layer, op_log_p)
    h, c = _lstm_cell(params['lstm_kernel'], params['op_embedding'][op], h, c)
    query = jnp.tanh(anchors_w1 + h @ params['attn_w2']) @ params['attn_v']   # (L,)
    skip_logits = tanh_constant * jnp.tanh(jnp.stack([-query, query], axis=-1))  # (L, 2)
    valid = positions < layer
    skips = jnp.where(valid, choose_skips(layer, jax.nn.log_softmax(skip_logits)), 0)
    bits = skips.astype(jnp.float32)
    x = jnp.where(layer == 0, params['start_embedding'], (bits @ anchors) / (1.0 + jnp.sum(bits)))
    anchors = anchors.at[layer].set(h)
    anchors_w1 = anchors_w1.at[layer].set(h @ params['attn_w1'])
    return (h, c, x, anchors, anchors_w1), (op, op_log_p, skips, skip_logits)

  zeros = jnp.zeros((hidden,), jnp.float32)
  table = jnp.zeros((num_layers, hidden), jnp.float32)
  carry = (zeros, zeros, params['start_embedding'], table, table)
  _, (ops_, op_log_p, skips, skip_logits) = jax.lax.scan(step, carry, (positions, mask))
  return ops_.astype(jnp.int32), op_log_p, skips.astype(jnp.int32), skip_logits


def skip_penalty(skip_logits: jax.Array, skip_target: float = SKIP_TARGET) -> jax.Array:
  """ENAS's skip penalty from the 2-way skip logits ``(L, L, 2)`` (rows: layers, cols: sources).

  Exactly ENAS's ``skip_penaltys``: with ``p = sigmoid(logits)`` elementwise (so
  ``p = [sigmoid(-l), sigmoid(l)]`` for logits ``[-l, l]``, a proper distribution)
  and target ``r = [1 - skip_target, skip_target]``, layer ``j``'s penalty is
  ``sum_{t<j} sum_n p_n log(p_n / r_n)``, averaged over layers ``1 .. L-1``.

  Note: ENAS *samples* from ``softmax([-l, l])``, i.e. ``p(skip) = sigmoid(2 l)``; the
  penalty's ``sigmoid(l)`` is ENAS's choice, kept here. A single layer gives 0.
  """
  num_layers = skip_logits.shape[0]
  if num_layers < 2:
    return jnp.zeros((), jnp.float32)
  p = jax.nn.sigmoid(skip_logits)
  target = jnp.asarray([1.0 - skip_target, skip_target], jnp.float32)
  kl = jnp.sum(p * jnp.log(p / target), axis=-1)                            # (L, L)
  lower = jnp.tril(jnp.ones((num_layers, num_layers), bool), -1)
  per_layer = jnp.sum(jnp.where(lower, kl, 0.0), axis=-1)                    # (L,)
  return jnp.sum(per_layer[1:]) / (num_layers - 1)


def _summarise_joint(ops_, op_log_p, skips, skip_logits, skip_target, count_ops: bool = True,
                     count_skips: bool = True) -> JointSample:
  """``count_ops`` / ``count_skips``: whether those decisions enter ``sample_entropy``
  (False for decisions that were forced rather than sampled)."""
  num_layers = op_log_p.shape[0]
  lower = jnp.tril(jnp.ones((num_layers, num_layers), bool), -1)
  op_chosen = jnp.take_along_axis(op_log_p, ops_[:, None], axis=1)[:, 0]     # (L,)
  skip_log_p = jax.nn.log_softmax(skip_logits)                              # (L, L, 2)
  skip_chosen = jnp.where(lower, jnp.take_along_axis(skip_log_p, skips[..., None], -1)[..., 0],
                          0.0)                                               # (L, L)
  sample_entropy = jax.lax.stop_gradient(
      count_ops * jnp.sum(-op_chosen * jnp.exp(op_chosen)) +
      count_skips * jnp.sum(jnp.where(lower, -skip_chosen * jnp.exp(skip_chosen), 0.0)))
  skip_entropy = jnp.sum(jnp.where(lower, _entropy(skip_log_p), 0.0), axis=-1)
  op_log_prob, skip_log_prob = jnp.sum(op_chosen), jnp.sum(skip_chosen)
  return JointSample(joint.encode(ops_, skips), op_log_prob + skip_log_prob, sample_entropy,
                     _entropy(op_log_p), op_log_prob, skip_log_prob, skip_entropy,
                     skip_penalty(skip_logits, skip_target))


def _fixed_or(fixed, choose):
  """``choose``, or (when ``fixed`` is given) a chooser that returns ``fixed[layer]``."""
  if fixed is None:
    return choose
  fixed = jnp.asarray(fixed, jnp.int32)
  return lambda layer, lp: fixed[layer]


def sample_joint(params: Params, key: jax.Array, mask: jax.Array, tanh_constant: float = 1.5,
                 skip_target: float = SKIP_TARGET, *, fixed_ops: jax.Array | None = None,
                 fixed_skips: jax.Array | None = None, variant: Variant = ENAS) -> JointSample:
  """Samples one joint architecture; ``mask (L, num_ops)`` bool marks each layer's allowed ops.

  Op ``j`` is drawn from its masked softmax, then each skip bit ``S_jt`` (``t < j``) from
  its own 2-way softmax, independently given the LSTM state (ENAS).

  Forcing (the alternating search, eq. 9-11): ``fixed_ops (L,)`` op indices replace the
  op draws, ``fixed_skips (L, L)`` bits (lower triangle; e.g. from
  :func:`nar_jax.joint.split`) replace the skip draws; both may be traced. The LSTM
  reads the forced decisions as if it had sampled them, the log-probabilities score
  them, and ``sample_entropy`` counts only the decisions that were sampled.
  """
  op_keys, skip_keys = jnp.split(jax.random.split(key, 2 * mask.shape[0]), 2)
  decoded = _decode_joint(
      params, mask, tanh_constant,
      _fixed_or(fixed_ops, lambda layer, lp: jax.random.categorical(op_keys[layer], lp)),
      _fixed_or(fixed_skips,
                lambda layer, lp: jax.random.categorical(skip_keys[layer], lp, axis=-1)),
      variant)
  return _summarise_joint(*decoded, skip_target, fixed_ops is None, fixed_skips is None)


def most_likely_joint(params: Params, mask: jax.Array, tanh_constant: float = 1.5,
                      skip_target: float = SKIP_TARGET, *, fixed_ops: jax.Array | None = None,
                      fixed_skips: jax.Array | None = None,
                      variant: Variant = ENAS) -> JointSample:
  """Greedy decoding: the most likely op, then every skip whose probability exceeds 1/2.

  ``fixed_ops`` / ``fixed_skips`` force decisions as in :func:`sample_joint`.
  """
  decoded = _decode_joint(params, mask, tanh_constant,
                          _fixed_or(fixed_ops, lambda layer, lp: jnp.argmax(lp)),
                          _fixed_or(fixed_skips, lambda layer, lp: jnp.argmax(lp, axis=-1)),
                          variant)
  return _summarise_joint(*decoded, skip_target, fixed_ops is None, fixed_skips is None)


def _teacher(arch: jax.Array, num_layers: int):
  ops_, skips = joint.split(jnp.asarray(arch, jnp.int32), num_layers)
  return (lambda layer, lp: ops_[layer]), (lambda layer, lp: skips[layer])


def log_probs_joint(params: Params, arch: jax.Array, mask: jax.Array,
                    tanh_constant: float = 1.5,
                    variant: Variant = ENAS) -> tuple[jax.Array, jax.Array]:
  """Teacher-forced distributions of a given flat ``arch``.

  Returns ``(op_log_p (L, num_ops), skip_probs (L, L))``: each layer's masked op
  log-softmax and ``p(S_jt = 1)`` (zero for ``t >= j``), each conditioned on the
  decisions of ``arch`` before it.
  """
  _, op_log_p, _, skip_logits = _decode_joint(params, mask, tanh_constant,
                                              *_teacher(arch, mask.shape[0]), variant)
  lower = jnp.tril(jnp.ones(skip_logits.shape[:2], bool), -1)
  return op_log_p, jnp.where(lower, jax.nn.softmax(skip_logits)[..., 1], 0.0)


def log_prob_joint(params: Params, arch: jax.Array, mask: jax.Array, tanh_constant: float = 1.5,
                   skip_target: float = SKIP_TARGET, variant: Variant = ENAS) -> JointSample:
  """Scores a given flat ``arch``; ``log_prob``, its two parts and ``skip_penalty`` are
  differentiable and equal what :func:`sample_joint` returned when it drew ``arch``."""
  decoded = _decode_joint(params, mask, tanh_constant, *_teacher(arch, mask.shape[0]),
                          variant)
  return _summarise_joint(*decoded, skip_target)


def uniform_sample_joint(key: jax.Array, mask: jax.Array, skip_prob: float = 0.5) -> jax.Array:
  """Flat joint architecture: ops uniform among each layer's allowed ops, each skip bit
  on with probability ``skip_prob`` (pretraining the shared weights)."""
  op_key, skip_key = jax.random.split(key)
  num_layers = mask.shape[0]
  skips = jax.random.bernoulli(skip_key, skip_prob, (num_layers, num_layers))
  return joint.encode(uniform_sample(op_key, mask), skips)
