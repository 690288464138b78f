"""Calibration metrics: ECE / MCE (equal-width or equal-mass bins, top-label or class-wise), Brier, NLL,
reliability curves and selective prediction.

Reference implementations disagree on binning details, so every choice is an argument with a
documented default. Binning is fixed-shape (sums over a one-hot bin axis), so everything except the
selective-prediction curve runs under `jit`. The in-step path is `calibration_bin_sums` (sums, so they
add over batches and devices) followed by `ece_from_bin_sums`; `expected_calibration_error` is exactly
that composition, so the number tracked during training equals the offline one.

Conventions (defaults):
- Equal-width bins: edges `linspace(0, 1, num_bins + 1)` computed in the confidences' JAX dtype (float32
  unless `jax_enable_x64`), 15 bins. Other papers' settings: HELM reports 10 equal-mass bins,
  scikit-learn's `calibration_curve` defaults to 5 equal-width bins.
  `right_closed=True`: bin i is `(e_i, e_{i+1}]` as in Guo et al. 2017 and scikit-learn's
  `calibration_curve`; a confidence of exactly 0.0 goes to the first bin. `right_closed=False`: bin i is
  `[e_i, e_{i+1})` (torchmetrics); a confidence of exactly 1.0 goes to the last bin.
- Equal-mass bins: examples sorted by confidence (ties broken by example index, i.e. a stable sort); the
  example of 0-based rank r goes to bin `floor(r * num_bins / N)`, so bins hold floor or ceil of N/num_bins
  examples and tied confidences may straddle two bins.
- Empty bins contribute nothing (weight 0 to L1/L2, excluded from the max).
- Top-label: confidence = max_k p_k, prediction = argmax_k p_k (ties to the lowest class index),
  correct = [prediction == label].
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.evaluation import metrics

NORMS = ("l1", "l2", "max")
BINNINGS = ("equal_width", "equal_mass")


def top_label(probs: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(confidence, correct) of the top label: `max_k probs[:, k]` and `argmax_k probs[:, k] == labels` (float)."""
  probs = jnp.asarray(probs)
  correct = (jnp.argmax(probs, axis=-1) == jnp.asarray(labels)).astype(probs.dtype)
  return jnp.max(probs, axis=-1), correct


def equal_width_bin_ids(confidences: jax.Array, num_bins: int = 15, right_closed: bool = True) -> jax.Array:
  """Bin index in [0, num_bins) of each confidence for equal-width bins on [0, 1] (see the module docstring).

  Right-closed: the number of interior edges strictly below c; left-closed: the number at or below c.
  Values outside [0, 1] land in the first or last bin.
  """
  confidences = jnp.asarray(confidences)
  interior = jnp.linspace(0.0, 1.0, num_bins + 1, dtype=confidences.dtype)[1:-1]
  above = confidences[..., None] > interior if right_closed else confidences[..., None] >= interior
  return jnp.sum(above, axis=-1, dtype=jnp.int32)


