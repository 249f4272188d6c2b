"""Tests for nar_jax.verification: insightface's LFW-style protocol."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import interpolate

from nar_jax import verification
from nar_jax.data import faces
from nar_jax.data import synthetic_faces

# ---------------------------------------------------------------------------
# A direct, loop-by-loop transcription of the protocol (insightface's
# calculate_roc / calculate_val), to compare the vectorised code against.


def _brute_accuracy(dist, issame, threshold):
  predict = dist < threshold
  tp = np.sum(predict & issame)
  fp = np.sum(predict & ~issame)
  tn = np.sum(~predict & ~issame)
  fn = np.sum(~predict & issame)
  tpr = 0 if tp + fn == 0 else tp / (tp + fn)
  fpr = 0 if fp + tn == 0 else fp / (fp + tn)
  return tpr, fpr, (tp + tn) / dist.size


def _brute_folds(n, k=10):
  sizes = [n // k + (1 if f < n % k else 0) for f in range(k)]
  start = 0
  for size in sizes:
    test = np.arange(start, start + size)
    yield np.setdiff1d(np.arange(n), test), test
    start += size


def _brute_interp(fars, thresholds, target):
  """Degree-1 B-spline on knots [x0, x0, x1, ..., xn, xn], evaluated at target."""
  knots = np.concatenate([[fars[0]], fars, [fars[-1]]])
  n = len(fars)
  m = 1
  for l in range(1, n):  # Last knot interval [t_m, t_{m+1}) holding target.
    if knots[l] <= target:
      m = l
  lo, hi = knots[m], knots[m + 1]
  if hi == lo:
    return 0.0
  return (thresholds[m - 1] * (hi - target) + thresholds[m] * (target - lo)) / (hi - lo)


def brute_force(embeddings, issame):
  dist = np.sum(np.square(embeddings[0::2] - embeddings[1::2]), 1)
  thresholds = np.arange(0, 4, 0.01)
  accs, chosen, tprs, fprs = [], [], [], []
  for train, test in _brute_folds(len(dist)):
    train_acc = [_brute_accuracy(dist[train], issame[train], t)[2] for t in thresholds]
    best = None
    for i, a in enumerate(train_acc):
      if best is None or a > train_acc[best]:
        best = i
    chosen.append(thresholds[best])
    accs.append(_brute_accuracy(dist[test], issame[test], thresholds[best])[2])
    rates = [_brute_accuracy(dist[test], issame[test], t)[:2] for t in thresholds]
    tprs.append([r[0] for r in rates])
    fprs.append([r[1] for r in rates])
  thresholds = np.arange(0, 4, 0.001)
  vals, fars = [], []
  for train, test in _brute_folds(len(dist)):
    far_train = np.array([np.sum((dist[train] < t) & ~issame[train]) / np.sum(~issame[train])
                          for t in thresholds])
    t = _brute_interp(far_train, thresholds, 1e-3) if far_train.max() >= 1e-3 else 0.0
    accept = dist[test] < t
    vals.append(np.sum(accept & issame[test]) / np.sum(issame[test]))
    fars.append(np.sum(accept & ~issame[test]) / np.sum(~issame[test]))
  return dict(accs=np.array(accs), chosen=np.array(chosen), tpr=np.mean(tprs, 0),
              fpr=np.mean(fprs, 0), tar=np.mean(vals), tar_std=np.std(vals),
              far=np.mean(fars))


def brute_fold_accuracy(dist, issame, num_folds=10):
  """insightface's accuracy (mean over contiguous folds of the held-out accuracy at the first
  threshold best on the other folds), thresholds in ``dist``'s dtype."""
  thresholds = np.arange(0, 4, 0.01).astype(dist.dtype)
  accs = []
  for train, test in _brute_folds(len(dist), num_folds):
    train_acc = [_brute_accuracy(dist[train], issame[train], t)[2] for t in thresholds]
    best = None
    for i, a in enumerate(train_acc):
      if best is None or a > train_acc[best]:
        best = i
    accs.append(_brute_accuracy(dist[test], issame[test], thresholds[best])[2])
  return float(np.mean(accs))


def _planted(dist):
  """Unit 2-D embeddings (2P, 2) whose pairs have squared distances `dist`."""
  angle = np.arccos(1 - np.asarray(dist) / 2)
  base = np.random.default_rng(0).uniform(0, 2 * np.pi, len(dist))
  e = np.zeros((2 * len(dist), 2))
  e[0::2] = np.stack([np.cos(base), np.sin(base)], 1)
  e[1::2] = np.stack([np.cos(base + angle), np.sin(base + angle)], 1)
  return e


