"""Post-hoc calibrators: known-parameter recovery, scikit-learn references, invariants, save/load round trip."""

import numpy as np
import pytest
import scipy.special
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression

from jaxlm.evaluation import calibration, calibrators


def _synthetic(seed, n=3000, c=5, temperature=2.5, scale=3.0):
  """Logits z ~ N(0, scale^2) and labels drawn from softmax(z / temperature): the true temperature is known."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c)) * scale
  probs = scipy.special.softmax(logits / temperature, axis=-1)
  labels = (rng.uniform(size=(n, 1)) > np.cumsum(probs, -1)).sum(-1)
  return logits, labels


def _nll(probs, labels):
  return float(calibration.negative_log_likelihood(probs, labels))


def test_temperature_scaling_recovers_a_known_temperature():
  logits, labels = _synthetic(0, n=4000)
  calibrator = calibrators.TemperatureScaling().fit(logits, labels)
  # The MLE of T has standard error ~ T / sqrt(N * Var(score)); a few percent here.
  assert float(calibrator.params["temperature"]) == pytest.approx(2.5, rel=0.06)
  probs = calibrator(logits)
  np.testing.assert_array_equal(probs.argmax(-1), logits.argmax(-1))
  # The fitted temperature is the NLL minimiser: nudging it either way does worse.
  t = float(calibrator.params["temperature"])
  best = _nll(probs, labels)
  for other in (t * 0.99, t * 1.01):
    assert _nll(scipy.special.softmax(logits / other, -1), labels) > best
  assert float(calibration.expected_calibration_error(probs, labels)) < float(
      calibration.expected_calibration_error(scipy.special.softmax(logits, -1), labels))


def test_temperature_scaling_hits_the_bound_on_separable_data():
  logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
  calibrator = calibrators.TemperatureScaling(min_temperature=1e-2).fit(logits, np.array([0, 1, 0]))
  assert float(calibrator.params["temperature"]) == pytest.approx(1e-2)


@pytest.mark.parametrize("kind,features", [("matrix", lambda z: z),
                                           ("dirichlet", lambda z: scipy.special.log_softmax(z, -1))])
def test_matrix_and_dirichlet_equal_unpenalised_multinomial_logistic_regression(kind, features):
  logits, labels = _synthetic(1, n=1500, c=3)
  ours = calibrators.CALIBRATORS[kind]().fit(logits, labels)(logits)
  reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(features(logits), labels)
  np.testing.assert_allclose(ours, reference.predict_proba(features(logits)), atol=2e-5)


def test_vector_scaling_nests_temperature_scaling():
  logits, labels = _synthetic(2, n=1500, c=4)
  vector = calibrators.VectorScaling().fit(logits, labels)
  temperature = calibrators.TemperatureScaling().fit(logits, labels)
  assert _nll(vector(logits), labels) <= _nll(temperature(logits), labels) + 1e-9
  # At the optimum the NLL gradient of the bias is zero: mean predicted probability = class frequency.
  np.testing.assert_allclose(vector(logits).mean(0), np.bincount(labels, minlength=4) / len(labels), atol=1e-6)


def test_platt_scaling_matches_sklearn_logistic_regression():
  logits, labels = _synthetic(3, n=1000, c=2)
  margin = (logits[:, 1] - logits[:, 0])[:, None]
  reference = LogisticRegression(C=np.inf, tol=1e-12, max_iter=10_000).fit(margin, labels)
  np.testing.assert_allclose(calibrators.PlattScaling().fit(logits, labels)(logits), reference.predict_proba(margin),
                             atol=1e-6)
  with pytest.raises(ValueError, match="binary"):
    calibrators.PlattScaling().fit(np.zeros((3, 3)), np.array([0, 1, 2]))


def test_pool_adjacent_violators_matches_sklearn_isotonic_regression():
  rng = np.random.default_rng(4)
  x = np.round(rng.uniform(size=500), 2)  # ties in x
  y = (rng.uniform(size=500) < x ** 2).astype(float)
  xs, fitted = calibrators.isotonic_fit(x, y)
  reference = IsotonicRegression(out_of_bounds="clip").fit(x, y)
  queries = np.concatenate([rng.uniform(-0.1, 1.1, size=200), [0.0, 1.0]])
  np.testing.assert_allclose(np.interp(queries, xs, fitted), reference.predict(queries), atol=1e-12)


@pytest.mark.parametrize("num_classes", [2, 4])
def test_isotonic_and_histogram_calibrators_one_vs_rest(num_classes):
  logits, labels = _synthetic(5, n=800, c=num_classes)
  probs = scipy.special.softmax(logits, -1)
  isotonic = calibrators.IsotonicCalibration().fit(logits, labels)(logits)
  histogram = calibrators.HistogramBinning(num_bins=10).fit(logits, labels)(logits)
  classes = [1] if num_classes == 2 else range(num_classes)
  columns = []
  for k in classes:
    columns.append(IsotonicRegression(out_of_bounds="clip").fit(probs[:, k], labels == k).predict(probs[:, k]))
  expected = np.stack([1 - columns[0], columns[0]], -1) if num_classes == 2 else \
      np.stack(columns, -1) / np.stack(columns, -1).sum(-1, keepdims=True)
  np.testing.assert_allclose(isotonic, expected, atol=1e-12)
  # Histogram binning: a float64 loop over right-closed bins (lo, hi].
  edges = np.linspace(0, 1, 11)
  columns = []
  for k in classes:
    bin_ids = np.array([next(b for b in range(10) if p <= edges[b + 1]) for p in probs[:, k]])
    values = [np.mean(labels[bin_ids == b] == k) if np.any(bin_ids == b) else (b + 0.5) / 10 for b in range(10)]
    columns.append(np.array(values)[bin_ids])
  expected = np.stack([1 - columns[0], columns[0]], -1) if num_classes == 2 else \
      np.stack(columns, -1) / np.stack(columns, -1).sum(-1, keepdims=True)
  np.testing.assert_allclose(histogram, expected, atol=1e-12)
  for result in (isotonic, histogram):
    np.testing.assert_allclose(result.sum(-1), 1.0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(calibrators.CALIBRATORS))
def test_fitting_is_deterministic_and_save_load_round_trips(name, tmp_path):
  logits, labels = _synthetic(6, n=400, c=2 if name == "platt" else 3)
  first = calibrators.CALIBRATORS[name]().fit(logits, labels)
  second = calibrators.CALIBRATORS[name]().fit(logits, labels)
  path = first.save(str(tmp_path / "checkpoints"), step=1200)
  assert path == str(tmp_path / "checkpoints" / f"calibrator_{name}_step1200.json")
  loaded = calibrators.load(str(tmp_path / "checkpoints"), 1200, name)
  held_out, _ = _synthetic(7, n=100, c=logits.shape[1])
  np.testing.assert_array_equal(first(held_out), second(held_out))
  np.testing.assert_array_equal(loaded(held_out), first(held_out))


def test_clear_errors():
  with pytest.raises(ValueError, match="not fitted"):
    calibrators.TemperatureScaling()(np.zeros((2, 3)))
  with pytest.raises(ValueError, match=r"labels must be \[N\] integers in \[0, 3\)"):
    calibrators.TemperatureScaling().fit(np.zeros((2, 3)), np.array([0, 3]))
  with pytest.raises(FileNotFoundError, match="Fit one and call save"):
    calibrators.load("/nonexistent", 5, "temperature")
