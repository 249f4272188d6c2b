"""Face verification: insightface's protocol (LFW, CFP-FP, AgeDB-30).

For P pairs (images ``2i`` and ``2i + 1``):

1. Embedding of an image = ``embed(img) + embed(horizontally flipped img)``,
   then L2-normalised (`embed_images`).
2. Distance of a pair = squared L2 distance of the two embeddings; a pair is
   predicted "same" when ``distance < threshold`` (strictly).
3. Accuracy (`evaluate`): thresholds ``np.arange(0, 4, 0.01)``; the pairs are
   cut into 10 contiguous folds, not shuffled (sklearn ``KFold``: the first
   ``P % 10`` folds get one pair more). For each fold the threshold with the
   best accuracy on the other 9 folds (the first maximum, i.e. the smallest
   such threshold) is scored on the held-out fold. Report the mean and
   (population) std of the 10 fold accuracies.
4. TAR@FAR (insightface's ``calculate_val``): thresholds ``np.arange(0, 4,
   0.001)``; per fold, the FAR of every threshold on the other 9 folds; if the
   largest reaches the target (1e-3), the threshold is the degree-1 spline
   interpolation of threshold over FAR at the target (scipy
   ``interp1d(kind='slinear')`` as insightface ran it; see
   `threshold_at_far`), else 0; TAR and FAR are then measured on the held-out
   fold. Report mean TAR, its std and mean FAR.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from nar_jax.data.prefetch import prefetch
from nar_jax.errors import NonFiniteError

ACCURACY_THRESHOLDS = np.arange(0, 4, 0.01)
TAR_THRESHOLDS = np.arange(0, 4, 0.001)
FAR_TARGET = 1e-3
NUM_FOLDS = 10


class VerificationResult(NamedTuple):
  """Verification figures, as insightface reports them.

  Attributes:
    accuracy_mean: mean of the fold accuracies.
    accuracy_std: population std of the fold accuracies.
    fold_accuracies: float (F,) held-out accuracy of each fold.
    thresholds: float (F,) threshold chosen for each fold (on the other folds).
    tar: mean over folds of the true accept rate at FAR = `far_target`.
    tar_std: its population std.
    far: mean over folds of the false accept rate actually reached.
    tpr: float (T,) held-out true positive rate at each accuracy threshold,
      averaged over folds (ROC curve with `fpr`).
    fpr: float (T,) held-out false positive rate, averaged over folds.
  """

  accuracy_mean: float
  accuracy_std: float
  fold_accuracies: np.ndarray
  thresholds: np.ndarray
  tar: float
  tar_std: float
  far: float
  tpr: np.ndarray
  fpr: np.ndarray


def fold_bounds(num_pairs: int, num_folds: int = NUM_FOLDS) -> np.ndarray:
  """int (F + 1,) boundaries of contiguous folds, as sklearn ``KFold`` cuts them.

  Fold f is ``[bounds[f], bounds[f + 1])``; the first ``num_pairs % num_folds``
  folds hold one pair more.
  """
  if num_folds < 2:
    raise ValueError(f'num_folds must be at least 2, got {num_folds}.')
  if num_pairs < num_folds:
    raise ValueError(f'{num_pairs} pairs are too few for {num_folds} folds; the protocol '
                     'needs at least one pair per fold.')
  sizes = np.full(num_folds, num_pairs // num_folds)
  sizes[:num_pairs % num_folds] += 1
  return np.concatenate([[0], np.cumsum(sizes)])


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
  """float64 (P,) squared L2 distances of pairs ``(2i, 2i + 1)`` of (2P, D) embeddings."""
  e = np.asarray(embeddings, np.float64)
  if e.ndim != 2 or len(e) % 2:
    raise ValueError(f'embeddings must be (2P, D) with pairs in consecutive rows, got shape '
                     f'{e.shape}.')
  return np.sum(np.square(e[0::2] - e[1::2]), axis=1)


def _below(dist: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """int (T,) number of distances strictly below each threshold."""
  return np.searchsorted(np.sort(dist), thresholds, side='left')


def _fold_counts(dist, issame, bounds, thresholds):
  """Per fold and threshold: pairs predicted same among same / different pairs.

  Returns:
    ``(tp, fp, n_same, n_diff)``: int (F, T), int (F, T), int (F,), int (F,).
  """
  tp, fp, n_same, n_diff = [], [], [], []
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    d, s = dist[lo:hi], issame[lo:hi]
    tp.append(_below(d[s], thresholds))
    fp.append(_below(d[~s], thresholds))
    n_same.append(s.sum())
    n_diff.append((~s).sum())
  return np.stack(tp), np.stack(fp), np.asarray(n_same), np.asarray(n_diff)


def threshold_at_far(fars: np.ndarray, thresholds: np.ndarray, target: float) -> float:
  """The threshold at which FAR reaches `target`, as insightface's ``calculate_val``.

  insightface calls ``scipy.interpolate.interp1d(fars, thresholds,
  kind='slinear')(target)`` when ``max(fars) >= target`` and uses 0 otherwise.
  ``fars`` is non-decreasing with many repeated values; the scipy versions
  insightface ran on evaluate a degree-1 B-spline on the knots ``[x0, x0, x1,
  ..., xn, xn]`` (newer scipy rejects repeated values). That is: with ``i``
  the last index in ``[0, n - 1)`` such that ``fars[i] <= target``,
  interpolate linearly between points ``i`` and ``i + 1``; when those two
  FARs are equal (only when ``target == fars[-1] == fars[-2]``) the spline's
  value is 0.

  Args:
    fars: float (T,) non-decreasing FAR of each threshold.
    thresholds: float (T,) increasing thresholds.
    target: the FAR to reach.

  Returns:
    The interpolated threshold (a Python float).
  """
  if fars.max() < target:
    return 0.0
  if len(fars) < 2 or fars[0] > target:
    raise ValueError(f'FAR target {target} lies below the FAR of every threshold '
                     f'(smallest {fars[0]}).')
  i = min(int(np.searchsorted(fars, target, side='right')) - 1, len(fars) - 2)
  xa, xb = fars[i], fars[i + 1]
  if xa == xb:
    return 0.0
  w = 1.0 / (xb - xa)  # de Boor's recursion for degree 1, as scipy evaluates it.
  return float(thresholds[i] * (w * (xb - target)) + thresholds[i + 1] * (w * (target - xa)))


def evaluate(embeddings: np.ndarray, issame: Any, *, num_folds: int = NUM_FOLDS,
             far_target: float = FAR_TARGET) -> VerificationResult:
  """insightface's verification figures for (already normalised) embeddings.

  Args:
    embeddings: float (2P, D); pair i is rows ``2i`` and ``2i + 1``. Use
      `embed_images` to get them (flip-sum, L2-normalised) as insightface does.
    issame: bool (P,) whether pair i shows one identity.
    num_folds: number of contiguous folds (10).
    far_target: FAR for the TAR figure (1e-3).

  Returns:
    A `VerificationResult`.

  Raises:
    ValueError: mismatched shapes, fewer pairs than folds, or a fold without
      same or without different pairs (TAR / FAR would be undefined).
  """
  dist = pair_distances(embeddings)
  issame = np.asarray(issame)
  if issame.shape != dist.shape or issame.dtype != bool:
    raise ValueError(f'issame must be bool with one entry per pair ({len(dist)}), got dtype '
                     f'{issame.dtype} and shape {issame.shape}.')
  bounds = fold_bounds(len(dist), num_folds)
  sizes = np.diff(bounds)

  tp, fp, n_same, n_diff = _fold_counts(dist, issame, bounds, ACCURACY_THRESHOLDS)
  for f in range(num_folds):
    if not n_same[f] or not n_diff[f]:
      raise ValueError(
          f'Fold {f} (pairs {bounds[f]}..{bounds[f + 1] - 1}) has {n_same[f]} same and '
          f'{n_diff[f]} different pairs; each of the {num_folds} contiguous folds needs both.')
  correct = tp + n_diff[:, None] - fp  # (F, T) right predictions on each fold.
  best = np.argmax(correct.sum(0)[None] - correct, axis=1)  # First maximum (train folds).
  fold_acc = correct[np.arange(num_folds), best] / sizes
  tpr = (tp / n_same[:, None]).mean(0)
  fpr = (fp / n_diff[:, None]).mean(0)

  tp, fp, _, _ = _fold_counts(dist, issame, bounds, TAR_THRESHOLDS)
  tars, fars = [], []
  for f in range(num_folds):
    train_fp = fp.sum(0) - fp[f]
    train_diff = n_diff.sum() - n_diff[f]
    threshold = threshold_at_far(train_fp / train_diff, TAR_THRESHOLDS, far_target)
    lo, hi = bounds[f], bounds[f + 1]
    accept = dist[lo:hi] < threshold
    tars.append(np.sum(accept & issame[lo:hi]) / n_same[f])
    fars.append(np.sum(accept & ~issame[lo:hi]) / n_diff[f])
  return VerificationResult(
      accuracy_mean=float(np.mean(fold_acc)), accuracy_std=float(np.std(fold_acc)),
      fold_accuracies=fold_acc, thresholds=ACCURACY_THRESHOLDS[best],
      tar=float(np.mean(tars)), tar_std=float(np.std(tars)), far=float(np.mean(fars)),
      tpr=tpr, fpr=fpr)


def fold_accuracy(dist: jax.Array, issame: jax.Array, num_folds: int = NUM_FOLDS) -> jax.Array:
  """`evaluate`'s accuracy (mean over folds) as a jittable function: a search reward.

  Args:
    dist: float (P,) squared distances of the pairs.
    issame: bool (P,).
    num_folds: contiguous folds, cut as `fold_bounds` cuts them (P is static).

  Returns:
    Scalar: the mean over folds of the held-out accuracy at the threshold (of
    `ACCURACY_THRESHOLDS`, strict ``<``, first maximum) best on the other folds.
  """
  bounds = fold_bounds(dist.shape[0], num_folds)
  fold_of = np.repeat(np.arange(num_folds), np.diff(bounds))
  predicted_same = dist[:, None] < jnp.asarray(ACCURACY_THRESHOLDS, dist.dtype)[None]
  correct = (predicted_same == issame[:, None]).astype(jnp.int32)        # (P, T)
  per_fold = jax.ops.segment_sum(correct, jnp.asarray(fold_of), num_folds)  # (F, T)
  best = jnp.argmax(per_fold.sum(0)[None] - per_fold, axis=1)            # first maximum
  held_out = per_fold[jnp.arange(num_folds), best] / jnp.asarray(np.diff(bounds))
  return jnp.mean(held_out)


def l2_normalize(x: np.ndarray) -> np.ndarray:
  """Rows divided by their L2 norm (zero rows stay zero, like sklearn's normalize)."""
  norm = np.linalg.norm(x, axis=1, keepdims=True)
  return x / np.where(norm == 0, 1.0, norm)


def embed_images(embed_fn: Callable[[np.ndarray], Any], images: Any, *,
                 batch_size: int) -> np.ndarray:
  """insightface's test-time embeddings: ``normalize(embed(x) + embed(flip(x)))``.

  Args:
    embed_fn: maps uint8 (batch_size, H, W, 3) images to (batch_size, D)
      embeddings (numpy or jax; normalisation of pixels is its job). It is
      always called with exactly `batch_size` images (the last batch is
      zero-padded), so a jitted function compiles once.
    images: uint8 (N, H, W, 3): a numpy array or `faces.LazyImages` (the next
      batch is decoded while `embed_fn` runs).
    batch_size: images per call.

  Returns:
    float64 (N, D) L2-normalised embeddings.
  """
  if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
    raise ValueError(f'batch_size must be a positive int, got {batch_size!r}.')
  if len(images.shape) != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f'images must be uint8 (N, H, W, 3), got {images.dtype} of shape '
                     f'{tuple(images.shape)}.')
  n = len(images)

  def batches():
    for start in range(0, n, batch_size):
      x = np.asarray(images[start:start + batch_size])
      pad = batch_size - len(x)
      if pad:
        x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
      yield x, len(x) - pad

  out = []
  for x, count in prefetch(batches()):
    e = np.asarray(embed_fn(x), np.float64) + np.asarray(embed_fn(x[:, :, ::-1]), np.float64)
    if e.ndim != 2 or len(e) != batch_size:
      raise ValueError(f'embed_fn must return ({batch_size}, D) embeddings, got shape '
                       f'{e.shape}.')
    out.append(e[:count])
  if not out:
    raise ValueError('embed_images got no images.')
  return l2_normalize(np.concatenate(out))