# ---------------------------------------------------------------------------


@pytest.mark.parametrize('num_pairs, seed, folds_disagree', [(137, 0, True), (400, 1, True),
                                                             (1000, 2, False)])
def test_evaluate_equals_brute_force(num_pairs, seed, folds_disagree):
  rng = np.random.default_rng(seed)
  issame = rng.random(num_pairs) < 0.5
  issame[:2] = [True, False]
  # Overlapping distance distributions, so folds choose different thresholds.
  dist = np.where(issame, rng.normal(1.0, 0.35, num_pairs), rng.normal(1.6, 0.35, num_pairs))
  emb = _planted(np.clip(dist, 0.0, 3.99))
  result = verification.evaluate(emb, issame)
  expected = brute_force(emb, issame)
  np.testing.assert_array_equal(result.thresholds, expected['chosen'])
  np.testing.assert_allclose(result.fold_accuracies, expected['accs'], rtol=0, atol=1e-12)
  assert result.accuracy_mean == pytest.approx(np.mean(expected['accs']), abs=1e-12)
  assert result.accuracy_std == pytest.approx(np.std(expected['accs']), abs=1e-12)
  np.testing.assert_allclose(result.tpr, expected['tpr'], atol=1e-12)
  np.testing.assert_allclose(result.fpr, expected['fpr'], atol=1e-12)
  assert result.tar == pytest.approx(expected['tar'], abs=1e-12)
  assert result.tar_std == pytest.approx(expected['tar_std'], abs=1e-12)
  assert result.far == pytest.approx(expected['far'], abs=1e-12)
  # With few pairs the folds pick different thresholds (not all equal by luck).
  assert (len(set(result.thresholds.tolist())) > 1) == folds_disagree
  assert 0.6 < result.accuracy_mean < 0.95


def test_first_maximum_wins_hand_computed():
  # 10 folds of 2 pairs: same at distance 0.305, different at 1.505. Every
  # threshold in 0.31 .. 1.50 is perfect; the first (smallest) must win.
  dist = np.tile([0.305, 1.505], 10)
  issame = np.tile([True, False], 10)
  result = verification.evaluate(_planted(dist), issame)
  np.testing.assert_allclose(result.thresholds, [0.31] * 10)
  np.testing.assert_array_equal(result.fold_accuracies, [1.0] * 10)
  assert result.accuracy_std == 0.0
  # One fold's different pair moves to 0.2: the others still agree on 0.31;
  # fold 3 is trained on the 9 clean folds (0.31) and scores 1/2 with it.
  dist[7] = 0.2
  result = verification.evaluate(_planted(dist), issame)
  assert result.thresholds[3] == pytest.approx(0.31)
  assert result.fold_accuracies[3] == 0.5
  assert result.accuracy_mean == pytest.approx(0.95)
  # "Same" means distance < threshold, strictly: identical embeddings (distance
  # 0) are rejected at threshold 0, so 0.01 is the first perfect threshold.
  result = verification.evaluate(_planted(np.tile([0.0, 1.505], 10)), issame)
  np.testing.assert_allclose(result.thresholds, [0.01] * 10)
  assert result.accuracy_mean == 1.0


# ---------------------------------------------------------------------------
# fold_accuracy: the jittable accuracy (the search's verification reward).


def _random_pairs(num_pairs, seed):
  """Overlapping same / different distances on midpoints of the 0.01 threshold grid (no
  distance equals a threshold in float32 or float64, and many pairs tie)."""
  rng = np.random.default_rng(seed)
  issame = rng.random(num_pairs) < 0.5
  dist = np.where(issame, rng.normal(1.0, 0.35, num_pairs), rng.normal(1.6, 0.35, num_pairs))
  dist = np.floor(np.clip(dist, 0.0, 3.98) * 100) / 100 + 0.005
  return dist.astype(np.float32), issame


@pytest.mark.parametrize('num_pairs, num_folds, seed', [
    (137, 10, 0), (400, 10, 1), (23, 10, 2), (10, 10, 3), (7, 2, 4), (50, 3, 5)])
