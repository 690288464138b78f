"""Calibration metrics against scikit-learn and float64 NumPy references, edge cases, and a consistency limit."""

import fractions
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from sklearn import calibration as sk_calibration
from sklearn import metrics as sk

from jaxlm.evaluation import calibration


def _probs(seed, n=500, c=4, temperature=2.0):
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(n, c)) * temperature
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  labels = np.array([rng.choice(c, p=p) for p in np.exp(logits / 2) / np.exp(logits / 2).sum(-1, keepdims=True)])
  return probs.astype(np.float32), labels


def _reference_bins(confidences, num_bins, right_closed, binning):
  """Bin index of each confidence, by explicit interval tests (equal width) or Python-int ranks (equal mass)."""
  n = len(confidences)
  if binning == "equal_mass":
    ranks = np.empty(n, int)
    ranks[np.argsort(confidences, kind="stable")] = np.arange(n)
    return np.array([r * num_bins // n for r in ranks])
  return np.array([_exact_bin(c, num_bins, right_closed) for c in confidences])


def _nearest(fraction, dtype):
  """The `dtype` value nearest to an exact Fraction in [0, 1], ties to an even significand, by exact tests of
  the neighbours (for non-negative floats, the next and previous values are the bit patterns +-1)."""
  bits = {2: np.uint16, 4: np.uint32}[np.dtype(dtype).itemsize]
  guess = int(np.array(float(fraction)).astype(dtype).view(bits))
  candidates = [pattern for pattern in (guess - 1, guess, guess + 1) if pattern >= 0]
  value = lambda pattern: np.array(pattern, bits).view(dtype)[()]
  best = min(candidates, key=lambda p: (abs(fractions.Fraction(float(value(p))) - fraction), p & 1))
  return value(best)


def _exact_bin(confidence, num_bins, right_closed):
  """Bin of a confidence under the documented meaning: exactly k / B if it is the value of its dtype nearest to
  k / B, else its own exact value; then (k/B, (k+1)/B] (right-closed) or [k/B, (k+1)/B) in exact arithmetic."""
  value = fractions.Fraction(float(confidence))
  nearest_edge = round(value * num_bins)  # the only edge k / B that can round to this confidence
  if confidence == _nearest(fractions.Fraction(nearest_edge, num_bins), confidence.dtype.type):
    value = fractions.Fraction(nearest_edge, num_bins)
  index = math.ceil(value * num_bins) - 1 if right_closed else math.floor(value * num_bins)
  return min(max(index, 0), num_bins - 1)


def _reference_ece(confidences, correct, num_bins, norm, right_closed=True, binning="equal_width"):
  ids = _reference_bins(confidences, num_bins, right_closed, binning)
  confidences, correct = confidences.astype(np.float64), correct.astype(np.float64)
  gaps, fractions = [], []
  for b in range(num_bins):
    inside = ids == b
    if inside.any():
      gaps.append(abs(correct[inside].mean() - confidences[inside].mean()))
      fractions.append(inside.mean())
  gaps, fractions = np.array(gaps), np.array(fractions)
  return {"l1": (fractions * gaps).sum(), "l2": np.sqrt((fractions * gaps**2).sum()), "max": gaps.max()}[norm]


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("binning,right_closed", [("equal_width", True), ("equal_width", False), ("equal_mass", True)])
def test_ece_matches_a_float64_reference(seed, binning, right_closed):
  probs, labels = _probs(seed, n=499)  # N not a multiple of the bin count
  confidences, correct = probs.max(-1), (probs.argmax(-1) == labels)
  ece = jax.jit(
    calibration.expected_calibration_error, static_argnames=("num_bins", "norm", "binning", "classwise", "right_closed")
  )
  for num_bins in (5, 15):
    for norm in ("l1", "l2", "max"):
      ours = ece(probs, labels, num_bins=num_bins, norm=norm, binning=binning, right_closed=right_closed)
      expected = _reference_ece(confidences, correct, num_bins, norm, right_closed, binning)
      assert float(ours) == pytest.approx(expected, rel=1e-5, abs=1e-7)
    classwise = ece(probs, labels, num_bins=num_bins, binning=binning, right_closed=right_closed, classwise=True)
    expected = np.mean(
      [_reference_ece(probs[:, k], labels == k, num_bins, "l1", right_closed, binning) for k in range(probs.shape[1])]
    )
    assert float(classwise) == pytest.approx(expected, rel=1e-5)
  assert float(calibration.max_calibration_error(probs, labels, binning=binning)) == pytest.approx(
    _reference_ece(confidences, correct, 15, "max", True, binning), rel=1e-5
  )


def test_bin_edges_zero_one_and_empty_bins():
  confidences = np.array([0.0, 0.2, 0.2, 0.4, 0.6, 1.0], np.float32)
  np.testing.assert_array_equal(calibration.equal_width_bin_ids(confidences, 5), [0, 0, 0, 1, 2, 4])
  np.testing.assert_array_equal(calibration.equal_width_bin_ids(confidences, 5, right_closed=False), [0, 1, 1, 2, 3, 4])
  # Two examples at confidence 1.0, one right one wrong; 0.5 right: bins 2..3 empty and contribute nothing.
  probs = np.array([[1.0, 0.0], [1.0, 0.0], [0.5, 0.5]], np.float32)
  labels = np.array([0, 1, 0])
  assert float(calibration.expected_calibration_error(probs, labels, num_bins=4)) == pytest.approx(
    2 / 3 * 0.5 + 1 / 3 * 0.5
  )
  assert float(calibration.max_calibration_error(probs, labels, num_bins=4)) == pytest.approx(0.5)
  curve = calibration.reliability_curve(*calibration.top_label(probs, labels), num_bins=4)
  np.testing.assert_array_equal(curve["bin_count"], [0, 1, 0, 2])
  assert np.isnan(curve["bin_accuracy"][0]) and curve["bin_accuracy"][3] == 0.5


def _on_and_beside_edges(num_bins, dtype):
  """0, 1, every edge k / B as the nearest `dtype` value, and the two neighbouring values of each edge."""
  edges = np.array([_nearest(fractions.Fraction(k, num_bins), dtype) for k in range(num_bins + 1)], dtype)
  values = np.concatenate([edges, np.nextafter(edges, dtype(0)), np.nextafter(edges, dtype(1))])
  return values


@pytest.mark.parametrize("right_closed", [True, False])
def test_confidences_on_bin_edges_for_every_bin_count(right_closed):
  """float32 (B = 1..100, 128, 1000) and float16 (a few B): every edge, and the values just beside it."""
  cases = [(b, np.float32) for b in [*range(1, 101), 128, 1000]] + [(b, np.float16) for b in (3, 7, 10, 15, 100)]
  bin_ids = jax.jit(calibration.equal_width_bin_ids, static_argnums=(1, 2))  # one compile per case, not per op
  for num_bins, dtype in cases:
    confidences = _on_and_beside_edges(num_bins, dtype)
    expected = [_exact_bin(c, num_bins, right_closed) for c in confidences]
    ours = bin_ids(confidences, num_bins, right_closed)
    np.testing.assert_array_equal(ours, expected, err_msg=f"{num_bins} bins, {dtype.__name__}")
  # The cases of issue 13 (float32 linspace put these edges at 0.8000001 and 0.049999997).
  for c, num_bins, right, left in [
    (0.8, 15, 11, 12),
    (0.05, 100, 4, 5),
    (1 / 3, 3, 0, 1),
    (0.0, 5, 0, 0),
    (1.0, 5, 4, 4),
  ]:
    bin_id = calibration.equal_width_bin_ids(np.float32(c), num_bins, right_closed=right_closed)
    assert int(bin_id) == (right if right_closed else left), (c, num_bins)


@pytest.mark.parametrize("num_bins,right_closed", [(15, False), (15, True), (100, True), (100, False), (10, True)])
def test_ece_with_confidences_on_edges_matches_an_exact_reference(num_bins, right_closed):
  """Binary problems whose confidences all sit on edges k / B >= 1/2 (or one value beside them): ECE, L2, MCE."""
  rng = np.random.default_rng(num_bins)
  candidates = _on_and_beside_edges(num_bins, np.float32)
  candidates = candidates[candidates >= 0.5]
  confidence = rng.choice(candidates, size=400)
  probs = np.stack([confidence, 1 - confidence], -1)  # 1 - c is exact in float32 for c in [1/2, 1]
  labels = (rng.uniform(size=400) > confidence).astype(np.int32)
  for norm in ("l1", "l2", "max"):
    ours = calibration.expected_calibration_error(probs, labels, num_bins, norm, right_closed=right_closed)
    expected = _reference_ece(confidence, labels == 0, num_bins, norm, right_closed)
    assert float(ours) == pytest.approx(expected, rel=1e-5, abs=1e-7), norm


def test_interior_edges_are_correctly_rounded():
  for num_bins in range(1, 300):
    for dtype in (np.float32, np.float16, jnp.bfloat16, np.float64):
      if dtype == np.float64:  # float() of a Fraction is correctly rounded by Python itself
        reference = [float(fractions.Fraction(k, num_bins)) for k in range(1, num_bins)]
      else:
        reference = [_nearest(fractions.Fraction(k, num_bins), dtype) for k in range(1, num_bins)]
      np.testing.assert_array_equal(calibration.interior_edges(num_bins, dtype), np.array(reference, dtype))


def test_weighted_bin_sums_stream_over_batches():
  """Bin sums of two weighted batches add up to the weighted ECE of the whole set (float64 reference)."""
  probs, labels = _probs(5, n=400)
  confidences, correct = probs.max(-1), (probs.argmax(-1) == labels)
  weights = np.random.default_rng(5).uniform(0, 2, size=400).astype(np.float32)
  sums = [
    calibration.calibration_bin_sums(confidences[part], correct[part], weights[part])
    for part in (slice(0, 150), slice(150, None))
  ]
  total = jax.tree.map(lambda a, b: a + b, *sums)
  ids = _reference_bins(confidences, 15, True, "equal_width")
  expected = 0.0
  for b in range(15):
    w = weights[ids == b].astype(np.float64)
    if w.sum() > 0:
      gap = abs(np.sum(w * correct[ids == b]) - np.sum(w * confidences[ids == b])) / w.sum()
      expected += w.sum() / weights.astype(np.float64).sum() * gap
  assert float(calibration.ece_from_bin_sums(total)) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("num_bins", [5, 10])
def test_reliability_curve_matches_sklearn_calibration_curve(num_bins):
  rng = np.random.default_rng(2)
  positive_prob = rng.uniform(size=300) ** 2
  positive_prob[:3] = [0.0, 1.0, 0.4]  # exactly on edges
  labels = (rng.uniform(size=300) < positive_prob).astype(int)
  curve = calibration.reliability_curve(positive_prob.astype(np.float64), labels, num_bins=num_bins)
  nonempty = np.asarray(curve["bin_count"]) > 0
  prob_true, prob_pred = sk_calibration.calibration_curve(labels, positive_prob, n_bins=num_bins)
  np.testing.assert_allclose(np.asarray(curve["bin_accuracy"])[nonempty], prob_true, rtol=1e-6)
  np.testing.assert_allclose(np.asarray(curve["bin_confidence"])[nonempty], prob_pred, rtol=1e-6)


def test_brier_and_nll_match_sklearn():
  probs, labels = _probs(3)
  probs = probs.astype(np.float64) / probs.astype(np.float64).sum(-1, keepdims=True)
  assert float(calibration.brier_score(probs, labels)) == pytest.approx(
    sk.brier_score_loss(labels, probs, labels=range(4), scale_by_half=False), rel=1e-6
  )
  assert float(calibration.negative_log_likelihood(probs, labels)) == pytest.approx(
    sk.log_loss(labels, probs, labels=range(4)), rel=1e-6
  )
  # Binary: twice scikit-learn's default binary Brier; one class absent from the labels still fine.
  binary = np.stack([1 - probs[:, 0], probs[:, 0]], -1)
  ones = np.ones(len(probs), int)
  assert float(calibration.brier_score(binary, ones)) == pytest.approx(
    2 * sk.brier_score_loss(ones, binary[:, 1], pos_label=1), rel=1e-6
  )
  # Probabilities of exactly 0 and 1: +inf by default, scikit-learn's clipping on request.
  hard = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  hard_labels = np.array([0, 1, 1])
  assert np.isinf(float(calibration.negative_log_likelihood(hard, hard_labels)))
  eps = np.finfo(np.float64).eps
  assert float(calibration.negative_log_likelihood(hard, hard_labels, min_prob=eps)) == pytest.approx(
    sk.log_loss(hard_labels, hard), rel=1e-6
  )
  assert float(calibration.brier_score(hard, hard_labels)) == pytest.approx(2 / 3)


def test_ece_of_perfectly_calibrated_data_tends_to_zero():
  """Confidence c ~ U(0.5, 1), correct ~ Bernoulli(c): the binned gap is pure sampling noise, O(sqrt(B / N))."""

  def ece_of(n, seed):
    rng = np.random.default_rng(seed)
    confidence = rng.uniform(0.5, 1.0, size=n)
    correct = rng.uniform(size=n) < confidence
    probs = np.stack([confidence, 1 - confidence], -1).astype(np.float32)
    return float(calibration.expected_calibration_error(probs, np.where(correct, 0, 1)))

  small, large = ece_of(1_000, 0), ece_of(200_000, 1)
  # E|gap_b| ~ sqrt(c(1-c) / n_b) ~ 0.4 / sqrt(N / 8) (8 of the 15 bins are populated).
  assert large < 3 * 0.4 / np.sqrt(200_000 / 8) < small
  assert large < small / 5


def test_selective_prediction_against_numpy_and_sklearn():
  rng = np.random.default_rng(4)
  confidences = np.round(rng.uniform(size=200), 2)  # ties
  correct = rng.uniform(size=200) < confidences
  curve = calibration.risk_coverage_curve(confidences, correct)
  for threshold, coverage, risk in zip(curve["threshold"], curve["coverage"], curve["risk"]):
    accepted = confidences >= threshold
    assert coverage == pytest.approx(accepted.mean())
    assert risk == pytest.approx(1 - correct[accepted].mean())
  assert curve["coverage"][-1] == 1.0
  distinct = np.unique(rng.uniform(size=50))
  hits = rng.uniform(size=50) < 0.7
  order = np.argsort(-distinct)
  expected = np.mean([1 - hits[order[:k]].mean() for k in range(1, 51)])
  assert calibration.area_under_risk_coverage(distinct, hits) == pytest.approx(expected)
  assert float(calibration.confidence_auroc(confidences, correct)) == pytest.approx(
    sk.roc_auc_score(correct, confidences), rel=1e-6
  )


def test_in_step_sharded_ece_equals_the_offline_ece():
  """The causal-LM eval step on a 2x2x2 (data, fsdp, tensor) mesh of 8 devices: ECE from bin sums reduced
  across devices equals `expected_calibration_error` on the gathered next-token probabilities of the targets."""
  from conftest import tiny_model_config
  from jaxlm import sharding
  from jaxlm.models import Decoder
  from jaxlm.models import params as params_lib
  from jaxlm.tasks import causal_lm
  from jaxlm.training import steps

  if jax.device_count() < 8:
    pytest.skip("needs 8 (simulated) devices")
  model = Decoder(tiny_model_config(num_layers=1))
  mesh = sharding.create_mesh(dict(data=2, fsdp=2, tensor=2))
  shardings = jax.tree.map(lambda x: x.sharding, params_lib.abstract_params(model, mesh))
  # Born sharded; x4 gives sharper, more varied confidences than at init.
  params = jax.tree.map(lambda x: x * 4.0, params_lib.init_params(model, jax.random.key(0), mesh))
  rng = np.random.default_rng(0)
  segment_ids = np.repeat([[1] * 9 + [2] * 5 + [0] * 2], 16, axis=0).astype(np.int32)
  batch = {
    "tokens": rng.integers(1, 64, size=(16, 16)).astype(np.int32),
    "segment_ids": segment_ids,
    "positions": np.concatenate([np.arange(9), np.arange(5), [0, 0]])[None].repeat(16, 0).astype(np.int32),
  }
  batch_sharding = sharding.batch_sharding(mesh)
  batch = jax.device_put(batch, batch_sharding)

  # One compiled program returns the eval step's sums and the logits (gathered), to compile only once.
  def eval_step_and_logits(params, batch):
    logits = model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    return steps.eval_step(params, batch, model=model, task=causal_lm.CausalLm()), logits

  run = jax.jit(eval_step_and_logits, in_shardings=(shardings, batch_sharding), out_shardings=sharding.replicated(mesh))
  with sharding.mesh_context(mesh):
    sums, logits = jax.device_get(run(params, batch))
  weights = np.asarray(causal_lm.target_weights(np.asarray(batch["segment_ids"]))) > 0
  probs = scipy.special.softmax(logits, axis=-1)[weights]
  targets = np.roll(np.asarray(batch["tokens"]), -1, axis=1)[weights]
  assert float(sums["bin_count"].sum()) == weights.sum()
  offline = float(calibration.expected_calibration_error(probs, targets))
  assert offline > 0.01
  assert causal_lm.summarize(sums)["ece"] == pytest.approx(offline, rel=1e-5)


def test_token_level_ece_of_a_padded_batch_needs_no_flattening():
  """[B, T, V] probabilities with a [B, T] mask: equal to the ECE of the kept rows, for every binning, and
  under jit; integer weights count as repeated examples for equal-width bins."""
  rng = np.random.default_rng(7)
  logits = rng.normal(size=(3, 11, 9)) * 3
  probs = scipy.special.softmax(logits, -1).astype(np.float32)
  targets = rng.integers(0, 9, size=(3, 11))
  mask = rng.uniform(size=(3, 11)) < 0.7
  ece = jax.jit(
    calibration.expected_calibration_error, static_argnames=("num_bins", "norm", "binning", "classwise", "right_closed")
  )
  for binning in ("equal_width", "equal_mass"):
    for classwise in (False, True):
      for norm in ("l1", "max"):
        kwargs = dict(num_bins=10, norm=norm, binning=binning, classwise=classwise)
        expected = calibration.expected_calibration_error(probs[mask], targets[mask], **kwargs)
        for weights in (mask, mask.astype(np.float32), mask.astype(np.int32)):
          assert float(ece(probs, targets, weights=weights, **kwargs)) == pytest.approx(float(expected), rel=1e-5)
  counts = rng.integers(0, 4, size=(3, 11))
  repeated = calibration.expected_calibration_error(
    np.repeat(probs.reshape(33, 9), counts.ravel(), 0), np.repeat(targets.ravel(), counts.ravel())
  )
  assert float(calibration.expected_calibration_error(probs, targets, weights=counts)) == pytest.approx(
    float(repeated), rel=1e-5
  )
  # Equal-mass bins by weight: the float64 rule floor(W_before * B / W) on the sorted weighted examples.
  confidences = probs.max(-1).ravel()
  weights = rng.uniform(0, 2, size=33).astype(np.float32)
  order = np.argsort(confidences, kind="stable")
  before = np.zeros(33)
  before[order] = np.concatenate([[0.0], np.cumsum(weights[order].astype(np.float64))[:-1]])
  expected_ids = np.floor(before * 4 / weights.astype(np.float64).sum()).astype(int)
  np.testing.assert_array_equal(calibration.equal_mass_bin_ids(confidences, 4, weights), expected_ids)


def test_inputs_are_checked_with_clear_messages():
  probs, labels = _probs(8, n=20)
  logits = np.log(probs) * 3
  with pytest.raises(ValueError, match=r"probs must be probabilities in \[0, 1\] \(pass softmax\(logits\)"):
    calibration.expected_calibration_error(logits, labels)
  with pytest.raises(ValueError, match="probs must sum to 1 over the last"):
    calibration.expected_calibration_error(probs * 0.5, labels)
  with pytest.raises(ValueError, match="labels must be integer class indices, got dtype float32"):
    calibration.expected_calibration_error(probs, labels.astype(np.float32))
  with pytest.raises(ValueError, match=r"labels must be class indices in \[0, 4\); got values in \[1, 4\]"):
    calibration.expected_calibration_error(probs, np.where(labels == 0, 4, labels))
  with pytest.raises(ValueError, match=r"probs must be \[..., C\] and labels \[...\]"):
    calibration.expected_calibration_error(probs, labels[:-1])
  with pytest.raises(ValueError, match=r"weights must have the examples' shape \(20,\)"):
    calibration.expected_calibration_error(probs, labels, weights=np.ones(19))
  with pytest.raises(ValueError, match=r"weights must be finite and >= 0"):
    calibration.expected_calibration_error(probs, labels, weights=-np.ones(20))
  with pytest.raises(ValueError, match=r"probs must be probabilities"):
    calibration.negative_log_likelihood(np.full((2, 2), np.nan, np.float32), np.array([0, 1]))
  with pytest.raises(ValueError, match="correct must have the confidences' shape"):
    calibration.calibration_bin_sums(probs.max(-1), labels[:3] == 0)
  with pytest.raises(ValueError, match=r"confidences must be probabilities in \[0, 1\]"):
    calibration.calibration_bin_sums(logits.max(-1), labels == 0)
  with pytest.raises(ValueError, match="confidences must be floating-point"):
    calibration.calibration_bin_sums(labels, labels == 0)
  # Under jit the values are tracers: shape and dtype checks still run, range checks are skipped.
  sums = jax.jit(calibration.calibration_bin_sums)(probs.max(-1), labels == 0, np.ones(20, np.float32))
  assert float(sums["bin_count"].sum()) == 20
  with pytest.raises(ValueError, match="labels must be integer class indices"):
    jax.jit(calibration.expected_calibration_error)(probs, labels.astype(np.float32))
