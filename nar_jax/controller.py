"""The ENAS LSTM controller as pure functions: ``init`` / ``sample`` / ``log_prob``.

The controller emits one operator per node, autoregressively (ENAS macro search,
DESIGN.md section 4): a one-layer LSTM without bias (64 units, weights uniform in
+-0.1) reads a learned start embedding at step 0 and afterwards the embedding of the
operator it just sampled; logits are ``tanh_constant * tanh(h @ W_softmax)``. Ops a
node does not allow are masked out of its softmax, so they are never sampled.

Everything is a pure function of ``(params, key, mask)`` and runs as one
``lax.scan`` over nodes, so sampling can live inside jitted training steps.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

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


def _lstm_cell(kernel: jax.Array, x: jax.Array, h: jax.Array, c: jax.Array):
  """ENAS's bias-free LSTM cell; ``x, h, c`` are ``(H,)``."""
  i, f, o, g = jnp.split(jnp.concatenate([x, h]) @ kernel, 4)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return h, c


def _masked_logits(params: Params, h: jax.Array, mask: jax.Array, tanh_constant: float):
  logits = tanh_constant * jnp.tanh(h @ params['softmax_kernel'])
  return jnp.where(mask, logits, _MASKED_LOGIT)


def _entropy(log_p: jax.Array) -> jax.Array:
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def _decode(params: Params, mask: jax.Array, tanh_constant: float, choose):
  """Runs the LSTM over nodes; ``choose(node, log_p) -> op`` picks each node's op.

  Returns ``(arch (N,), log_p (N, K))`` where ``log_p`` are the masked log-softmaxes.
  """
  hidden = params['start_embedding'].shape[0]

  def step(carry, inputs):
    h, c, x = carry
    node, node_mask = inputs
    h, c = _lstm_cell(params['lstm_kernel'], x, h, c)
    log_p = jax.nn.log_softmax(_masked_logits(params, h, node_mask, tanh_constant))
    op = choose(node, log_p)
    return (h, c, params['op_embedding'][op]), (op, log_p)

  zeros = jnp.zeros((hidden,), jnp.float32)
  num_nodes = mask.shape[0]
  _, (arch, log_p) = jax.lax.scan(step, (zeros, zeros, params['start_embedding']),
                                  (jnp.arange(num_nodes), mask))
  return arch.astype(jnp.int32), log_p


def _summarise(arch: jax.Array, log_p: jax.Array) -> Sample:
  chosen = jnp.take_along_axis(log_p, arch[:, None], axis=1)[:, 0]
  sample_entropy = jax.lax.stop_gradient(jnp.sum(-chosen * jnp.exp(chosen)))
  return Sample(arch, jnp.sum(chosen), sample_entropy, _entropy(log_p))


def sample(params: Params, key: jax.Array, mask: jax.Array, tanh_constant: float = 1.5) -> Sample:
  """Samples one architecture. ``mask (num_nodes, num_ops)`` bool marks allowed ops."""
  keys = jax.random.split(key, mask.shape[0])
  arch, log_p = _decode(params, mask, tanh_constant,
                        lambda node, lp: jax.random.categorical(keys[node], lp))
  return _summarise(arch, log_p)


def most_likely(params: Params, mask: jax.Array, tanh_constant: float = 1.5) -> Sample:
  """Greedy decoding: the most likely op at every step."""
  arch, log_p = _decode(params, mask, tanh_constant, lambda node, lp: jnp.argmax(lp))
  return _summarise(arch, log_p)


def log_probs(params: Params, arch: jax.Array, mask: jax.Array,
              tanh_constant: float = 1.5) -> jax.Array:
  """Teacher-forced masked log-softmaxes ``(num_nodes, num_ops)`` for a given ``arch``."""
  _, log_p = _decode(params, mask, tanh_constant, lambda node, lp: arch[node])
  return log_p


def log_prob(params: Params, arch: jax.Array, mask: jax.Array,
             tanh_constant: float = 1.5) -> Sample:
  """Scores a given ``arch (num_nodes,)``; the returned ``log_prob`` is differentiable."""
  return _summarise(jnp.asarray(arch, jnp.int32), log_probs(params, arch, mask, tanh_constant))


def uniform_sample(key: jax.Array, mask: jax.Array) -> jax.Array:
  """``(num_nodes,)`` int32: each node's op uniformly among its allowed ops (pretraining)."""
  logits = jnp.where(mask, 0.0, _MASKED_LOGIT)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
