"""Calibration metrics: ECE / MCE (equal-width or equal-mass bins, top-label or class-wise), Brier, NLL,
reliability curves and selective prediction.

Reference implementations disagree on binning details, so every choice is an argument with a
documented default. Binning is fixed-shape (sums over a one-hot bin axis), so everything except the
selective-prediction curve runs under `jit`. The in-step path is `calibration_bin_sums` (sums, so they
add over batches and devices) followed by `ece_from_bin_sums`; `expected_calibration_error` is exactly
that composition, so the number tracked during training equals the offline one.

Conventions (defaults):
- Equal-width bins, 15 by default, with edges e_k = k / B (B bins). Other papers' settings: HELM reports 10
  equal-mass bins, scikit-learn's `calibration_curve` defaults to 5 equal-width bins.
  "On an edge": a confidence c is a float of some dtype D (float32 unless `jax_enable_x64`), and c lies
  exactly on edge k when it is the D value nearest to k / B (ties to even), i.e. the value one gets by
  writing the fraction as a literal, `np.float32(0.8)` for 12 / 15. Any other c is compared with k / B by
  its exact value. Equivalently: c is compared with the edges k / B correctly rounded to D (`interior_edges`),
  never with edges accumulated in floating point (float32 `linspace` gives 12 / 15 -> 0.8000001).
  `right_closed=True`: bin i is `(e_i, e_{i+1}]` as in Guo et al. 2017 and scikit-learn's
  `calibration_curve`; a confidence of exactly 0.0 goes to the first bin. `right_closed=False`: bin i is
  `[e_i, e_{i+1})` and a confidence of exactly 1.0 goes to the last bin `[e_{B-1}, 1]`. torchmetrics'
  calibration errors also use left-closed bins but give 1.0 an extra bin of its own (B + 1 bins in all, the
  extra one entering the L1 / L2 sums and the max), so the two differ when some confidence is exactly 1.0.
- Equal-mass bins: examples sorted by confidence (ties broken by example index, i.e. a stable sort); the
  example of 0-based rank r goes to bin `floor(r * num_bins / N)`, so bins hold floor or ceil of N/num_bins
  examples and tied confidences may straddle two bins. With weights, r and N become the weight of the
  examples sorted before it and the total weight, so a 0/1 mask bins exactly the examples it keeps.
- Empty bins contribute nothing (weight 0 to L1/L2, excluded from the max).
- Top-label: confidence = max_k p_k, prediction = argmax_k p_k (ties to the lowest class index),
  correct = [prediction == label].

Inputs are checked: shapes and dtypes always, value ranges (probabilities in [0, 1] summing to 1, labels in
[0, C), weights >= 0) only for concrete arrays. Under `jit`, `vmap` or `grad` the values are tracers and
are not known, so the range checks are skipped there and the functions stay traceable.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.evaluation import metrics

NORMS = ("l1", "l2", "max")
BINNINGS = ("equal_width", "equal_mass")


def _is_concrete(array) -> bool:
  """False for a tracer (inside `jit`, `vmap`, `grad`), whose values cannot be checked."""
  return not isinstance(array, jax.core.Tracer)


def _check_range(name: str, array: jax.Array, low: float, high: float, expected: str) -> None:
  """ValueError unless every value of a concrete `array` is in [low, high] (NaN fails); tracers pass unchecked.

  Only the two scalars min and max come back to the host, not the array.
  """
  if not _is_concrete(array) or array.size == 0:
    return
  smallest, largest = (x.item() for x in jax.device_get((jnp.min(array), jnp.max(array))))
  if not (smallest >= low and largest <= high):
    raise ValueError(f"{name} must be {expected}; got values in [{smallest}, {largest}].")


def _check_probs_and_labels(probs: jax.Array, labels: jax.Array) -> None:
  """probs [..., C] floating in [0, 1] with rows summing to 1; labels [...] integers in [0, C)."""
  if probs.ndim < 1 or labels.shape != probs.shape[:-1]:
    raise ValueError(
      f"probs must be [..., C] and labels [...] (the same leading shape); got {probs.shape} and {labels.shape}."
    )
  if not jnp.issubdtype(probs.dtype, jnp.floating):
    raise ValueError(f"probs must be floating-point probabilities, got dtype {probs.dtype}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}.")
  _check_range("probs", probs, 0.0, 1.0, "probabilities in [0, 1] (pass softmax(logits), not logits)")
  _check_range("labels", labels, 0, probs.shape[-1] - 1, f"class indices in [0, {probs.shape[-1]})")
  if _is_concrete(probs) and probs.size:
    # float32 sums of float32 probabilities are off by ~1e-7 * sqrt(C); 16-bit inputs by their own eps.
    tolerance = max(1e-3, 4 * float(jnp.finfo(probs.dtype).eps))
    error = float(jnp.max(jnp.abs(jnp.sum(probs, axis=-1, dtype=jnp.float32) - 1.0)))
    if not error <= tolerance:
      raise ValueError(
        f"probs must sum to 1 over the last (class) axis; a row is off by {error:.3g} (tolerance "
        f"{tolerance:.3g}). Pass softmax(logits), not logits or unnormalised scores."
      )


def _check_weights(weights: jax.Array, shape: tuple) -> None:
  if weights.shape != shape:
    raise ValueError(
      f"weights must have the examples' shape {shape} (one weight or mask value per example); got {weights.shape}."
    )
  if not (
    jnp.issubdtype(weights.dtype, jnp.floating)
    or jnp.issubdtype(weights.dtype, jnp.integer)
    or weights.dtype == jnp.bool_
  ):
    raise ValueError(f"weights must be real numbers or a boolean mask, got dtype {weights.dtype}.")
  _check_range("weights", weights, 0.0, np.inf, "finite and >= 0")


def top_label(probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(confidence, correct) of the top label: `max_k probs[..., k]` and `argmax_k probs[..., k] == labels` (float)."""
  probs = jnp.asarray(probs)
  correct = (jnp.argmax(probs, axis=-1) == jnp.asarray(labels)).astype(probs.dtype)
  return jnp.max(probs, axis=-1), correct


