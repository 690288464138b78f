"""Evaluation and calibration on arrays (NumPy / JAX; no model code): metrics, calibration errors, calibrators,
conformal prediction sets and statistics. Each submodule's docstring states its conventions.

The names below are imported lazily, on first use: a training run imports `calibration` (for its token-level ECE)
and should not pay for the calibrators' SciPy optimisers (half a second in every process).
"""

import importlib

_SUBMODULES = ("calibration", "calibrators", "conformal", "metrics", "stats")
_NAMES = {
  "brier_score": "calibration",
  "expected_calibration_error": "calibration",
  "max_calibration_error": "calibration",
  "negative_log_likelihood": "calibration",
  "reliability_curve": "calibration",
  "DirichletCalibration": "calibrators",
  "HistogramBinning": "calibrators",
  "IsotonicCalibration": "calibrators",
  "MatrixScaling": "calibrators",
  "PlattScaling": "calibrators",
  "TemperatureScaling": "calibrators",
  "VectorScaling": "calibrators",
  "prediction_sets": "conformal",
  "bootstrap_ci": "stats",
  "paired_comparison": "stats",
}

__all__ = sorted([*_NAMES, *_SUBMODULES])


def __getattr__(name: str):
  if name in _NAMES:
    return getattr(importlib.import_module(f"jaxlm.evaluation.{_NAMES[name]}"), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxlm.evaluation.{name}")
  raise AttributeError(f"module 'jaxlm.evaluation' has no attribute {name!r}")


def __dir__():
  return __all__
