"""The compression report (`jaxlm.compress.compression_report`, written by `compress`): size on disk, parameters
kept, decode speed and the task metrics with confidence intervals next to the original, for a language model
and a classifier."""

import json
import math
import os

import numpy as np
import pytest

from jaxlm import Experiment, compress


def test_report_of_a_pruned_int8_language_model(tiny_workdir, tmp_path):
  out = str(tmp_path / "p50_int8")
  compress.compress(tiny_workdir, out, prune="0.5", quantize_scheme="int8", report=False)
  compress.compression_report(out, tiny_workdir, new_tokens=8, repeats=1, num_resamples=100)
  report = json.load(open(os.path.join(out, "compression_report.json")))
  original, compressed = report["systems"]["original"], report["systems"]["compressed"]
  assert compressed["checkpoint_bytes"] < original["checkpoint_bytes"]  # the original's holds the optimizer state
  assert compressed["params_bytes"] < original["params_bytes"] < original["checkpoint_bytes"]
  up = "layers/mlp/up/kernel[0]"  # pruned to half, then int8: the zeros stay zero
  assert compressed["params_kept"][up][0] == pytest.approx(compressed["params_kept"][up][1] / 2, abs=1)
  assert original["params_kept"][up][0] == original["params_kept"][up][1]
  for entry in (original, compressed):
    assert entry["decode"]["tokens_per_sec"] > 0 and entry["decode"]["batch"] == 4
  assert report["split"] == "validation"
  for system in ("original", "compressed"):
    metrics = report["metrics"][system]
    assert set(metrics) == {"loss", "token_accuracy", "ece", "perplexity"}
    for interval in metrics.values():
      assert interval["low"] <= interval["value"] <= interval["high"]
    assert metrics["perplexity"]["value"] == pytest.approx(math.exp(metrics["loss"]["value"]))
  # The original's loss is the one Experiment.evaluate computes on the same batches.
  source = Experiment.from_workdir(tiny_workdir)
  expected = source.evaluate(source.load_params())["loss"]
  assert report["metrics"]["original"]["loss"]["value"] == pytest.approx(expected, rel=1e-4)
  table = open(os.path.join(out, "compression_report.md")).read()
  assert "| compressed |" in table and "ece" in table


def test_report_of_a_quantized_classifier_compares_with_the_original(tiny_classifier_workdir, tmp_path):
  classifier = tiny_classifier_workdir  # read only: the compressed copy and its report go to `out`
  out = str(tmp_path / "int4")
  compress.compress(classifier, out, step="best", quantize_scheme="int4", report=False)
  report = compress.compression_report(out, classifier, num_resamples=100)
  assert report["split"] == "test" and "decode" not in report["systems"]["compressed"]
  metrics, comparison = report["metrics"], report["comparisons"]["compressed"]
  assert {"accuracy", "macro_f1", "ece"} <= set(metrics["compressed"])
  for name in ("accuracy", "ece"):
    difference = metrics["compressed"][name]["value"] - metrics["original"][name]["value"]
    assert comparison[name]["difference"] == pytest.approx(difference, abs=1e-6)
  test_accuracy = json.load(open(os.path.join(classifier, "eval", "report.json")))["metrics"]["accuracy"]
  assert metrics["original"]["accuracy"]["value"] == pytest.approx(test_accuracy, abs=1e-6)
  assert np.isfinite(metrics["compressed"]["nll"]["value"])
