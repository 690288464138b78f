"""Post-hoc calibrators: fit on a held-out split's logits and labels, then map logits to calibrated probabilities.

All fitting is deterministic full-batch optimisation, so the same inputs always give the same parameters:
temperature scaling runs on the device (a jitted pass over row chunks per safeguarded Newton step, so a
[N, V] vocabulary-sized problem never becomes a float64 host array), the others in float64 NumPy on the
host (scipy L-BFGS-B for the linear families, pool-adjacent-violators for isotonic regression).
`__call__` returns float64 NumPy probabilities [N, C].

Inputs are checked: logits must be a finite floating [N, C] array (C >= 2) that does not look like
probabilities (all in [0, 1] with every row summing to 1: pass log-probabilities instead, softmax gives
them back), labels [N] integers in [0, C).

Multiclass isotonic regression and histogram binning are one-vs-rest: each class's softmax probability is
calibrated against [label == k] on its own, then each row is divided by its sum (a row that maps to all
zeros becomes uniform). For two classes the positive class is calibrated and the other is its complement.

Saving: `save(directory, step)` writes `directory/calibrator_<name>_step<step>.json` with `directory` the
run's checkpoint directory (`WORKDIR/checkpoints`), i.e. next to the Orbax step directory `<step>/` it
belongs to but outside it, so Orbax's atomic writes and retention never see it; `load(directory, step, name)`
reads it back. Floats are written with `repr` precision, so a loaded calibrator gives identical outputs.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import scipy.special

from jaxlm.errors import check
from jaxlm.evaluation import calibration

# Default temperature-fitting chunk: rows holding about this many logits (8M float32 = 32 MiB per buffer).
CHUNK_ELEMENTS = 2**23


def _softmax(logits: np.ndarray) -> np.ndarray:
  return scipy.special.softmax(np.asarray(logits, np.float64), axis=-1)


def _validate(logits, labels=None) -> np.ndarray | None:
  """Checks logits [N, C] (NumPy or JAX, reduced where they live: only scalars come to the host) and labels [N].

  Returns the labels as an int64 NumPy array (None without labels).
  """
  xp = jnp if isinstance(logits, jax.Array) else np
  if logits.ndim != 2 or logits.shape[1] < 2:
    raise ValueError(f"logits must be [N, C] (class scores per example, C >= 2), got shape {logits.shape}.")
  if not xp.issubdtype(logits.dtype, xp.floating):
    raise ValueError(f"logits must be floating-point class scores, got dtype {logits.dtype}.")
  if logits.size:
    if not bool(xp.all(xp.isfinite(logits))):
      raise ValueError("logits must be finite; got NaN or infinite values.")
    row_error = xp.max(xp.abs(xp.sum(logits, axis=-1, dtype=xp.float32) - 1))
    if bool((xp.min(logits) >= 0) & (xp.max(logits) <= 1) & (row_error <= 1e-3)):
      raise ValueError(
        "logits look like probabilities (all in [0, 1], every row summing to 1); calibrators take "
        "logits. Pass log-probabilities (e.g. np.log(probs)) or the model's raw scores."
      )
  if labels is None:
    return None
  labels = np.asarray(labels)
  num_classes = logits.shape[1]
  if labels.shape != logits.shape[:1]:
    raise ValueError(
      f"labels must be [N] integers in [0, {num_classes}) for logits {logits.shape}; got shape {labels.shape}."
    )
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"labels must be [N] integers in [0, {num_classes}) (class indices), got dtype {labels.dtype}.")
  if labels.min(initial=0) < 0 or labels.max(initial=0) >= num_classes:
    raise ValueError(
      f"labels must be [N] integers in [0, {num_classes}) for logits {logits.shape}; got values in "
      f"[{labels.min()}, {labels.max()}]."
    )
  return labels.astype(np.int64)


def _check(logits, labels=None) -> tuple[np.ndarray, np.ndarray | None]:
  """Validated float64 NumPy logits [N, C] and int64 labels [N] (or None) for the host calibrators."""
  logits = logits if isinstance(logits, jax.Array) else np.asarray(logits)
  labels = _validate(logits, labels)
  return np.asarray(logits, np.float64), labels


class Calibrator:
  """Base class: `fit(logits, labels) -> self`, `__call__(logits) -> probs`, `save`/`load` of `self.params`."""

  name = ""

  def __init__(self, **config):
    self.config = config
    self.params: dict[str, np.ndarray] | None = None

  def fit(self, logits, labels) -> "Calibrator":
    logits, labels = _check(logits, labels)
    self.params = {key: np.asarray(value, np.float64) for key, value in self._fit(logits, labels).items()}
    return self

  def __call__(self, logits) -> np.ndarray:
    if self.params is None:
      raise ValueError(f"{type(self).__name__} is not fitted: call fit(logits, labels) on a held-out split first.")
    return self._apply(_check(logits)[0])

  def save(self, directory: str, step: int) -> str:
    """Writes `directory/calibrator_<name>_step<step>.json` (see the module docstring) and returns its path."""
    if self.params is None:
      raise ValueError(f"{type(self).__name__} is not fitted: nothing to save.")
    path = calibrator_path(directory, step, self.name)
    os.makedirs(directory, exist_ok=True)
    record = {
      "name": self.name,
      "step": int(step),
      "config": self.config,
      "params": {
        key: {"shape": list(value.shape), "values": value.ravel().tolist()} for key, value in self.params.items()
      },
    }
    with open(path + ".tmp", "w") as f:
      json.dump(record, f)
    os.replace(path + ".tmp", path)
    return path


def calibrator_path(directory: str, step: int, name: str) -> str:
  return os.path.join(directory, f"calibrator_{name}_step{int(step)}.json")


def load(directory: str, step: int, name: str) -> Calibrator:
  """The calibrator `name` saved by `Calibrator.save(directory, step)`."""
  path = calibrator_path(directory, step, name)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"No calibrator {name!r} for step {step}: {path} does not exist. Fit one and call "
      f"save({directory!r}, {step}) first."
    )
  with open(path) as f:
    record = json.load(f)
  calibrator = CALIBRATORS[record["name"]](**record["config"])
  calibrator.params = {
    key: np.asarray(value["values"], np.float64).reshape(value["shape"]) for key, value in record["params"].items()
  }
  return calibrator


@functools.partial(jax.jit, static_argnames="chunk_size")
def _temperature_chunk_sums(logits: jax.Array, labels: jax.Array, beta: jax.Array, chunk_size: int) -> jax.Array:
  """[num_chunks, 2] float32: per row chunk, the sums of d/dbeta and d2/dbeta2 of the NLL at inverse temperature beta.

  For a row with logits z [C] and label y, NLL(beta) = logsumexp(beta z) - beta z_y, whose derivatives are
  E_p[z] - z_y and Var_p[z] with p = softmax(beta z) (the variance as E_p[(z - E_p z)^2], no cancellation).
  Rows are taken `chunk_size` at a time (`lax.map`, sequential), so beyond the logits memory is
  O(chunk_size * C); the last chunk is shifted back to end at row N and its rows already counted are masked.
  Each chunk is summed in float32; the host adds the chunks in float64.
  """
  n = logits.shape[0]

  def chunk_sums(index):
    start = jnp.minimum(index * chunk_size, n - chunk_size)
    z = jax.lax.dynamic_slice_in_dim(logits, start, chunk_size).astype(jnp.float32)  # [chunk, C]
    y = jax.lax.dynamic_slice_in_dim(labels, start, chunk_size)  # [chunk]
    new = start + jnp.arange(chunk_size) >= index * chunk_size  # [chunk]
    p = jax.nn.softmax(beta * z, axis=-1)
    mean = jnp.sum(p * z, axis=-1)
    variance = jnp.sum(p * (z - mean[:, None]) ** 2, axis=-1)
    gradient = mean - jnp.take_along_axis(z, y[:, None], axis=-1)[:, 0]
    return jnp.stack([jnp.sum(jnp.where(new, gradient, 0.0)), jnp.sum(jnp.where(new, variance, 0.0))])

  return jax.lax.map(chunk_sums, jnp.arange(-(-n // chunk_size)))


class TemperatureScaling(Calibrator):
  """softmax(logits / T) with T > 0 minimising the mean NLL on the fit split (Guo et al. 2017).

  The NLL is convex in the inverse temperature beta = 1/T (its second derivative is the mean variance of the
  logits under softmax(beta * logits)), so a Newton iteration safeguarded by bisection on
  [1/max_temperature, 1/min_temperature] finds the unique minimiser; the bound is returned when the
  minimiser lies beyond it (e.g. separable data). The argmax never changes.
  Fitting runs on the default device: each Newton step is one jitted pass of `_temperature_chunk_sums` over
  `chunk_size` rows at a time (default: about `CHUNK_ELEMENTS` logits per chunk), in float32 with the chunk
  sums added in float64 on the host; logits stay in their dtype (e.g. bfloat16 [N, V] next-token logits).
  It stops when a step changes beta by at most 1e-7 relative (float32 resolution), so T agrees with a
  float64 fit to about 1e-6 relative.
  """

  name = "temperature"

  def __init__(self, min_temperature: float = 1e-3, max_temperature: float = 1e3, chunk_size: int | None = None):
    super().__init__(min_temperature=min_temperature, max_temperature=max_temperature, chunk_size=chunk_size)

  def fit(self, logits, labels) -> "TemperatureScaling":
    logits = logits if isinstance(logits, jax.Array) else np.asarray(logits)  # no float64 host copy
    labels = _validate(logits, labels)
    self.params = {
      "temperature": np.asarray(self._fit_on_device(jnp.asarray(logits), jnp.asarray(labels, jnp.int32)), np.float64)
    }
    return self

  def _fit_on_device(self, logits: jax.Array, labels: jax.Array) -> float:
    n, num_classes = logits.shape
    chunk_size = min(n, self.config["chunk_size"] or max(1, CHUNK_ELEMENTS // num_classes))
    low, high = 1.0 / self.config["max_temperature"], 1.0 / self.config["min_temperature"]
    beta = min(max(1.0, low), high)
    for _ in range(100):
      chunks = np.asarray(_temperature_chunk_sums(logits, labels, np.float32(beta), chunk_size), np.float64)
      gradient, curvature = chunks.sum(axis=0) / n
      if gradient > 0:
        high = beta
      else:
        low = beta
      step = beta - gradient / curvature if curvature > 0 else np.inf
      new_beta = step if low < step < high else 0.5 * (low + high)
      converged = abs(new_beta - beta) <= 1e-7 * beta or high - low <= 1e-7 * high
      beta = new_beta
      if converged:
        break
    return 1.0 / beta

  def _apply(self, logits):
    return _softmax(logits / self.params["temperature"])


def _fit_linear(features, labels, kind, regularizer):
  """L-BFGS-B minimiser of mean NLL(softmax(features * w + b) or features @ W + b) + regularizer (float64).

  Starts from the identity (w = 1 or W = I, b = 0), so it is deterministic.
  """
  n, c = features.shape
  one_hot = np.eye(c)[labels]
  if kind == "vector":
    initial = np.concatenate([np.ones(c), np.zeros(c)])
  else:
    initial = np.concatenate([np.eye(c).ravel(), np.zeros(c)])

  def unpack(theta):
    return theta[:-c].reshape((c,) if kind == "vector" else (c, c)), theta[-c:]

  def objective(theta):
    weight, bias = unpack(theta)
    scores = (features * weight if kind == "vector" else features @ weight) + bias
    log_probs = scores - scipy.special.logsumexp(scores, axis=-1, keepdims=True)
    grad_scores = (np.exp(log_probs) - one_hot) / n
    grad_weight = np.sum(features * grad_scores, axis=0) if kind == "vector" else features.T @ grad_scores
    penalty, grad_penalty_weight, grad_penalty_bias = regularizer(weight, bias)
    loss = -np.sum(one_hot * log_probs) / n + penalty
    return loss, np.concatenate([(grad_weight + grad_penalty_weight).ravel(), grad_scores.sum(0) + grad_penalty_bias])

  result = _lbfgs(objective, initial, maxiter=2000, gtol=1e-10)
  weight, bias = unpack(result.x)
  return {"weight": weight, "bias": bias}


def _lbfgs(objective, initial, maxiter: int, gtol: float):
  """scipy's L-BFGS-B minimum of `objective(theta) -> (loss, gradient)` from `initial`. scipy.optimize is imported
  here, when a calibrator is fitted, not with this module: every jaxlm process imports this module (the config
  checks), and scipy.optimize is a sixth of a second of its start."""
  import scipy.optimize

  return scipy.optimize.minimize(
    objective, initial, jac=True, method="L-BFGS-B", options=dict(maxiter=maxiter, gtol=gtol, ftol=1e-15)
  )


def _no_regularizer(weight, bias):
  return 0.0, np.zeros_like(weight), np.zeros_like(bias)


class VectorScaling(Calibrator):
  """softmax(logits * w + b) with per-class w, b in R^C minimising the mean NLL (Guo et al. 2017)."""

  name = "vector"

  def _fit(self, logits, labels):
    return _fit_linear(logits, labels, "vector", _no_regularizer)

  def _apply(self, logits):
    return _softmax(logits * self.params["weight"] + self.params["bias"])


class MatrixScaling(Calibrator):
  """softmax(logits @ W + b), W [C, C], b [C], minimising mean NLL + l2 * sum(W - I)^2 (Guo et al. 2017)."""

  name = "matrix"

  def __init__(self, l2: float = 0.0):
    super().__init__(l2=l2)

  def _regularizer(self, weight, bias):
    delta = weight - np.eye(len(bias))
    return self.config["l2"] * np.sum(delta**2), 2 * self.config["l2"] * delta, np.zeros_like(bias)

  def _fit(self, logits, labels):
    return _fit_linear(logits, labels, "matrix", self._regularizer)

  def _apply(self, logits):
    return _softmax(logits @ self.params["weight"] + self.params["bias"])


class DirichletCalibration(Calibrator):
  """softmax(log(softmax(logits)) @ W + b) (Kull et al. 2019) minimising mean NLL + ODIR regularisation:

  off_diagonal_l2 * sum_{i != j} W_ij^2 / (C (C - 1)) + bias_l2 * sum_j b_j^2 / C. Log-probabilities are
  those of the logits' softmax (never -inf), so the map is defined for every input.
  """

  name = "dirichlet"

  def __init__(self, off_diagonal_l2: float = 0.0, bias_l2: float = 0.0):
    super().__init__(off_diagonal_l2=off_diagonal_l2, bias_l2=bias_l2)

  def _regularizer(self, weight, bias):
    c = len(bias)
    off_diagonal = weight * (1 - np.eye(c))
    scale = self.config["off_diagonal_l2"] / max(c * (c - 1), 1)
    bias_scale = self.config["bias_l2"] / c
    return (
      scale * np.sum(off_diagonal**2) + bias_scale * np.sum(bias**2),
      2 * scale * off_diagonal,
      2 * bias_scale * bias,
    )

  def _fit(self, logits, labels):
    return _fit_linear(scipy.special.log_softmax(logits, axis=-1), labels, "matrix", self._regularizer)

  def _apply(self, logits):
    return _softmax(scipy.special.log_softmax(logits, axis=-1) @ self.params["weight"] + self.params["bias"])


class PlattScaling(Calibrator):
  """Binary: P(class 1) = sigmoid(a * s + b), s = logits[:, 1] - logits[:, 0], (a, b) the maximum-likelihood
  logistic regression on the fit split (Platt 1999, with the hard 0/1 targets, no prior smoothing).
  """

  name = "platt"

  def _fit(self, logits, labels):
    if logits.shape[1] != 2:
      raise ValueError(
        f"PlattScaling is binary: logits must be [N, 2], got {logits.shape}. Use TemperatureScaling, "
        "VectorScaling or DirichletCalibration for more classes."
      )
    margin = logits[:, 1] - logits[:, 0]

    def objective(theta):
      scores = theta[0] * margin + theta[1]
      loss = np.mean(np.logaddexp(0.0, scores) - labels * scores)
      residual = (scipy.special.expit(scores) - labels) / len(labels)
      return loss, np.array([np.sum(residual * margin), np.sum(residual)])

    result = _lbfgs(objective, np.array([1.0, 0.0]), maxiter=1000, gtol=1e-12)
    return {"slope": result.x[0], "intercept": result.x[1]}

  def _apply(self, logits):
    positive = scipy.special.expit(self.params["slope"] * (logits[:, 1] - logits[:, 0]) + self.params["intercept"])
    return np.stack([1 - positive, positive], axis=-1)


def isotonic_fit(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Non-decreasing least-squares fit of y on x by pool-adjacent-violators.

  Returns (distinct x ascending, fitted value at each); tied x are first pooled to their mean y, weighted
  by their count, as scikit-learn's `IsotonicRegression`. Predict with `np.interp` (linear between the
  points, constant beyond the ends).
  """
  xs, inverse, counts = np.unique(np.asarray(x, np.float64), return_inverse=True, return_counts=True)
  means = np.bincount(inverse, weights=np.asarray(y, np.float64)) / counts
  values, weights, sizes = [], [], []
  for mean, count in zip(means, counts):
    values.append(mean)
    weights.append(float(count))
    sizes.append(1)
    while len(values) > 1 and values[-2] > values[-1]:  # pool the violating pair
      weight = weights[-2] + weights[-1]
      value = (values[-2] * weights[-2] + values[-1] * weights[-1]) / weight
      size = sizes[-2] + sizes[-1]
      del values[-1], weights[-1], sizes[-1]
      values[-1], weights[-1], sizes[-1] = value, weight, size
  return xs, np.repeat(values, sizes)


