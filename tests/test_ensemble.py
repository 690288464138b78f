"""Ensembles (jaxlm.ensemble): identical members average to one of them."""

import numpy as np

from jaxlm import Experiment
from jaxlm.ensemble import Ensemble


def test_ensemble_of_identical_workdirs_equals_one_of_them(tiny_workdir):
  single = Experiment.from_workdir(tiny_workdir)
  expected = single.predict(single.load_params(), num_batches=1)
  for average in ("probabilities", "logits"):
    ensemble = Ensemble([tiny_workdir, tiny_workdir], average=average)
    predictions = ensemble.predict(num_batches=1)
    np.testing.assert_allclose(predictions.probabilities(), expected.probabilities(), rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(predictions.labels, expected.labels)
  metrics = Ensemble([tiny_workdir]).evaluate(num_batches=1)
  reference = single.evaluate(single.load_params(), num_batches=1)
  np.testing.assert_allclose(metrics["loss"], reference["loss"], rtol=1e-4)
