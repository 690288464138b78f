"""Evaluation and calibration on arrays (NumPy / JAX; no model code): metrics, calibration errors, calibrators,
conformal prediction sets and statistics. Each submodule's docstring states its conventions."""

from jaxlm.evaluation import calibration, calibrators, conformal, metrics, stats
from jaxlm.evaluation.calibration import (
  brier_score,
  expected_calibration_error,
  max_calibration_error,
  negative_log_likelihood,
  reliability_curve,
)
from jaxlm.evaluation.calibrators import (
  DirichletCalibration,
  HistogramBinning,
  IsotonicCalibration,
  MatrixScaling,
  PlattScaling,
  TemperatureScaling,
  VectorScaling,
)
from jaxlm.evaluation.conformal import prediction_sets
from jaxlm.evaluation.stats import bootstrap_ci, paired_comparison

__all__ = [
  "DirichletCalibration",
  "HistogramBinning",
  "IsotonicCalibration",
  "MatrixScaling",
  "PlattScaling",
  "TemperatureScaling",
  "VectorScaling",
  "bootstrap_ci",
  "brier_score",
  "calibration",
  "calibrators",
  "conformal",
  "expected_calibration_error",
  "max_calibration_error",
  "metrics",
  "negative_log_likelihood",
  "paired_comparison",
  "prediction_sets",
  "reliability_curve",
  "stats",
]