def _one_vs_rest(probs, labels, fit_class):
  """Per-class fits of probs[:, k] against [labels == k]; only the positive class for two classes."""
  classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
  return [fit_class(probs[:, k], (labels == k).astype(np.float64)) for k in classes]


def _combine(columns, num_classes):
  """Calibrated one-vs-rest columns -> rows of probabilities (complement for two classes, else renormalised)."""
  if num_classes == 2:
    return np.stack([1 - columns[0], columns[0]], axis=-1)
  probs = np.stack(columns, axis=-1)
  total = probs.sum(-1, keepdims=True)
  return np.where(total > 0, probs / np.where(total > 0, total, 1.0), 1.0 / num_classes)


class IsotonicCalibration(Calibrator):
  """One-vs-rest isotonic regression of softmax probabilities (Zadrozny & Elkan 2002), see the module docstring."""

  name = "isotonic"

  def _fit(self, logits, labels):
    fits = _one_vs_rest(_softmax(logits), labels, isotonic_fit)
    # Classes have different numbers of distinct points: pad to one [K, M] array with the last point repeated.
    length = max(len(x) for x, _ in fits)
    pad = lambda a: np.concatenate([a, np.full(length - len(a), a[-1])])
    return {"x": np.stack([pad(x) for x, _ in fits]), "y": np.stack([pad(y) for _, y in fits])}

  def _apply(self, logits):
    probs = _softmax(logits)
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    columns = [np.interp(probs[:, k], x, y) for k, x, y in zip(classes, self.params["x"], self.params["y"])]
    return _combine(columns, probs.shape[1])