def interior_edges(num_bins: int, dtype=np.float64) -> np.ndarray:
  """The interior equal-width edges k / num_bins (k = 1 .. num_bins - 1), each the `dtype` value nearest to it.

  float64 `k / num_bins` is correctly rounded (one IEEE division), and rounding that again to a format of
  p <= 25 significand bits (float32, float16, bfloat16) still gives the value nearest to k / num_bins,
  because 53 >= 2p + 2 (double rounding is then innocuous, Figueroa 1995). A NumPy constant, so the same
  edges serve JAX (traced or not) and NumPy callers.
  """
  if not isinstance(num_bins, (int, np.integer)) or num_bins < 1:
    raise ValueError(f"num_bins must be a positive integer, got {num_bins!r}.")
  return (np.arange(1, num_bins, dtype=np.float64) / num_bins).astype(dtype)


def equal_width_bin_ids(confidences: jax.Array, num_bins: int = 15, right_closed: bool = True) -> jax.Array:
  """Bin index in [0, num_bins) of each confidence for equal-width bins on [0, 1] (see the module docstring).

  Right-closed: the number of interior edges strictly below c; left-closed: the number at or below c, with
  the edges of `interior_edges` in the confidences' dtype, so "on an edge" is the documented exact notion.
  Values outside [0, 1] land in the first or last bin.
  """
  confidences = jnp.asarray(confidences)
  if not jnp.issubdtype(confidences.dtype, jnp.floating):
    raise ValueError(f"confidences must be floating-point values in [0, 1], got dtype {confidences.dtype}.")
  interior = interior_edges(num_bins, confidences.dtype)
  above = confidences[..., None] > interior if right_closed else confidences[..., None] >= interior
  return jnp.sum(above, axis=-1, dtype=jnp.int32)


