"""Conformal sets reach nominal coverage; bootstrap intervals cover at their nominal rate; paired tests; dumps."""

import math

import jax
import numpy as np
import pytest
import scipy.special

from jaxlm.evaluation import calibration, conformal, stats


def _pool(seed, n, c=10):
  """A miscalibrated classifier: labels from softmax(z), probabilities softmax(2 z) (overconfident)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c)) * 1.5
  labels = (rng.uniform(size=(n, 1)) > np.cumsum(scipy.special.softmax(logits, -1), -1)).sum(-1)
  return scipy.special.softmax(2 * logits, -1).astype(np.float32), labels


def test_aps_scores_match_a_loop_and_threshold_matches_the_quantile_formula():
  probs, labels = _pool(0, 50, c=4)
  probs[0] = [0.25, 0.25, 0.25, 0.25]  # ties: ranked by class index
  scores = np.asarray(conformal.class_scores(probs, "aps"))
  for i in range(len(probs)):
    order = sorted(range(4), key=lambda k: (-probs[i, k], k))
    for position, k in enumerate(order):
      assert scores[i, k] == pytest.approx(sum(probs[i, j] for j in order[: position + 1]), abs=1e-6)
  np.testing.assert_allclose(conformal.class_scores(probs, "lac"), 1 - probs)
  for alpha in (0.1, 0.2, 0.5):
    label_scores = scores[np.arange(50), labels]
    expected = np.quantile(label_scores, math.ceil(51 * (1 - alpha)) / 50, method="inverted_cdf")  # the k-th smallest
    assert conformal.conformal_threshold(probs, labels, alpha, "aps") == pytest.approx(expected)
  assert conformal.conformal_threshold(probs[:5], labels[:5], 0.1) == math.inf  # rank 6 > n = 5: full sets
  with pytest.raises(ValueError, match="alpha"):
    conformal.conformal_threshold(probs, labels, 1.5)


@pytest.mark.parametrize("score,randomized", [("lac", False), ("aps", False), ("aps", True)])
def test_split_conformal_sets_reach_nominal_coverage(score, randomized):
  """Averaged over 20 random calibration/test splits, coverage lies in [1 - alpha, 1 - alpha + 1/(n+1)] up to
  sampling error: the per-split coverage has sd ~ sqrt(alpha (1 - alpha) / n) ~ 0.012, so ~0.003 on the mean."""
  alpha, n_cal = 0.1, 600
  probs, labels = _pool(1, 3000)
  rng = np.random.default_rng(2)
  coverages, sizes = [], []
  for trial in range(20):
    order = rng.permutation(len(labels))
    cal, test = order[:n_cal], order[n_cal:]
    key = jax.random.key(trial) if randomized else None
    threshold = conformal.conformal_threshold(probs[cal], labels[cal], alpha, score, key)
    key = jax.random.fold_in(key, 1) if randomized else None
    sets = conformal.prediction_sets(probs[test], threshold, score, key)
    statistics = conformal.set_statistics(sets, labels[test])
    coverages.append(statistics["coverage"])
    sizes.append(statistics["mean_size"])
  assert 1 - alpha - 0.01 < np.mean(coverages) < 1 - alpha + 1 / (n_cal + 1) + 0.01
  # Without conformalisation, the overconfident top-1 covers far less than 90 %: sets grow to reach it.
  assert np.mean(probs.argmax(-1) == labels) < 0.8 and 1 < np.mean(sizes) < 10


def test_bootstrap_intervals_cover_the_true_value_at_about_the_nominal_rate():
  """200 samples of n = 100 from Bernoulli(0.3): the 90 % interval should cover 0.3 in ~90 % of them
  (binomial sd of the rate: sqrt(0.09 / 200) ~ 0.02; percentile intervals of a mean undercover slightly)."""
  rng = np.random.default_rng(3)
  hits = 0
  for trial in range(200):
    sample = rng.uniform(size=100) < 0.3
    interval = stats.bootstrap_ci(np.mean, [sample], num_resamples=300, confidence=0.9, seed=trial)
    hits += interval["low"] <= 0.3 <= interval["high"]
    assert interval["value"] == sample.mean()
  assert 0.84 <= hits / 200 <= 0.96


def test_bootstrap_of_a_jax_metric():
  rng = np.random.default_rng(4)
  probs = scipy.special.softmax(rng.normal(size=(200, 3)) * 3, -1)
  labels = rng.integers(0, 3, size=200)
  interval = stats.bootstrap_ci(
    lambda p, y: calibration.expected_calibration_error(p, y, num_bins=10), [probs, labels], num_resamples=50
  )
  assert interval["low"] < interval["value"] < interval["high"]


def test_paired_comparison():
  rng = np.random.default_rng(5)
  labels = rng.integers(0, 2, size=300)
  better = np.where(rng.uniform(size=300) < 0.8, labels, 1 - labels)
  worse = np.where(rng.uniform(size=300) < 0.6, labels, 1 - labels)
  accuracy = lambda predictions, y: np.mean(predictions == y)
  result = stats.paired_comparison(accuracy, [better, labels], [worse, labels], num_resamples=500)
  assert result["difference"] == pytest.approx(accuracy(better, labels) - accuracy(worse, labels))
  assert result["low"] > 0 and result["p_value"] < 0.01
  same = stats.paired_comparison(accuracy, [better, labels], [better, labels], num_resamples=50)
  assert same["difference"] == 0 and same["p_value"] == 1.0
  # Under the null (two equally good systems) the test rejects at 10 % in about 10 % of the runs.
  rejections = 0
  for trial in range(100):
    truth = rng.integers(0, 2, size=60)
    a = np.where(rng.uniform(size=60) < 0.7, truth, 1 - truth)
    b = np.where(rng.uniform(size=60) < 0.7, truth, 1 - truth)
    result = stats.paired_comparison(accuracy, [a, truth], [b, truth], num_resamples=99, seed=trial)
    rejections += result["p_value"] <= 0.1
  assert rejections <= 10 + 3 * 3  # binomial(100, 0.1) sd = 3
  with pytest.raises(ValueError, match="same number of rows"):
    stats.paired_comparison(accuracy, [better, labels], [worse[:10], labels], num_resamples=5)


def test_batched_metrics_give_the_same_intervals_and_p_values(monkeypatch):
  """A batched metric (a leading resample axis) scores the very resamples one call each would: the same
  intervals and p-values, also when the resamples go in several chunks with a padded last one (7 per call here)."""
  rng = np.random.default_rng(6)
  labels = rng.integers(0, 3, size=50)
  probs_a, probs_b = (scipy.special.softmax(rng.normal(size=(50, 3)) * 2, -1) for _ in range(2))
  brier = lambda p, y: np.mean(np.sum((p - np.eye(3)[y]) ** 2, -1))
  batched_brier = lambda p, y: np.mean(np.sum((p - np.eye(3)[y]) ** 2, -1), -1)  # [R, N, C], [R, N] -> [R]
  monkeypatch.setattr(stats, "BATCH_ELEMENTS", 7 * 50 * 4)
  for seed in (0, 1):
    one_at_a_time = stats.bootstrap_ci(brier, [probs_a, labels], num_resamples=40, seed=seed)
    assert stats.bootstrap_ci(batched_brier, [probs_a, labels], 40, seed=seed, batched=True) == pytest.approx(
      one_at_a_time, rel=1e-12
    )
    arrays = ([probs_a, labels], [probs_b, labels])
    paired = stats.paired_comparison(brier, *arrays, num_resamples=40, seed=seed)
    assert stats.paired_comparison(batched_brier, *arrays, 40, seed=seed, batched=True) == pytest.approx(
      paired, rel=1e-12
    )
  assert one_at_a_time["low"] < one_at_a_time["value"] < one_at_a_time["high"] and 0 < paired["p_value"] <= 1


def test_score_dump_round_trip(tmp_path):
  columns = {
    "id": np.arange(3),
    "probs": np.array([[0.1, 0.9], [0.5, 0.5], [1.0, 0.0]]),
    "nll": np.array([0.1, 0.7, np.inf]),
    "text": ["a", "b", "c"],
  }
  path = str(tmp_path / "scores.jsonl")
  stats.dump_scores(path, columns)
  loaded = stats.load_scores(path)
  for name, column in columns.items():
    np.testing.assert_array_equal(loaded[name], column)