def test_fold_accuracy_equals_brute_force_and_evaluate(num_pairs, num_folds, seed):
  dist, issame = _random_pairs(num_pairs, seed)
  got = float(verification.fold_accuracy(jnp.asarray(dist), jnp.asarray(issame), num_folds))
  assert got == pytest.approx(brute_fold_accuracy(dist, issame, num_folds), abs=1e-6)
  jitted = jax.jit(verification.fold_accuracy, static_argnums=2)
  assert float(jitted(jnp.asarray(dist), jnp.asarray(issame), num_folds)) == pytest.approx(
      got, abs=1e-6)
  if num_folds == 10 and all(
      issame[lo:hi].any() and not issame[lo:hi].all()
      for lo, hi in zip(verification.fold_bounds(num_pairs)[:-1],
                        verification.fold_bounds(num_pairs)[1:])):
    assert got == pytest.approx(
        verification.evaluate(_planted(dist.astype(np.float64)), issame).accuracy_mean,
        abs=1e-6)


def test_fold_accuracy_ties_take_the_first_maximum_and_same_is_strict():
  """The planted cases of ``test_first_maximum_wins_hand_computed``, through fold_accuracy."""
  issame = np.tile([True, False], 10)
  dist = np.tile([0.305, 1.505], 10).astype(np.float32)
  accuracy = lambda d: float(verification.fold_accuracy(jnp.asarray(d), jnp.asarray(issame)))
  assert accuracy(dist) == 1.0
  dist[7] = 0.2  # Fold 3 keeps the others' 0.31 (the first maximum) and scores 1/2.
  assert accuracy(dist) == pytest.approx(0.95)
  # A same pair at 0.9 in fold 3: its training folds tie at every threshold in 0.31 .. 1.50,
  # and the first (0.31) rejects it (the last would accept it); the other folds train with
  # it and pick 0.91, which is right on their held-out pairs.
  dist[7], dist[6] = 1.505, 0.9
  assert accuracy(dist) == pytest.approx(0.95) == brute_fold_accuracy(dist, issame)
  # "Same" is strictly below the threshold: fold 3's same pair exactly at the (float32)
  # threshold 0.31 the others choose is rejected.
  dist = np.tile([0.305, 1.505], 10).astype(np.float32)
  dist[6] = np.float32(verification.ACCURACY_THRESHOLDS[31])
  assert accuracy(dist) == pytest.approx(0.95) == brute_fold_accuracy(dist, issame)
  # Identical embeddings (distance 0) are "different" at threshold 0 (strict <).
  assert accuracy(np.tile([0.0, 1.505], 10).astype(np.float32)) == 1.0
  # Every distance equal: all thresholds above it tie, all below it tie.
  same_dist = np.full(20, 1.0, np.float32)
  assert accuracy(same_dist) == pytest.approx(brute_fold_accuracy(same_dist, issame)) == 0.5


def test_fold_accuracy_rejects_too_few_pairs():
  with pytest.raises(ValueError, match='9 pairs are too few for 10 folds'):
    verification.fold_accuracy(jnp.zeros(9), jnp.zeros(9, bool))


def test_fold_bounds_like_kfold():
  np.testing.assert_array_equal(verification.fold_bounds(23), [0, 3, 6, 9, 11, 13, 15, 17,
                                                               19, 21, 23])
  np.testing.assert_array_equal(verification.fold_bounds(6000)[:3], [0, 600, 1200])
  with pytest.raises(ValueError, match='9 pairs are too few for 10 folds'):
    verification.fold_bounds(9)


def test_threshold_at_far_matches_scipy_without_repeats():
  rng = np.random.default_rng(0)
  thresholds = np.arange(0, 4, 0.001)[:50]
  fars = np.sort(rng.random(50))
  fars[0] = 0.0
  for target in (1e-3, 0.3, fars[10], fars[-1]):
    expected = float(interpolate.interp1d(fars, thresholds, kind='slinear')(target))
    assert verification.threshold_at_far(fars, thresholds, target) == pytest.approx(
        expected, abs=1e-15)


def test_threshold_at_far_with_repeated_fars_hand_computed():
  thresholds = np.array([0.0, 1.0, 2.0, 3.0, 4.0])
  fars = np.array([0.0, 0.0, 0.5, 0.5, 1.0])
  assert verification.threshold_at_far(fars, thresholds, 0.5) == 3.0  # Last of the repeats.
  assert verification.threshold_at_far(fars, thresholds, 0.75) == 3.5
  assert verification.threshold_at_far(fars, thresholds, 0.0) == 1.0
  assert verification.threshold_at_far(fars, thresholds, 2.0) == 0.0  # Never reached.
  fars_end = np.array([0.0, 0.5, 1.0, 1.0])
  assert verification.threshold_at_far(fars_end, thresholds[:4], 1.0) == 0.0  # Degenerate.