def equal_mass_bin_ids(confidences: jax.Array, num_bins: int = 15, weights: jax.Array | None = None) -> jax.Array:
  """Bin index of each of the N confidences [N] for equal-mass bins (see the module docstring).

  Sorted by confidence (stable), an example goes to bin floor(W_before * num_bins / W), with W_before the
  weight sorted before it and W the total (rank r and N without weights). Boolean, integer or absent weights
  are compared exactly in int32 (valid while W * num_bins < 2^31); float weights in their float dtype.
  """
  confidences = jnp.asarray(confidences)
  weights = jnp.ones(confidences.shape, jnp.int32) if weights is None else jnp.asarray(weights)
  if not jnp.issubdtype(weights.dtype, jnp.floating):
    weights = weights.astype(jnp.int32)
  order = jnp.argsort(confidences, stable=True)
  sorted_weights = weights[order]
  before = jnp.zeros_like(weights).at[order].set(jnp.cumsum(jnp.pad(sorted_weights, (1, 0)))[:-1])
  # floor(W_before * B / W) >= k  <=>  W_before * B >= k * W: no division, exact for integer weights.
  thresholds = jnp.arange(1, num_bins, dtype=weights.dtype) * jnp.sum(weights)
  return jnp.sum(before[:, None] * num_bins >= thresholds, axis=-1, dtype=jnp.int32)


def calibration_bin_sums(
  confidences: jax.Array,
  correct: jax.Array,
  weights: jax.Array | None = None,
  num_bins: int = 15,
  right_closed: bool = True,
  bin_ids: jax.Array | None = None,
) -> dict:
  """Per-bin sums of weight, weight * confidence and weight * correct (all [num_bins], float32 or wider).

  confidences: floating, in [0, 1]; correct (bool, integer or float in [0, 1]) and weights (>= 0, e.g. a
  padding mask) have its shape, which may be anything (e.g. [B, T] tokens); all axes are summed, so under
  `jit` with a sharded batch XLA reduces across devices. `bin_ids` overrides the equal-width binning (e.g.
  equal-mass ids). Value ranges are checked only outside `jit` (see the module docstring).
  """
  confidences = jnp.asarray(confidences)
  correct = jnp.asarray(correct)
  if not jnp.issubdtype(confidences.dtype, jnp.floating):
    raise ValueError(f"confidences must be floating-point values in [0, 1], got dtype {confidences.dtype}.")
  if correct.shape != confidences.shape:
    raise ValueError(f"correct must have the confidences' shape {confidences.shape}, got {correct.shape}.")
  _check_range("confidences", confidences, 0.0, 1.0, "probabilities in [0, 1]")
  _check_range("correct", correct, 0.0, 1.0, "0/1 (or bool) correctness in [0, 1]")
  dtype = jnp.promote_types(confidences.dtype, jnp.float32)
  if weights is None:
    weights = jnp.ones(confidences.shape, dtype)
  else:
    weights = jnp.asarray(weights)
    _check_weights(weights, confidences.shape)
    weights = weights.astype(dtype)
  if bin_ids is None:
    bin_ids = equal_width_bin_ids(confidences, num_bins, right_closed)
  one_hot = jax.nn.one_hot(bin_ids, num_bins, dtype=dtype) * weights[..., None]
  axes = tuple(range(confidences.ndim))
  return {
    "bin_count": jnp.sum(one_hot, axis=axes),
    "bin_confidence_sum": jnp.tensordot(confidences.astype(dtype), one_hot, axes=(axes, axes)),
    "bin_correct_sum": jnp.tensordot(correct.astype(dtype), one_hot, axes=(axes, axes)),
  }