class HistogramBinning(Calibrator):
  """One-vs-rest histogram binning (Zadrozny & Elkan 2001): each softmax probability is replaced by the
  fraction of positives among fit examples in its equal-width bin (the bins of
  `calibration.equal_width_bin_ids`, right-closed by default); an empty bin maps to its midpoint.
  """

  name = "histogram"

  def __init__(self, num_bins: int = 15, right_closed: bool = True):
    super().__init__(num_bins=num_bins, right_closed=right_closed)

  def _bins(self, p):
    """The ECE binning, in float64: `(lo, hi]` counts the interior edges strictly below p, `[lo, hi)` those <= p,
    with the correctly rounded edges of `calibration.interior_edges` (float64 linspace has 3/10 > 0.3)."""
    interior = calibration.interior_edges(self.config["num_bins"], np.float64)
    return np.searchsorted(interior, p, side="left" if self.config["right_closed"] else "right")

  def _fit(self, logits, labels):
    num_bins = self.config["num_bins"]
    midpoints = (np.arange(num_bins) + 0.5) / num_bins

    def fit_class(p, positive):
      ids = self._bins(p)
      counts = np.bincount(ids, minlength=num_bins)
      hits = np.bincount(ids, weights=positive, minlength=num_bins)
      return np.where(counts > 0, hits / np.maximum(counts, 1), midpoints)

    return {"bin_values": np.stack(_one_vs_rest(_softmax(logits), labels, fit_class))}

  def _apply(self, logits):
    probs = _softmax(logits)
    classes = [1] if probs.shape[1] == 2 else range(probs.shape[1])
    columns = [values[self._bins(probs[:, k])] for k, values in zip(classes, self.params["bin_values"])]
    return _combine(columns, probs.shape[1])


