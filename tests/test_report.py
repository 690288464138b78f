"""Reports: bootstrap intervals that cover the truth at the nominal rate, Markdown/JSON files, reliability PNGs."""

import json

import numpy as np

from jaxlm.evaluation import report


def _simulate(rng, n):
  """A 3-class model with fixed probabilities per input type and true labels drawn from another distribution."""
  model = np.array([[0.7, 0.2, 0.1], [0.2, 0.5, 0.3], [0.1, 0.3, 0.6]])
  truth = np.array([[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.1, 0.2, 0.7]])
  kinds = rng.integers(0, 3, size=n)
  labels = np.array([rng.choice(3, p=truth[k]) for k in kinds])
  return model[kinds], labels, model, truth


def test_bootstrap_intervals_cover_the_truth_at_about_the_nominal_rate():
  """Over 100 simulated test sets of 150 examples, the 90% intervals of accuracy, NLL and Brier contain the
  population values in about 90% of them (binomial sd 3%; the band allows 3.3 sd)."""
  rng = np.random.default_rng(0)
  _, _, model, truth = _simulate(rng, 1)
  # Population values: input types are equally likely.
  accuracy = np.mean([truth[k, model[k].argmax()] for k in range(3)])
  nll = np.mean([-(truth[k] * np.log(model[k])).sum() for k in range(3)])
  brier = np.mean([(truth[k] * ((model[k][None] - np.eye(3)) ** 2).sum(-1)).sum() for k in range(3)])
  covered = {"accuracy": 0, "nll": 0, "brier": 0}
  trials = 100
  for trial in range(trials):
    probs, labels, _, _ = _simulate(rng, 150)
    intervals = report.classification_intervals(
      probs, labels, num_resamples=100, confidence=0.9, seed=trial, names=("accuracy", "nll", "brier")
    )
    for name, value in (("accuracy", accuracy), ("nll", nll), ("brier", brier)):
      covered[name] += intervals[name]["low"] <= value <= intervals[name]["high"]
  for name, count in covered.items():
    assert 0.80 <= count / trials <= 0.99, (name, count)


def test_report_files_and_reliability_diagram(tmp_path):
  rng = np.random.default_rng(1)
  probs, labels, _, _ = _simulate(rng, 120)
  sharp = probs**3 / (probs**3).sum(-1, keepdims=True)
  rows = {
    "a": report.classification_intervals(probs, labels, num_resamples=30),
    "b": report.classification_intervals(sharp, labels, num_resamples=30),
  }
  comparisons = {"b": report.classification_comparisons(sharp, probs, labels, num_resamples=30)}
  for interval in rows["a"].values():
    assert interval["low"] <= interval["value"] <= interval["high"]
  assert comparisons["b"]["accuracy"]["difference"] == 0.0  # same argmax
  assert comparisons["b"]["ece"]["difference"] == rows["b"]["ece"]["value"] - rows["a"]["ece"]["value"]
  json_path, md_path = report.write_report(
    str(tmp_path), {"metrics": rows}, report.markdown_table(rows, comparisons=comparisons)
  )
  assert json.load(open(json_path))["metrics"]["a"]["ece"]["value"] == rows["a"]["ece"]["value"]
  markdown = open(md_path).read()
  assert "| a | " in markdown and f"{rows['b']['nll']['value']:.4f} [" in markdown and "p=" in markdown
  png = report.reliability_diagram(str(tmp_path / "reliability.png"), {"before": probs, "after": sharp}, labels)
  assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
