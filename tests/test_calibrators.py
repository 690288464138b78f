"""Post-hoc calibrators: known-parameter recovery, scikit-learn references, invariants, save/load round trip."""

import jax.numpy as jnp
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
    calibration.expected_calibration_error(scipy.special.softmax(logits, -1), labels)
  )


def _float64_temperature(logits, labels, min_temperature=1e-3, max_temperature=1e3):
  """The float64 NumPy host fit that preceded the device fit: safeguarded Newton on beta = 1/T to 1e-13."""
  logits = np.asarray(logits, np.float64)
  label_logits = logits[np.arange(len(labels)), labels]
  low, high = 1.0 / max_temperature, 1.0 / min_temperature
  beta = min(max(1.0, low), high)
  for _ in range(200):
    probs = scipy.special.softmax(beta * logits, axis=-1)
    mean = np.sum(probs * logits, axis=-1)
    gradient = np.mean(mean - label_logits)
    curvature = np.mean(np.sum(probs * logits**2, axis=-1) - mean**2)
    high, low = (beta, low) if gradient > 0 else (high, beta)
    step = beta - gradient / curvature if curvature > 0 else np.inf
    new_beta = step if low < step < high else 0.5 * (low + high)
    if abs(new_beta - beta) <= 1e-13 * beta or high - low <= 1e-13 * high:
      return 1.0 / new_beta
    beta = new_beta
  return 1.0 / beta


@pytest.mark.parametrize("chunk_size", [None, 64, 7, 1])
def test_device_temperature_fit_agrees_with_a_float64_fit(chunk_size):
  """Chunks smaller than N (and not dividing it: 1001 rows), JAX float32 and bfloat16 inputs."""
  logits, labels = _synthetic(8, n=1001, c=37, temperature=0.7)
  expected = _float64_temperature(logits, labels)
  fitted = calibrators.TemperatureScaling(chunk_size=chunk_size).fit(logits, labels)
  assert float(fitted.params["temperature"]) == pytest.approx(expected, rel=2e-6)
  on_device = calibrators.TemperatureScaling(chunk_size=chunk_size).fit(jnp.asarray(logits, jnp.float32), labels)
  assert float(on_device.params["temperature"]) == pytest.approx(expected, rel=2e-6)
  rounded = jnp.asarray(logits, jnp.bfloat16)
  bf16 = calibrators.TemperatureScaling(chunk_size=chunk_size).fit(rounded, labels)
  assert float(bf16.params["temperature"]) == pytest.approx(
    _float64_temperature(np.asarray(rounded, np.float64), labels), rel=2e-6
  )


def test_temperature_scaling_hits_the_bound_on_separable_data():
  logits = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, -1.0]])
  calibrator = calibrators.TemperatureScaling(min_temperature=1e-2).fit(logits, np.array([0, 1, 0]))
  assert float(calibrator.params["temperature"]) == pytest.approx(1e-2)


@pytest.mark.parametrize(
  "kind,features", [("matrix", lambda z: z), ("dirichlet", lambda z: scipy.special.log_softmax(z, -1))]
)
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
  np.testing.assert_allclose(
    calibrators.PlattScaling().fit(logits, labels)(logits), reference.predict_proba(margin), atol=1e-6
  )
  with pytest.raises(ValueError, match="binary"):
    calibrators.PlattScaling().fit(np.zeros((3, 3)), np.array([0, 1, 2]))


def test_pool_adjacent_violators_matches_sklearn_isotonic_regression():
  rng = np.random.default_rng(4)
  x = np.round(rng.uniform(size=500), 2)  # ties in x
  y = (rng.uniform(size=500) < x**2).astype(float)
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
  expected = (
    np.stack([1 - columns[0], columns[0]], -1)
    if num_classes == 2
    else np.stack(columns, -1) / np.stack(columns, -1).sum(-1, keepdims=True)
  )
  np.testing.assert_allclose(isotonic, expected, atol=1e-12)
  # Histogram binning: a float64 loop over right-closed bins (lo, hi].
  edges = np.linspace(0, 1, 11)
  columns = []
  for k in classes:
    bin_ids = np.array([next(b for b in range(10) if p <= edges[b + 1]) for p in probs[:, k]])
    values = [np.mean(labels[bin_ids == b] == k) if np.any(bin_ids == b) else (b + 0.5) / 10 for b in range(10)]
    columns.append(np.array(values)[bin_ids])
  expected = (
    np.stack([1 - columns[0], columns[0]], -1)
    if num_classes == 2
    else np.stack(columns, -1) / np.stack(columns, -1).sum(-1, keepdims=True)
  )
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
  logits, labels = _synthetic(9, n=50, c=3)
  probs = scipy.special.softmax(logits, -1)
  for name in sorted(calibrators.CALIBRATORS):
    if name == "platt":  # binary only: these are three-class problems
      continue
    with pytest.raises(ValueError, match="logits look like probabilities"):
      calibrators.CALIBRATORS[name]().fit(probs, labels)
    with pytest.raises(ValueError, match=r"labels must be \[N\] integers in \[0, 3\) \(class indices\), got dtype f"):
      calibrators.CALIBRATORS[name]().fit(logits, labels.astype(np.float64))
    with pytest.raises(ValueError, match="got dtype bool"):
      calibrators.CALIBRATORS[name]().fit(logits, labels == 0)
    fitted = calibrators.CALIBRATORS[name]().fit(logits, labels)
    with pytest.raises(ValueError, match="logits look like probabilities"):
      fitted(probs)
  calibrators.TemperatureScaling().fit(np.log(probs), labels)  # log-probabilities are logits
  with pytest.raises(ValueError, match="logits look like probabilities"):
    calibrators.TemperatureScaling().fit(jnp.asarray(probs, jnp.float32), labels)
  with pytest.raises(ValueError, match="logits must be finite"):
    calibrators.TemperatureScaling().fit(np.full((2, 3), np.nan), np.array([0, 1]))
  with pytest.raises(ValueError, match=r"logits must be \[N, C\] \(class scores per example, C >= 2\)"):
    calibrators.VectorScaling().fit(logits[:, 0], labels)
  with pytest.raises(ValueError, match="logits must be floating-point class scores, got dtype int64"):
    calibrators.VectorScaling().fit(np.ones((2, 3), np.int64), np.array([0, 1]))


@pytest.mark.parametrize("right_closed", [True, False])
def test_histogram_binning_puts_edge_probabilities_in_the_right_bin(right_closed):
  """float64 probabilities exactly 0.3 or 0.7 (float64 linspace(0, 1, 11) has 0.30000000000000004 and
  0.7000000000000001) lie on edges 3 and 7 of 10 bins."""
  probs = np.array([[0.7, 0.3], [0.3, 0.7], [0.95, 0.05], [0.05, 0.95]])
  labels = np.array([0, 1, 0, 1])
  calibrator = calibrators.HistogramBinning(num_bins=10, right_closed=right_closed).fit(np.log(probs), labels)
  values = calibrator.params["bin_values"][0]  # positive class: P(label == 1) per bin
  filled = [2, 6, 0, 9] if right_closed else [3, 7, 0, 9]  # bins of 0.3, 0.7, 0.05 and 0.95
  assert [b for b in range(10) if values[b] != (b + 0.5) / 10] == sorted(filled)
