"""Evaluation reports: every number with its bootstrap confidence interval, as JSON and a Markdown table, and
reliability diagrams as PNG.

Classification (`classification_intervals`): accuracy, macro-F1, NLL, Brier, ECE and MCE (top-label, equal-width
bins) of probabilities [N, C] against labels [N]. Token-level (`token_intervals`): loss (mean NLL per target
token), token accuracy and token-level ECE of per-token arrays [N, T] weighted by [N, T]; rows (sequences) are
resampled, so tokens of one sequence stay together. Intervals are `stats.bootstrap_ci` percentile intervals,
comparisons `stats.paired_comparison` (paired bootstrap interval of the difference and a permutation p-value).
NLL clips the label probability at `MIN_PROB` (isotonic regression and histogram binning can put 0 on a label,
whose NLL would be infinite); the report says so.

The metrics are jitted `jax.vmap`s scored over many resamples per call (`stats`' `batched`); their input checks
run once on the full arrays, not per resample.
"""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.evaluation import calibration, metrics, stats

MIN_PROB = 1e-12
CLASSIFICATION_METRICS = ("accuracy", "macro_f1", "nll", "brier", "ece", "mce")
TOKEN_METRICS = ("loss", "token_accuracy", "ece")
LOWER_IS_BETTER = {"nll", "brier", "ece", "mce", "loss"}


@functools.cache
def _classification_metrics(num_bins: int) -> dict:
  """name -> batched metric(probs [R, N, C], labels [R, N]) -> [R]: jitted `jax.vmap`s over R example resamples
  (`stats.bootstrap_ci(..., batched=True)`). Built once per bin count, so that every report of a process reuses
  their traces and compiled programs (new functions were retraced and recompiled on each call)."""
  per_set = {
    "accuracy": metrics.accuracy,
    "macro_f1": lambda p, y: metrics.macro_f1(metrics.confusion_matrix(jnp.argmax(p, axis=-1), y, p.shape[-1])),
    "nll": lambda p, y: calibration.negative_log_likelihood(p, y, MIN_PROB),
    "brier": calibration.brier_score,
    "ece": lambda p, y: calibration.expected_calibration_error(p, y, num_bins),
    "mce": lambda p, y: calibration.max_calibration_error(p, y, num_bins),
  }
  return {name: jax.jit(jax.vmap(metric)) for name, metric in per_set.items()}


def classification_intervals(
  probs,
  labels,
  num_bins: int = 15,
  num_resamples: int = 1000,
  confidence: float = 0.95,
  seed: int = 0,
  names: tuple = CLASSIFICATION_METRICS,
) -> dict:
  """{metric: {"value", "low", "high"}} for probabilities [N, C] and labels [N] (see the module docstring); for
  probabilities [N, R, C] of R runs (e.g. prompt templates) on the same examples, of each metric's mean over the
  runs (the same example resample for every run). `names`: the metrics reported."""
  probs, labels = np.asarray(probs, np.float32), np.asarray(labels, np.int32)
  if probs.ndim == 3:  # [N, R, C]: R runs on the same examples, each metric the mean over the runs
    calibration.brier_score(probs, np.repeat(labels[:, None], probs.shape[1], axis=1))  # checks, once
    over_runs = lambda metric: lambda p, y: np.mean([np.asarray(metric(p[:, :, r], y)) for r in range(p.shape[2])], 0)
    functions = {name: over_runs(metric) for name, metric in _classification_metrics(num_bins).items()}
  else:
    calibration.brier_score(probs, labels)  # checks shapes, dtypes and ranges once, with a clear message
    functions = _classification_metrics(num_bins)
  return {
    name: stats.bootstrap_ci(functions[name], (probs, labels), num_resamples, confidence, seed, batched=True)
    for name in names
  }


def classification_comparisons(
  probs, baseline_probs, labels, num_bins: int = 15, num_resamples: int = 1000, confidence: float = 0.95, seed: int = 0
) -> dict:
  """{metric: {"difference", "low", "high", "p_value"}}: metric(probs) - metric(baseline_probs), paired."""
  probs, baseline_probs = np.asarray(probs, np.float32), np.asarray(baseline_probs, np.float32)
  labels = np.asarray(labels, np.int32)
  return {
    name: stats.paired_comparison(
      metric, (probs, labels), (baseline_probs, labels), num_resamples, confidence, seed, batched=True
    )
    for name, metric in _classification_metrics(num_bins).items()
  }


