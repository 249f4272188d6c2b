"""ArcFace's face output: the "E" embedding and the margin classifier, for any backbone.

:class:`FaceHead` turns a backbone's last feature map into insightface's "E" output
and the :class:`~nar_jax.margins.CosineHead` with the margin of :mod:`nar_jax.margins`:

* "E" output: BN -> Dropout -> flatten -> Dense(embedding_size) -> BN with its scale
  fixed to 1 (no scale parameter): the embedding;
* classifier: ``head/weight`` cosines, the target logit given the margin when labels
  are given (training loss), plain ``s * cos(theta)`` otherwise.

The backbones (:class:`~nar_jax.models.iresnet.IResNet`, and ``head='face'`` of
:class:`~nar_jax.models.resnet.ResNet` and :class:`~nar_jax.models.macro.MacroNet`)
call it through :func:`face_output`, which shares the caller's scope: the head's
variables are the backbone's own ``output_bn``, ``embedding_dense``, ``embedding_bn``
and ``head/weight`` (the layout of ArcFace's IR networks).

Dropout draws from the ``'dropout'`` rng stream when ``train=True`` and labels are
given; evaluation (``train=False``), embedding and ``init`` need no dropout rng.
The flatten is NHWC (row, column, channel) order.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from nar_jax import margins, ops

DROPOUT_RATE = 0.4
"""Dropout before the embedding's Dense layer (ArcFace)."""
EMBEDDING_SIZE = 512
"""Features of ArcFace's embedding."""


class FaceHead(nn.Module):
  """The "E" output and margin classifier on a feature map ``(B, H, W, C)``.

  Attributes:
    num_classes: identities of the classifier.
    embedding_size: features of the embedding (512 in ArcFace).
    margin: the target-logit margin and scale used when labels are given.
    dropout_rate: dropout before the embedding's Dense layer.
    bn_epsilon: epsilon of both BatchNorms (the backbone's: 2e-5 for IR networks).
    dtype: compute dtype (parameters, BN statistics and the cosine head stay float32).
    bn_axis_name: mesh axis for synchronised BatchNorm in training, or ``None``.
  """

  num_classes: int
  embedding_size: int = EMBEDDING_SIZE
  margin: margins.Margin = margins.Margin.arcface()
  dropout_rate: float = DROPOUT_RATE
  bn_epsilon: float = ops.BN_EPSILON
  dtype: Any = jnp.float32
  bn_axis_name: str | None = None

  @nn.compact
  def __call__(self, x: jax.Array, *, train: bool, labels: jax.Array | None = None,
               embed_only: bool = False) -> jax.Array:
    """Scaled cosine logits ``(B, num_classes)`` float32, or with ``embed_only`` the
    embedding ``(B, embedding_size)`` float32 (not L2-normalised).

    ``train``: batch statistics; with ``labels (B,)`` also dropout and the margin on
    each target logit.
    """
    if self.embedding_size <= 0:
      raise ValueError(f'face head embedding size must be positive, got {self.embedding_size}')
    x = ops.batch_norm(train, self.bn_axis_name, self.dtype, name='output_bn',
                       epsilon=self.bn_epsilon)(x)
    # Dropout belongs to the training loss (train=True with labels). A train-mode pass
    # without labels is train.predict scoring an architecture with batch statistics.
    x = nn.Dropout(self.dropout_rate, deterministic=not train or labels is None,
                   name='output_dropout')(x)
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.embedding_size, dtype=self.dtype, param_dtype=jnp.float32,
                 name='embedding_dense')(x)
    # ArcFace's fc1 BN (fix_gamma=True): no scale parameter, which ops.batch_norm lacks.
    embedding = nn.BatchNorm(
        use_running_average=not train, momentum=ops.BN_MOMENTUM, epsilon=self.bn_epsilon,
        use_scale=False, axis_name=self.bn_axis_name if train else None, dtype=self.dtype,
        param_dtype=jnp.float32, name='embedding_bn')(x).astype(jnp.float32)
    if embed_only:
      return embedding
    cosine = margins.CosineHead(self.num_classes, name='head')(embedding)
    return margins.margin_logits(cosine, labels, self.margin)


def face_output(parent: nn.Module, head: FaceHead, x: jax.Array, *, train: bool,
                labels: jax.Array | None, embed_only: bool) -> jax.Array:
  """Runs ``head`` on ``x`` inside ``parent``'s scope (call from ``parent``'s compact
  method): the head's variables sit directly under ``parent``."""
  nn.share_scope(parent, head)
  return head(x, train=train, labels=labels, embed_only=embed_only)
