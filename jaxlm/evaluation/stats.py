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


# A batched metric scores at most this many array elements per call (resamples x rows x row size): a few MB.
BATCH_ELEMENTS = 2**22


def _scores(metric: Callable, arrays_at: Callable, num_resamples: int, batched: bool) -> np.ndarray:
  """[metric(*arrays_at(r)) for r in range(num_resamples)] as float64. Batched, the resamples' arrays are stacked
  on a leading axis in chunks of one size (the last padded with resample 0, whose scores are dropped), so a jitted
  metric compiles once and runs a few times instead of once per resample."""
  if not batched:
    return np.array([float(metric(*arrays_at(r))) for r in range(num_resamples)])
  row_size = sum(np.size(array) for array in arrays_at(0))
  chunk = max(1, min(num_resamples, BATCH_ELEMENTS // max(row_size, 1)))
  scores = []
  for start in range(0, num_resamples, chunk):
    rows = list(range(start, min(start + chunk, num_resamples)))
    padded = rows + [0] * (chunk - len(rows))
    stacked = [np.stack(column) for column in zip(*(arrays_at(r) for r in padded))]
    scores.append(np.asarray(metric(*stacked), np.float64)[: len(rows)])
  return np.concatenate(scores)


def _whole(metric: Callable, arrays: Sequence, batched: bool) -> float:
  """metric of the arrays themselves (a batch of one when `batched`)."""
  return float(metric(*[array[None] for array in arrays])[0] if batched else metric(*arrays))


def bootstrap_ci(
  metric: Callable,
  arrays: Sequence,
  num_resamples: int = 1000,
  confidence: float = 0.95,
  seed: int = 0,
  batched: bool = False,
) -> dict:
  """{"value": metric(*arrays), "low", "high"}: the percentile bootstrap interval over example resamples.

  `batched=True`: `metric` takes each array with a leading axis of resamples ([R, N, ...]) and returns [R] (e.g. a
  jitted `jax.vmap` of a metric), so that many resamples are scored per call rather than one call per resample
  (a thousand resamples of six jitted metrics took minutes); the same resamples, the same interval.
  """
  arrays = [np.asarray(array) for array in arrays]
  n = _rows(arrays)
  rng = np.random.default_rng(seed)
  indices = [rng.integers(0, n, size=n) for _ in range(num_resamples)]
  samples = _scores(metric, lambda r: [array[indices[r]] for array in arrays], num_resamples, batched)
  low, high = np.quantile(samples, [(1 - confidence) / 2, (1 + confidence) / 2])
  return {"value": _whole(metric, arrays, batched), "low": float(low), "high": float(high)}


def paired_comparison(
  metric: Callable,
  arrays_a: Sequence,
  arrays_b: Sequence,
  num_resamples: int = 1000,
  confidence: float = 0.95,
  seed: int = 0,
  batched: bool = False,
) -> dict:
  """Difference metric(A) - metric(B) of two systems scored on the same examples (row i is the same example).

  Returns {"difference", "low", "high"}: the paired percentile bootstrap interval of the difference (the same
  row resample for A and B), and "p_value": a two-sided paired permutation test of "A and B are exchangeable
  on every example": each resample swaps A's and B's rows of a random subset of examples, and
  p = (1 + #{|d*| >= |d|}) / (1 + num_resamples), which is a valid p-value for any metric. `batched` as in
  `bootstrap_ci`.
  """
  arrays_a = [np.asarray(array) for array in arrays_a]
  arrays_b = [np.asarray(array) for array in arrays_b]
  n = _rows(arrays_a + arrays_b)
  if len(arrays_a) != len(arrays_b) or any(a.shape != b.shape for a, b in zip(arrays_a, arrays_b)):
    raise ValueError(
      "arrays_a and arrays_b must be the same arrays (shapes) for the two systems, "
      "e.g. (probs_a, labels) and (probs_b, labels)."
    )
  difference = _whole(metric, arrays_a, batched) - _whole(metric, arrays_b, batched)
  rng = np.random.default_rng(seed)
  indices, swaps = [], []
  for _ in range(num_resamples):  # drawn interleaved, as when each resample was scored in turn
    indices.append(rng.integers(0, n, size=n))
    swaps.append(rng.uniform(size=n) < 0.5)

  def swapped(a, b, r):  # a's rows, with b's where permutation r swaps the two systems
    return np.where(swaps[r].reshape(-1, *[1] * (a.ndim - 1)), b, a)

  def scores(arrays_at):
    return _scores(metric, arrays_at, num_resamples, batched)

  resampled = scores(lambda r: [a[indices[r]] for a in arrays_a]) - scores(lambda r: [b[indices[r]] for b in arrays_b])
  pairs = list(zip(arrays_a, arrays_b))
  permuted = scores(lambda r: [swapped(a, b, r) for a, b in pairs]) - scores(
    lambda r: [swapped(b, a, r) for a, b in pairs]
  )
  as_extreme = int(np.sum(np.abs(permuted) >= abs(difference) - 1e-12 * max(1.0, abs(difference))))
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