CALIBRATORS = {
  cls.name: cls
  for cls in (
    TemperatureScaling,
    VectorScaling,
    MatrixScaling,
    DirichletCalibration,
    PlattScaling,
    IsotonicCalibration,
    HistogramBinning,
  )
}


def check_config(calibration_config) -> None:
  """Validates the `calibration` config section (ConfigError naming the key)."""
  unknown = sorted(set(calibration_config.calibrators) - set(CALIBRATORS))
  check(not unknown, "calibration.calibrators", f"unknown {unknown}; use some of {sorted(CALIBRATORS)} or () for all.")
  check(
    calibration_config.num_bins > 0, "calibration.num_bins", f"must be positive, got {calibration_config.num_bins}."
  )
  check(calibration_config.num_resamples > 0, "calibration.num_resamples", "must be positive.")
  check(0 < calibration_config.confidence < 1, "calibration.confidence", "must be in (0, 1), e.g. 0.95.")


def applicable(names, num_classes: int) -> list[str]:
  """The calibrator names to fit: `names`, or () = every calibrator for `num_classes` classes (Platt: 2 only)."""
  if names:
    if "platt" in names and num_classes != 2:
      raise ValueError(f"calibration.calibrators: 'platt' is binary and this classifier has {num_classes} classes.")
    return list(names)
  return [name for name in CALIBRATORS if name != "platt" or num_classes == 2]