def ece_from_bin_sums(bin_sums: dict, norm: str = "l1") -> jax.Array:
  """Calibration error from `calibration_bin_sums` output (works on NumPy or JAX arrays).

  With n_b the weight in bin b, N = sum_b n_b, gap_b = |correct_sum_b - confidence_sum_b| / n_b:
  l1 (ECE) = sum_b n_b / N * gap_b; l2 = sqrt(sum_b n_b / N * gap_b^2); max (MCE) = max over non-empty
  bins of gap_b. Empty bins contribute nothing; with no weight at all the result is 0.
  """
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  return _error_from_bins(bin_sums["bin_count"], bin_sums["bin_correct_sum"], bin_sums["bin_confidence_sum"], norm)


@functools.partial(jax.jit, static_argnames="norm")  # one program, not nine eager ops per evaluation summary
def _error_from_bins(count, correct_sum, confidence_sum, norm):
  nonempty = count > 0
  safe = jnp.where(nonempty, count, 1.0)
  gap = jnp.where(nonempty, jnp.abs(correct_sum - confidence_sum) / safe, 0.0)
  if norm == "max":
    return jnp.max(gap)
  fraction = count / jnp.maximum(jnp.sum(count), jnp.finfo(count.dtype).tiny)
  return jnp.sum(fraction * gap) if norm == "l1" else jnp.sqrt(jnp.sum(fraction * gap**2))


def _bin_ids(confidences, num_bins, binning, right_closed, weights=None):
  if binning not in BINNINGS:
    raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}.")
  if binning == "equal_mass":
    return equal_mass_bin_ids(confidences, num_bins, weights)
  return equal_width_bin_ids(confidences, num_bins, right_closed)


def expected_calibration_error(
  probs: jax.Array,
  labels: jax.Array,
  num_bins: int = 15,
  norm: str = "l1",
  binning: str = "equal_width",
  classwise: bool = False,
  right_closed: bool = True,
  weights: jax.Array | None = None,
) -> jax.Array:
  """Expected calibration error of probs [..., C] against integer labels [...], each example weighted.

  Leading axes are examples (e.g. [B, T, V] next-token probabilities with [B, T] targets); `weights` [...]
  (>= 0, e.g. a boolean padding mask) weighs them, so padded tokens with weight 0 count nowhere, not even in
  equal-mass ranks. probs must be probabilities (in [0, 1], rows summing to 1), not logits.
  Top-label (default): `ece_from_bin_sums` of the (confidence, correct) pairs of `top_label`, binned by
  `binning` ("equal_width" or "equal_mass", see the module docstring). norm "l1" is ECE (Guo et al. 2017),
  "l2" the root-mean-square error, "max" is MCE.
  Class-wise (`classwise=True`, Kull et al. 2019): for each class k the same error of (probs[..., k],
  [labels == k]) with its own bins, averaged over the C classes.
  """
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  _check_probs_and_labels(probs, labels)
  if weights is not None:
    weights = jnp.asarray(weights)
    _check_weights(weights, labels.shape)
    weights = weights.reshape(-1)
  probs, labels = probs.reshape(-1, probs.shape[-1]), labels.reshape(-1)
  if not classwise:
    confidences, correct = top_label(probs, labels)
    sums = calibration_bin_sums(
      confidences, correct, weights, num_bins, bin_ids=_bin_ids(confidences, num_bins, binning, right_closed, weights)
    )
    return ece_from_bin_sums(sums, norm)

  def one_class(class_probs, class_index):
    sums = calibration_bin_sums(
      class_probs,
      labels == class_index,
      weights,
      num_bins,
      bin_ids=_bin_ids(class_probs, num_bins, binning, right_closed, weights),
    )
    return ece_from_bin_sums(sums, norm)

  return jnp.mean(jax.vmap(one_class)(probs.T, jnp.arange(probs.shape[1])))


def max_calibration_error(probs: jax.Array, labels: jax.Array, num_bins: int = 15, **kwargs) -> jax.Array:
  """MCE: `expected_calibration_error(..., norm="max")`, the largest |accuracy - confidence| of a non-empty bin."""
  return expected_calibration_error(probs, labels, num_bins, norm="max", **kwargs)


