"""End to end: --mode=calibrate and --mode=eval on a tiny fine-tuned classifier, and the prompted experiment."""

import json
import os
import shutil

import pytest

from conftest import run_cli
from jaxlm import Experiment, calibrate
from jaxlm.evaluation.calibration import expected_calibration_error


@pytest.mark.e2e
def test_calibrate_a_tiny_classifier_then_eval_through_a_calibrator(
  tiny_workdir, tiny_classifier_workdir, data_dir, tmp_path
):
  shutil.copytree(tiny_classifier_workdir, tmp_path, dirs_exist_ok=True)  # calibrated and evaluated in the copy
  common = [f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}", f"--config.init_from={tiny_workdir}"]
  # Matrix and Dirichlet scaling (checked against scikit-learn in test_calibrators.py) are left out here: their
  # unregularised fits on a barely trained 19-class model take most of a minute.
  names = ["temperature", "vector", "isotonic", "histogram"]
  run_cli(
    "--config=experiments/calibrate_packages.py:tiny",
    "--mode=calibrate",
    f"--config.calibration.calibrators={tuple(names)}",
    *common,
  )
  calibration = tmp_path / "calibration"
  result = json.loads((calibration / "report.json").read_text())
  assert sorted(result["metrics"]) == sorted(["uncalibrated"] + names)  # JSON keys are sorted
  assert sorted(result["versus_uncalibrated"]) == sorted(names)
  for name in names:
    assert (calibration / f"reliability_{name}.png").read_bytes()[:4] == b"\x89PNG"
    assert os.path.exists(calibration / f"calibrator_{name}_step{result['step']}.json")
    for interval in result["metrics"][name].values():
      assert interval["low"] <= interval["value"] <= interval["high"]
  # Temperature scaling never changes the argmax, and it lowers the test NLL here (fitted on validation).
  assert result["metrics"]["temperature"]["accuracy"] == result["metrics"]["uncalibrated"]["accuracy"]
  assert "| temperature |" in (calibration / "report.md").read_text()
  # What a notebook draws from: the same test probabilities, through the calibrators saved above.
  probs, labels = calibrate.calibrated_probabilities(Experiment.from_workdir(str(tmp_path)), step=result["step"])
  assert sorted(probs) == sorted(["uncalibrated"] + names) and len(labels) == result["test_examples"]
  for name in ("uncalibrated", "temperature", "isotonic"):
    assert float(expected_calibration_error(probs[name], labels, 15)) == pytest.approx(
      result["metrics"][name]["ece"]["value"], rel=1e-5
    )

  run_cli(f"--workdir={tmp_path}", "--mode=eval", "--calibrator=temperature", "--step=best")
  evaluated = json.loads((tmp_path / "eval" / "test" / "report.json").read_text())
  assert evaluated["step"] == result["step"] and evaluated["calibrator"] == "temperature"
  assert evaluated["metrics"]["nll"]["value"] == pytest.approx(
    result["metrics"]["temperature"]["nll"]["value"], rel=1e-5
  )


@pytest.mark.e2e
def test_prompted_classification_with_every_correction(tiny_workdir, data_dir, tmp_path):
  run_cli(
    "--config=experiments/prompted_packages.py:tiny",
    "--mode=calibrate",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    f"--config.init_from={tiny_workdir}",
    "--config.prompt.num_examples=8",
    "--config.prompt.orders=1",
  )
  result = json.loads((tmp_path / "calibration" / "report.json").read_text())
  settings = [f"{shots}-shot {name}" for shots in (0, 1) for name in ("none", "contextual", "domain", "batch", "pmi")]
  assert sorted(result["metrics"]) == sorted(settings) == sorted(result["spread"])
  assert result["examples"] == 8 and len(result["runs"]) == 2 * 2 * 5  # templates x shots x corrections
  for setting in settings:
    assert result["spread"][setting]["accuracy"]["runs"] == 2
    assert 0 <= result["metrics"][setting]["accuracy"]["value"] <= 1
  assert "Spread across runs" in (tmp_path / "calibration" / "report.md").read_text()
