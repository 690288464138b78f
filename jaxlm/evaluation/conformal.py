"""Split conformal prediction sets for classifiers (LAC and APS scores).

Fit on a calibration split of n examples: the conformal threshold is the ceil((n + 1)(1 - alpha))-th
smallest of their non-conformity scores s(x_i, y_i) (+inf when that rank exceeds n). The prediction set
of a new x is {k : s(x, k) <= threshold}, so on exchangeable data P(y in set) >= 1 - alpha
(Vovk et al. 2005; Angelopoulos & Bates 2021), and < 1 - alpha + 1 / (n + 1) when scores have no ties.

Scores (probs [N, C], e.g. calibrated softmax probabilities):
- "lac" (least ambiguous set-valued classifier, Sadinle et al. 2019): s(x, k) = 1 - p_k.
- "aps" (adaptive prediction sets, Romano et al. 2020): classes sorted by probability, highest first
  (ties to the lower class index); s(x, k) = total probability of the classes ranked before k, plus p_k,
  or plus u * p_k with u ~ U(0, 1) per example when randomized (smaller sets, exact coverage in expectation).
"""

import math

import jax
import jax.numpy as jnp
import numpy as np

SCORES = ("lac", "aps")


def class_scores(probs: jax.Array, score: str = "lac", rng: jax.Array | None = None) -> jax.Array:
  """Non-conformity score s(x, k) of every class, [N, C] (see the module docstring).

  `rng` (a JAX key) selects the randomized APS score; it must be None for LAC.
  """
  probs = jnp.asarray(probs)
  if score not in SCORES:
    raise ValueError(f"score must be one of {SCORES}, got {score!r}.")
  if score == "lac":
    if rng is not None:
      raise ValueError("The LAC score is not randomized: pass rng=None.")
    return 1.0 - probs
  order = jnp.argsort(-probs, axis=-1, stable=True)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  own = sorted_probs if rng is None else jax.random.uniform(rng, probs.shape[:1] + (1,), probs.dtype) * sorted_probs
  sorted_scores = mass_before + own
  return jnp.zeros_like(probs).at[jnp.arange(probs.shape[0])[:, None], order].set(sorted_scores)


def conformal_threshold(
  probs: jax.Array, labels: jax.Array, alpha: float, score: str = "lac", rng: jax.Array | None = None
) -> float:
  """The ceil((n + 1)(1 - alpha))-th smallest calibration score s(x_i, y_i); +inf when that exceeds n."""
  if not 0 < alpha < 1:
    raise ValueError(f"alpha is the allowed miscoverage, in (0, 1); got {alpha}.")
  scores = class_scores(probs, score, rng)
  label_scores = np.sort(np.asarray(jnp.take_along_axis(scores, jnp.asarray(labels)[:, None], axis=-1)[:, 0]))
  rank = math.ceil((len(label_scores) + 1) * (1 - alpha))
  return float(label_scores[rank - 1]) if rank <= len(label_scores) else math.inf


def prediction_sets(probs: jax.Array, threshold: float, score: str = "lac", rng: jax.Array | None = None) -> jax.Array:
  """Boolean [N, C] membership: class k is in the set of example i iff s(x_i, k) <= threshold."""
  return class_scores(probs, score, rng) <= threshold


def set_statistics(sets: jax.Array, labels: jax.Array) -> dict:
  """{"coverage": fraction of examples whose label is in their set, "mean_size", "empty_fraction"}."""
  sets = jnp.asarray(sets)
  covered = jnp.take_along_axis(sets, jnp.asarray(labels)[:, None], axis=-1)[:, 0]
  sizes = jnp.sum(sets, axis=-1)
  return {
    "coverage": float(jnp.mean(covered)),
    "mean_size": float(jnp.mean(sizes)),
    "empty_fraction": float(jnp.mean(sizes == 0)),
  }


def split_conformal(
  calibration_probs, calibration_labels, test_probs, test_labels, alpha: float, score: str = "lac"
) -> dict:
  """The threshold at miscoverage `alpha` from a calibration set, applied to a test set:
  {"alpha", "threshold", and the test sets' `set_statistics`: "coverage" (>= 1 - alpha on exchangeable data),
  "mean_size", "empty_fraction"}."""
  threshold = conformal_threshold(calibration_probs, calibration_labels, alpha, score)
  sets = prediction_sets(test_probs, threshold, score)
  return {"alpha": alpha, "threshold": threshold, **set_statistics(sets, test_labels)}