def verify(embed_fn: Callable[[np.ndarray], Any], images: Any, issame: Any, *,
           batch_size: int, num_folds: int = NUM_FOLDS,
           far_target: float = FAR_TARGET) -> VerificationResult:
  """`embed_images` then `evaluate`: the whole protocol on one verification set.

  Args:
    embed_fn: see `embed_images`.
    images: uint8 (2P, H, W, 3), e.g. ``faces.VerificationSet.images``.
    issame: bool (P,).
    batch_size: images per `embed_fn` call.
    num_folds: folds (10).
    far_target: FAR of the TAR figure (1e-3).
  """
  issame = np.asarray(issame)
  if len(images) != 2 * len(issame):
    raise ValueError(f'{len(images)} images for {len(issame)} pairs; expected '
                     f'{2 * len(issame)} (two per pair).')
  fold_bounds(len(issame), num_folds)  # Fail before embedding anything.
  embeddings = embed_images(embed_fn, images, batch_size=batch_size)
  if not np.all(np.isfinite(embeddings)):
    raise NonFiniteError(f'verification: {int(np.sum(~np.isfinite(embeddings)))} non-finite '
                         'embedding values: the network is not usable (a diverged training?)')
  return evaluate(embeddings, issame,
                  num_folds=num_folds, far_target=far_target)
