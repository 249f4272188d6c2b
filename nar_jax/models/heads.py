"""Output heads: what a network puts after its last feature map.

:class:`Head` says which head a network has (the task chooses it:
:mod:`nar_jax.tasks`); :func:`head_output` builds it inside a network's compact method.
"""

from __future__ import annotations

from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from nar_jax import margins, ops
from nar_jax.models import face_head

HEADS = ('softmax', 'face')
"""``'softmax'``: global average pool + Dense. ``'face'``: ArcFace's
:class:`~nar_jax.models.face_head.FaceHead` (embedding, cosine classifier, margin)."""


class Head(NamedTuple):
  """A network's output head.

  Attributes:
    kind: one of :data:`HEADS`.
    margin: the face head's target-logit margin (unused by ``'softmax'``).
    embedding_size: the face head's embedding features (unused by ``'softmax'``).
  """

  kind: str = 'softmax'
  margin: margins.Margin = margins.Margin.arcface()
  embedding_size: int = face_head.EMBEDDING_SIZE


def check_head(head: str) -> None:
  """Raises ``ValueError`` unless ``head`` is one of :data:`HEADS`."""
  if head not in HEADS:
    raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")


def head_output(parent: nn.Module, x: jax.Array, *, train: bool, labels: jax.Array | None,
                embed_only: bool) -> jax.Array:
  """The output of a network from its last feature map ``x (B, H, W, C)``.

  Call from ``parent``'s compact method; ``parent`` has the attributes ``head``,
  ``num_classes``, ``embedding_size``, ``margin``, ``dropout_rate``, ``dtype`` and
  ``bn_axis_name``. ``'softmax'``: global average pool + Dense ``head``, float32
  logits. ``'face'``: :class:`face_head.FaceHead` (BN epsilon 1e-5) with its variables
  directly under ``parent``.
  """
  check_head(parent.head)
  if parent.head == 'face':
    head = face_head.FaceHead(parent.num_classes, parent.embedding_size, parent.margin,
                              parent.dropout_rate, ops.BN_EPSILON, parent.dtype,
                              parent.bn_axis_name, name='face_head')
    return face_head.face_output(parent, head, x, train=train, labels=labels,
                                 embed_only=embed_only)
  if embed_only:
    raise ValueError("only head='face' networks have an embedding")
  x = jnp.mean(x, axis=(1, 2))
  logits = nn.Dense(parent.num_classes, dtype=parent.dtype, param_dtype=jnp.float32,
                    name='head')(x)
  return logits.astype(jnp.float32)