def equal_mass_bin_ids(confidences: jax.Array, num_bins: int = 15) -> jax.Array:
  """Bin index of each of the N confidences for equal-mass bins: rank r (stable sort) -> floor(r * num_bins / N)."""
  confidences = jnp.asarray(confidences)
  n = confidences.shape[0]
  order = jnp.argsort(confidences, stable=True)
  ranks = jnp.zeros(n, jnp.int32).at[order].set(jnp.arange(n, dtype=jnp.int32))
  # floor(r * B / N) >= k  <=>  r >= ceil(k * N / B); N is static, so the thresholds are exact Python ints.
  starts = np.array([-(-k * n // num_bins) for k in range(1, num_bins)], np.int32)
  return jnp.sum(ranks[:, None] >= starts, axis=-1, dtype=jnp.int32)


def calibration_bin_sums(confidences: jax.Array, correct: jax.Array, weights: jax.Array | None = None,
                         num_bins: int = 15, right_closed: bool = True, bin_ids: jax.Array | None = None) -> dict:
  """Per-bin sums of weight, weight * confidence and weight * correct (all [num_bins], float32 or wider).

  Inputs may have any shape (e.g. [B, T] tokens); all axes are summed, so under `jit` with a sharded
  batch XLA reduces across devices. `bin_ids` overrides the equal-width binning (e.g. equal-mass ids).
  """
  confidences = jnp.asarray(confidences)
  dtype = jnp.promote_types(confidences.dtype, jnp.float32)
  weights = jnp.ones(confidences.shape, dtype) if weights is None else jnp.asarray(weights, dtype)
  if bin_ids is None:
    bin_ids = equal_width_bin_ids(confidences, num_bins, right_closed)
  one_hot = jax.nn.one_hot(bin_ids, num_bins, dtype=dtype) * weights[..., None]
  axes = tuple(range(confidences.ndim))
  return {
      "bin_count": jnp.sum(one_hot, axis=axes),
      "bin_confidence_sum": jnp.tensordot(confidences.astype(dtype), one_hot, axes=(axes, axes)),
      "bin_correct_sum": jnp.tensordot(jnp.asarray(correct, dtype), one_hot, axes=(axes, axes)),
  }


def ece_from_bin_sums(bin_sums: dict, norm: str = "l1") -> jax.Array:
  """Calibration error from `calibration_bin_sums` output (works on NumPy or JAX arrays).

  With n_b the weight in bin b, N = sum_b n_b, gap_b = |correct_sum_b - confidence_sum_b| / n_b:
  l1 (ECE) = sum_b n_b / N * gap_b; l2 = sqrt(sum_b n_b / N * gap_b^2); max (MCE) = max over non-empty
  bins of gap_b. Empty bins contribute nothing; with no weight at all the result is 0.
  """
  if norm not in NORMS:
    raise ValueError(f"norm must be one of {NORMS}, got {norm!r}.")
  count = jnp.asarray(bin_sums["bin_count"])
  nonempty = count > 0
  safe = jnp.where(nonempty, count, 1.0)
  gap = jnp.where(nonempty, jnp.abs(jnp.asarray(bin_sums["bin_correct_sum"]) - bin_sums["bin_confidence_sum"]) / safe,
                  0.0)
  if norm == "max":
    return jnp.max(gap)
  fraction = count / jnp.maximum(jnp.sum(count), jnp.finfo(count.dtype).tiny)
  return jnp.sum(fraction * gap) if norm == "l1" else jnp.sqrt(jnp.sum(fraction * gap ** 2))


def _bin_ids(confidences, num_bins, binning, right_closed):
  if binning not in BINNINGS:
    raise ValueError(f"binning must be one of {BINNINGS}, got {binning!r}.")
  if binning == "equal_mass":
    return equal_mass_bin_ids(confidences, num_bins)
  return equal_width_bin_ids(confidences, num_bins, right_closed)


def expected_calibration_error(probs: jax.Array, labels: jax.Array, num_bins: int = 15, norm: str = "l1",
                               binning: str = "equal_width", classwise: bool = False,
                               right_closed: bool = True) -> jax.Array:
  """Expected calibration error of probs [N, C] against integer labels [N].

  Top-label (default): `ece_from_bin_sums` of the (confidence, correct) pairs of `top_label`, binned by
  `binning` ("equal_width" or "equal_mass", see the module docstring). norm "l1" is ECE (Guo et al. 2017),
  "l2" the root-mean-square error, "max" is MCE.
  Class-wise (`classwise=True`, Kull et al. 2019): for each class k the same error of (probs[:, k],
  [labels == k]) with its own bins, averaged over the C classes.
  """
  probs = jnp.asarray(probs)
  labels = jnp.asarray(labels)
  if probs.ndim != 2 or labels.shape != probs.shape[:1]:
    raise ValueError(f"probs must be [N, C] and labels [N]; got {probs.shape} and {labels.shape}.")
  if not classwise:
    confidences, correct = top_label(probs, labels)
    sums = calibration_bin_sums(confidences, correct, None, num_bins,
                                bin_ids=_bin_ids(confidences, num_bins, binning, right_closed))
    return ece_from_bin_sums(sums, norm)

  def one_class(class_probs, class_index):
    sums = calibration_bin_sums(class_probs, labels == class_index, None, num_bins,
                                bin_ids=_bin_ids(class_probs, num_bins, binning, right_closed))
    return ece_from_bin_sums(sums, norm)

  return jnp.mean(jax.vmap(one_class)(probs.T, jnp.arange(probs.shape[1])))


def max_calibration_error(probs: jax.Array, labels: jax.Array, num_bins: int = 15, **kwargs) -> jax.Array:
  """MCE: `expected_calibration_error(..., norm="max")`, the largest |accuracy - confidence| of a non-empty bin."""
  return expected_calibration_error(probs, labels, num_bins, norm="max", **kwargs)


def reliability_curve(confidences: jax.Array, correct: jax.Array, num_bins: int = 15,
                      binning: str = "equal_width", right_closed: bool = True) -> dict:
  """Reliability-diagram data, all [num_bins]: mean confidence, accuracy (mean of `correct`) and count per bin.

  Empty bins have count 0 and NaN confidence and accuracy. For binary problems, passing (probability of the
  positive class, [label == 1]) reproduces scikit-learn's `calibration_curve(strategy="uniform")` on the
  non-empty bins.
  """
  confidences = jnp.asarray(confidences)
  sums = calibration_bin_sums(confidences, correct, None, num_bins,
                              bin_ids=_bin_ids(confidences, num_bins, binning, right_closed))
  count = sums["bin_count"]
  safe = jnp.where(count > 0, count, jnp.nan)
  return {"bin_confidence": sums["bin_confidence_sum"] / safe, "bin_accuracy": sums["bin_correct_sum"] / safe,
          "bin_count": count}


def brier_score(probs: jax.Array, labels: jax.Array) -> jax.Array:
  """Multiclass Brier score (Brier 1950): mean over examples of sum_k (probs[i, k] - [labels[i] == k])^2.

  Ranges over [0, 2]. For two classes it is twice the binary score (p - y)^2 of scikit-learn's
  `brier_score_loss` default; it equals `brier_score_loss(..., scale_by_half=False)` for any C.
  """
  probs = jnp.asarray(probs)
  one_hot = jax.nn.one_hot(labels, probs.shape[-1], dtype=probs.dtype)
  return jnp.mean(jnp.sum((probs - one_hot) ** 2, axis=-1))


def negative_log_likelihood(probs: jax.Array, labels: jax.Array, min_prob: float = 0.0) -> jax.Array:
  """Mean over examples of -log(max(probs[i, labels[i]], min_prob)) in nats.

  With the default `min_prob=0.0` a zero probability on the label gives +inf (no silent clipping);
  scikit-learn's `log_loss` clips to [eps, 1 - eps] with eps the dtype's machine epsilon.
  """
  probs = jnp.asarray(probs)
  label_probs = jnp.take_along_axis(probs, jnp.asarray(labels)[:, None], axis=-1)[:, 0]
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
  return {"coverage": accepted / len(confidences), "risk": np.cumsum(errors)[last_of_group] / accepted,
          "threshold": confidences[last_of_group]}


def area_under_risk_coverage(confidences, correct) -> float:
  """AURC: sum_j (coverage_j - coverage_{j-1}) * risk_j over the `risk_coverage_curve` points (coverage_0 = 0).

  Without ties this is (1/N) sum_{k=1..N} (error rate of the k most confident), as in Geifman et al. 2019.
  """
  curve = risk_coverage_curve(confidences, correct)
  return float(np.sum(np.diff(curve["coverage"], prepend=0.0) * curve["risk"]))


def confidence_auroc(confidences: jax.Array, correct: jax.Array) -> jax.Array:
  """AUROC of the confidence as a score separating correct (positive) from wrong predictions; ties count 1/2."""
  return metrics.roc_auc(confidences, correct)