def reliability_curve(
  confidences: jax.Array,
  correct: jax.Array,
  num_bins: int = 15,
  binning: str = "equal_width",
  right_closed: bool = True,
  weights: jax.Array | None = None,
) -> dict:
  """Reliability-diagram data, all [num_bins]: mean confidence, accuracy (mean of `correct`) and count per bin.

  confidences and correct are [N] (weights [N] optional, as in `calibration_bin_sums`). Empty bins have
  count 0 and NaN confidence and accuracy. For binary problems, passing (probability of the positive class,
  [label == 1]) reproduces scikit-learn's `calibration_curve(strategy="uniform")` on the non-empty bins.
  """
  confidences = jnp.asarray(confidences)
  sums = calibration_bin_sums(
    confidences, correct, weights, num_bins, bin_ids=_bin_ids(confidences, num_bins, binning, right_closed, weights)
  )
  count = sums["bin_count"]
  safe = jnp.where(count > 0, count, jnp.nan)
  return {
    "bin_confidence": sums["bin_confidence_sum"] / safe,
    "bin_accuracy": sums["bin_correct_sum"] / safe,
    "bin_count": count,
  }


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Multiclass Brier score (Brier 1950) of probs [..., C]: mean over examples of sum_k (p_k - [label == k])^2.

  Ranges over [0, 2]. For two classes it is twice the binary score (p - y)^2 of scikit-learn's
  `brier_score_loss` default; it equals `brier_score_loss(..., scale_by_half=False)` for any C.
  """
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  _check_probs_and_labels(probs, labels)
  one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  return jnp.mean(jnp.sum((probs - one_hot) ** 2, axis=-1))


def negative_log_likelihood(probs: jax.Array, labels: jax.Array, min_prob: float = 0.0) -> jax.Array:
  """Mean over examples of -log(max(probs[..., label], min_prob)) in nats, probs [..., C], labels [...].

  With the default `min_prob=0.0` a zero probability on the label gives +inf (no silent clipping);
  scikit-learn's `log_loss` clips to [eps, 1 - eps] with eps the dtype's machine epsilon.
  """
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  _check_probs_and_labels(probs, labels)
  label_probs = jnp.take_along_axis(probs, labels[..., None], axis=-1)[..., 0]
  return -jnp.mean(jnp.log(jnp.maximum(label_probs, min_prob)))


def risk_coverage_curve(confidences, correct) -> dict:
  """Selective prediction: accept the examples with confidence >= t, for each distinct confidence t.

  Returns float64 NumPy arrays `coverage` (fraction accepted), `risk` (error rate among the accepted) and
  `threshold`, ordered from the highest threshold down (coverage increasing to 1). Tied confidences are
  accepted or rejected together, so the curve has one point per distinct confidence.
  """
  confidences = np.asarray(confidences, np.float64)
  errors = 1.0 - np.asarray(correct, np.float64)
  order = np.argsort(-confidences, kind="stable")
  confidences, errors = confidences[order], errors[order]
  last_of_group = np.append(confidences[1:] != confidences[:-1], True)
  accepted = np.arange(1, len(confidences) + 1)[last_of_group]
  return {
    "coverage": accepted / len(confidences),
    "risk": np.cumsum(errors)[last_of_group] / accepted,
    "threshold": confidences[last_of_group],
  }


def area_under_risk_coverage(confidences, correct) -> float:
  """AURC: sum_j (coverage_j - coverage_{j-1}) * risk_j over the `risk_coverage_curve` points (coverage_0 = 0).

  Without ties this is (1/N) sum_{k=1..N} (error rate of the k most confident), as in Geifman et al. 2019.
  """
  curve = risk_coverage_curve(confidences, correct)
  return float(np.sum(np.diff(curve["coverage"], prepend=0.0) * curve["risk"]))


def confidence_auroc(confidences: jax.Array, correct: jax.Array) -> jax.Array:
  """AUROC of the confidence as a score separating correct (positive) from wrong predictions; ties count 1/2."""
  return metrics.roc_auc(confidences, correct)
