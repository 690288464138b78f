"""Sound comparisons: bootstrap confidence intervals, paired tests between two systems, per-example score dumps.

A metric here is any function of per-example arrays (the same N rows each) returning a number, e.g.
`lambda probs, labels: calibration.expected_calibration_error(probs, labels)`. Resampling draws rows with
replacement from a NumPy generator seeded by `seed`, so results are reproducible. Intervals are percentile
bootstrap intervals (Efron & Tibshirani 1993): the (1 - confidence) / 2 and (1 + confidence) / 2 quantiles
(linear interpolation) of the metric over resamples.
"""

import json
from typing import Callable, Sequence

import numpy as np


def _rows(arrays: Sequence) -> int:
  lengths = {len(array) for array in arrays}
  if len(lengths) != 1:
    raise ValueError(f"All per-example arrays must have the same number of rows, got lengths {sorted(lengths)}.")
  return lengths.pop()


def bootstrap_ci(
  metric: Callable, arrays: Sequence, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict:
  """{"value": metric(*arrays), "low", "high"}: the percentile bootstrap interval over example resamples."""
  arrays = [np.asarray(array) for array in arrays]
  n = _rows(arrays)
  rng = np.random.default_rng(seed)
  samples = []
  for _ in range(num_resamples):
    index = rng.integers(0, n, size=n)
    samples.append(float(metric(*[array[index] for array in arrays])))
  low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
  return {"value": float(metric(*arrays)), "low": float(low), "high": float(high)}


def paired_comparison(
  metric: Callable,
  arrays_a: Sequence,
  arrays_b: Sequence,
  num_resamples: int = 1000,
  confidence: float = 0.95,
  seed: int = 0,
) -> dict:
  """Difference metric(A) - metric(B) of two systems scored on the same examples (row i is the same example).

  Returns {"difference", "low", "high"}: the paired percentile bootstrap interval of the difference (the same
  row resample for A and B), and "p_value": a two-sided paired permutation test of "A and B are exchangeable
  on every example": each resample swaps A's and B's rows of a random subset of examples, and
  p = (1 + #{|d*| >= |d|}) / (1 + num_resamples), which is a valid p-value for any metric.
  """
  arrays_a = [np.asarray(array) for array in arrays_a]
  arrays_b = [np.asarray(array) for array in arrays_b]
  n = _rows(arrays_a + arrays_b)
  if len(arrays_a) != len(arrays_b) or any(a.shape != b.shape for a, b in zip(arrays_a, arrays_b)):
    raise ValueError(
      "arrays_a and arrays_b must be the same arrays (shapes) for the two systems, "
      "e.g. (probs_a, labels) and (probs_b, labels)."
    )
  difference = float(metric(*arrays_a)) - float(metric(*arrays_b))
  rng = np.random.default_rng(seed)
  resampled, as_extreme = [], 0
  for _ in range(num_resamples):
    index = rng.integers(0, n, size=n)
    resampled.append(float(metric(*[a[index] for a in arrays_a])) - float(metric(*[b[index] for b in arrays_b])))
    swap = rng.uniform(size=n) < 0.5
    swapped_a = [np.where(swap.reshape(-1, *[1] * (a.ndim - 1)), b, a) for a, b in zip(arrays_a, arrays_b)]
    swapped_b = [np.where(swap.reshape(-1, *[1] * (a.ndim - 1)), a, b) for a, b in zip(arrays_a, arrays_b)]
    permuted = float(metric(*swapped_a)) - float(metric(*swapped_b))
    as_extreme += abs(permuted) >= abs(difference) - 1e-12 * max(1.0, abs(difference))
  low, high = np.quantile(resampled, [(1 - confidence) / 2, (1 + confidence) / 2])
  return {
    "difference": difference,
    "low": float(low),
    "high": float(high),
    "p_value": (1 + as_extreme) / (1 + num_resamples),
  }


def _plain(value):
  """NumPy / JAX scalars and arrays -> Python numbers and lists."""
  return np.asarray(value).tolist() if hasattr(value, "shape") else value


def dump_scores(path: str, columns: dict) -> None:
  """Writes one JSON object per example to `path` (JSONL): row i = {name: columns[name][i]} for every column.

  Columns are per-example arrays or lists of the same length (e.g. "id", "label", "probs", "nll", "correct").
  Non-finite floats are written as NaN / Infinity / -Infinity, the JSON extension Python's `json` reads back.
  """
  n = _rows(list(columns.values()))
  with open(path, "w") as f:
    for i in range(n):
      f.write(json.dumps({name: _plain(column[i]) for name, column in columns.items()}) + "\n")


def load_scores(path: str) -> dict:
  """Reads a `dump_scores` file back into {name: NumPy array} (lists of lists become 2-D arrays)."""
  with open(path) as f:
    rows = [json.loads(line) for line in f if line.strip()]
  if not rows:
    raise ValueError(f"{path} holds no score rows; write it with dump_scores.")
  return {name: np.asarray([row[name] for row in rows]) for name in rows[0]}
