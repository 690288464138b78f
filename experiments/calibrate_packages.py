"""Calibrate the fine-tuned package classifier of `finetune_packages.py`: fit every post-hoc calibrator on the
validation split, report each against the uncalibrated model on the test split.

  python -m jaxlm.main --config=experiments/calibrate_packages.py --workdir=runs/packages --mode=calibrate
  python -m jaxlm.main --config=experiments/calibrate_packages.py --workdir=runs/packages --mode=eval \
      --calibrator=temperature

The config is `finetune_packages.py`'s (pass the same variant: `:lora`, `:tiny`, ...) plus the `calibration`
section below. Writes WORKDIR/calibration/report.json, report.md (accuracy, macro-F1, NLL, Brier, ECE, MCE with
95% bootstrap intervals; paired tests against the uncalibrated model), reliability_<name>.png (before | after)
and calibrator_<name>_step<S>.json, which `--mode=eval --calibrator=NAME` applies.
"""

import importlib.util
import os


def get_config(arg: str | None = None):
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "finetune_packages.py")
  spec = importlib.util.spec_from_file_location("finetune_packages", path)
  finetune_packages = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(finetune_packages)
  config = finetune_packages.get_config(arg)
  config.calibration.calibrators = ()  # () = every calibrator that applies (19 classes: all but Platt)
  config.calibration.fit_split = "validation"  # fitted here; evaluated on data.test_split
  config.calibration.num_bins = 15
  config.calibration.num_resamples = 1000
  if arg and "tiny" in arg.split(","):
    config.calibration.num_resamples = 50
  return config