def token_arrays(logits, labels, weights) -> dict:
  """Per-token nll, confidence (max probability) and correct [N, T] of next-token logits [N, T, V]."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.asarray(labels)[..., None], axis=-1)[..., 0]
  return {
    "nll": np.asarray(nll),
    "confidence": np.asarray(jnp.exp(jnp.max(log_probs, axis=-1))),
    "correct": np.asarray(jnp.argmax(log_probs, axis=-1) == jnp.asarray(labels)),
    "weights": np.asarray(weights),
  }


def token_intervals(
  nll,
  confidence,
  correct,
  weights,
  num_bins: int = 15,
  num_resamples: int = 1000,
  confidence_level: float = 0.95,
  seed: int = 0,
) -> dict:
  """{metric: {"value", "low", "high"}} of loss, token accuracy and ECE from per-token arrays [N, T]."""
  arrays = [np.asarray(a, np.float32) for a in (nll, confidence, correct, weights)]
  return {
    name: stats.bootstrap_ci(function, arrays, num_resamples, confidence_level, seed, batched=True)
    for name, function in _token_metrics(num_bins).items()
  }


@functools.cache
def _token_metrics(num_bins: int) -> dict:
  """name -> batched metric(nll, confidence, correct, weights, each [R, N, T]) -> [R], built once per bin count
  (as `_classification_metrics`)."""

  def ece(nll, confidence, correct, weights):
    del nll
    sums = calibration.calibration_bin_sums(confidence.reshape(-1), correct.reshape(-1), weights.reshape(-1), num_bins)
    return calibration.ece_from_bin_sums(sums, "l1")

  per_set = {
    "loss": lambda nll, c, ok, w: jnp.sum(nll * w) / jnp.sum(w),
    "token_accuracy": lambda nll, c, ok, w: jnp.sum(ok * w) / jnp.sum(w),
    "ece": ece,
  }
  return {name: jax.jit(jax.vmap(metric)) for name, metric in per_set.items()}


def _cell(interval: dict) -> str:
  value = interval.get("value", interval.get("difference"))
  return f"{value:.4f} [{interval['low']:.4f}, {interval['high']:.4f}]"


def markdown_table(rows: dict, names: tuple | None = None, comparisons: dict | None = None) -> str:
  """A Markdown table: one row per system of `rows` ({system: {metric: interval}}), `value [low, high]` cells;
  with `comparisons` ({system: {metric: paired comparison}}), a second table of the differences and p-values."""
  names = names or tuple(next(iter(rows.values())))
  lines = ["| system | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
  lines += [f"| {system} | " + " | ".join(_cell(row[name]) for name in names) + " |" for system, row in rows.items()]
  if comparisons:
    lines += [
      "",
      "Difference from the baseline, paired bootstrap interval, (permutation p-value):",
      "",
      "| system | " + " | ".join(names) + " |",
      "|---" * (len(names) + 1) + "|",
    ]
    lines += [
      f"| {system} | " + " | ".join(f"{_cell(row[name])} (p={row[name]['p_value']:.3f})" for name in names) + " |"
      for system, row in comparisons.items()
    ]
  return "\n".join(lines)


def write_report(directory: str, report: dict, markdown: str) -> tuple[str, str]:
  """Writes `directory/report.json` (`report`) and `directory/report.md` (`markdown`); returns both paths."""
  os.makedirs(directory, exist_ok=True)
  paths = os.path.join(directory, "report.json"), os.path.join(directory, "report.md")
  for path, text in zip(paths, (json.dumps(report, indent=2, sort_keys=True), markdown + "\n")):
    with open(path + ".tmp", "w") as f:
      f.write(text)
    os.replace(path + ".tmp", path)
  return paths


def reliability_figure(systems: dict, labels, num_bins: int = 15):
  """A matplotlib Figure with one column per system ({title: probs [N, C]}, e.g. before and after), each a
  reliability diagram (per-bin accuracy against the diagonal, the gap to the bin's mean confidence shaded) above
  the histogram of the top-label confidences, with the system's ECE in its title.

  Built without pyplot, so it neither needs nor changes a backend: a notebook displays it inline, a script saves
  it (`reliability_diagram`)."""
  from matplotlib.figure import Figure

  labels = np.asarray(labels, np.int32)
  figure = Figure(figsize=(4 * len(systems), 5.5))
  axes = figure.subplots(2, len(systems), squeeze=False, gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
  width = 1.0 / num_bins
  centers = (np.arange(num_bins) + 0.5) * width
  for column, (title, probs) in enumerate(systems.items()):
    probs = np.asarray(probs, np.float32)
    confidences, correct = calibration.top_label(jnp.asarray(probs), jnp.asarray(labels))
    curve = {k: np.asarray(v) for k, v in calibration.reliability_curve(confidences, correct, num_bins).items()}
    ece = float(calibration.expected_calibration_error(probs, labels, num_bins))
    filled = curve["bin_count"] > 0
    top, bottom = axes[0, column], axes[1, column]
    top.bar(centers[filled], curve["bin_accuracy"][filled], width=width, edgecolor="black", label="accuracy")
    gap_low = np.minimum(curve["bin_accuracy"], curve["bin_confidence"])[filled]
    gap = np.abs(curve["bin_accuracy"] - curve["bin_confidence"])[filled]
    top.bar(centers[filled], gap, bottom=gap_low, width=width, color="red", alpha=0.3, label="gap")
    top.plot([0, 1], [0, 1], "k--", linewidth=1)
    top.set(xlim=(0, 1), ylim=(0, 1), ylabel="accuracy", title=f"{title}\nECE = {ece:.4f}")
    top.legend(loc="upper left")
    bottom.hist(np.asarray(confidences), bins=num_bins, range=(0, 1), color="gray", edgecolor="black")
    bottom.set(xlabel="confidence", ylabel="count")
  figure.tight_layout()
  return figure


def reliability_diagram(path: str, systems: dict, labels, num_bins: int = 15) -> str:
  """PNG at `path` of `reliability_figure(systems, labels, num_bins)`; returns `path`."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  reliability_figure(systems, labels, num_bins).savefig(path, dpi=100)
  return path