def test_perfect_and_random_embeddings():
  rng = np.random.default_rng(3)
  p = 600
  issame = np.tile(np.repeat([True, False], 30), 10)
  identity = np.arange(2 * p) // 2
  identity[1::2] = np.where(issame, identity[1::2], identity[1::2] + 10_000)
  centres = rng.standard_normal((20_000, 32))
  perfect = verification.l2_normalize(centres[identity] + 0.05 * rng.standard_normal((2 * p, 32)))
  result = verification.evaluate(perfect, issame)
  assert result.accuracy_mean == 1.0 and result.tar == 1.0
  # The FAR=1e-3 threshold sits at the smallest training impostor distance, so
  # a held-out impostor may fall below it: FAR is small, not necessarily 0.
  assert result.far < 0.01
  noise = verification.l2_normalize(rng.standard_normal((2 * p, 32)))
  result = verification.evaluate(noise, issame)
  assert abs(result.accuracy_mean - 0.5) < 0.06
  assert result.tar < 0.05


def test_bad_inputs():
  emb = _planted(np.full(20, 0.5))
  issame = np.tile([True, False], 10)
  with pytest.raises(ValueError, match=r'\(2P, D\)'):
    verification.evaluate(emb[:-1], issame[:-1])
  with pytest.raises(ValueError, match='one entry per pair'):
    verification.evaluate(emb, issame[:-1])
  with pytest.raises(ValueError, match='bool'):
    verification.evaluate(emb, issame.astype(int))
  with pytest.raises(ValueError, match='too few'):
    verification.evaluate(emb[:16], issame[:8])
  with pytest.raises(ValueError, match=r'Fold 0 \(pairs 0..1\) has 2 same and 0 different'):
    verification.evaluate(emb, np.r_[[True, True], issame[2:]])


# ---------------------------------------------------------------------------
# Embedding with flips.


def _pixels_embed(calls):
  weights = np.random.default_rng(0).standard_normal((8 * 8 * 3, 5))

  def embed_fn(x):
    calls.append(x.shape)
    return x.reshape(len(x), -1).astype(np.float32) @ weights

  return embed_fn, weights


def test_embed_images_flip_sum_normalised_in_fixed_batches():
  images = np.random.default_rng(1).integers(0, 256, (7, 8, 8, 3), dtype=np.uint8)
  calls = []
  embed_fn, weights = _pixels_embed(calls)
  out = verification.embed_images(embed_fn, images, batch_size=3)
  flat = lambda x: x.reshape(len(x), -1).astype(np.float64)
  expected = flat(images) @ weights + flat(images[:, :, ::-1]) @ weights
  expected /= np.linalg.norm(expected, axis=1, keepdims=True)
  np.testing.assert_allclose(out, expected, rtol=1e-5)
  chex.assert_shape(out, (7, 5))
  assert calls == [(3, 8, 8, 3)] * 6  # 3 batches x (image, flipped), last one padded.
  with pytest.raises(ValueError, match=r'embed_fn must return \(3, D\)'):
    verification.embed_images(lambda x: x[:1, 0, 0], images, batch_size=3)
  with pytest.raises(ValueError, match='uint8'):
    verification.embed_images(embed_fn, images.astype(np.float32), batch_size=3)


def test_verify_on_synthetic_bin_lazy_equals_eager(tmp_path):
  files = synthetic_faces.write_synthetic_faces(
      str(tmp_path), num_identities=2, images_per_identity=1, image_size=8, num_pairs=20,
      verification_identities=4, seed=0)
  pairs = faces.load_verification_set(files.bin_path)
  embed_fn, _ = _pixels_embed([])
  lazy = verification.verify(embed_fn, pairs.images, pairs.issame, batch_size=16)
  eager = verification.evaluate(
      verification.embed_images(embed_fn, pairs.images[:], batch_size=16), pairs.issame)
  chex.assert_trees_all_close(tuple(lazy), tuple(eager))
  with pytest.raises(ValueError, match='40 images for 19 pairs'):
    verification.verify(embed_fn, pairs.images, pairs.issame[:19], batch_size=16)
