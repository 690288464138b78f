"""Ensembles: several runs of the same task (e.g. seeds of a deep ensemble), their predictions averaged.

    ensemble = Ensemble(["runs/pkg_seed0", "runs/pkg_seed1", "runs/pkg_seed2"])
    predictions = ensemble.predict("test")    # Predictions whose logits are log(mean of the members' probabilities)
    ensemble.evaluate("test")                 # {"loss": NLL, "accuracy": ...} of the averaged prediction

Members are evaluated one at a time on the same batches (every run of a task reads a split in the same fixed
order), so only one member's parameters are held at once. `average="probabilities"` (the deep-ensemble mean,
Lakshminarayanan et al. 2017) or `"logits"` (the mean of the logits, a product of experts).
"""

import numpy as np

from jaxlm.experiment import Experiment, Predictions

AVERAGES = ("probabilities", "logits")


class Ensemble:
  """Runs of one task, averaged (see the module docstring)."""

  def __init__(self, workdirs: list[str], step: str | int = "latest", average: str = "probabilities"):
    if average not in AVERAGES:
      raise ValueError(f"average={average!r} is not one of {AVERAGES}.")
    if not workdirs:
      raise ValueError("An ensemble needs at least one workdir.")
    self.members = [Experiment.from_workdir(workdir) for workdir in workdirs]
    tasks = {member.config.task for member in self.members}
    if len(tasks) > 1:
      raise ValueError(f"The ensemble's runs are of different tasks {sorted(tasks)}; average runs of one task.")
    self.step, self.average = step, average

  def predict(self, split: str | None = None, num_batches: int | None = -1) -> Predictions:
    """The members' predictions on `split`, averaged: logits are log(mean probabilities) or the mean logits."""
    total, first = None, None
    for member in self.members:
      predictions = member.predict(member.load_params(self.step), split, num_batches)
      if first is None:
        first = predictions
      elif not np.array_equal(predictions.labels, first.labels):
        raise ValueError(
          f"{member.workdir} read other examples of {split!r} than {self.members[0].workdir}: the "
          "runs must share the task's data settings."
        )
      value = predictions.probabilities() if self.average == "probabilities" else predictions.logits.astype(np.float64)
      total = value if total is None else total + value
    mean = total / len(self.members)
    logits = np.log(np.maximum(mean, np.finfo(np.float64).tiny)) if self.average == "probabilities" else mean
    return Predictions(logits=logits, labels=first.labels, weights=first.weights)

  def evaluate(self, split: str | None = None, num_batches: int | None = -1) -> dict:
    """Weighted NLL ("loss") and accuracy of the averaged prediction on `split`."""
    predictions = self.predict(split, num_batches)
    probabilities = predictions.probabilities()
    weights = predictions.weights.astype(np.float64)
    labels = predictions.labels.astype(np.int64)
    chosen = np.take_along_axis(probabilities, labels[..., None], axis=-1)[..., 0]
    correct = probabilities.argmax(axis=-1) == labels
    total = max(weights.sum(), 1.0)
    return {
      "loss": float(-(np.log(np.maximum(chosen, 1e-300)) * weights).sum() / total),
      "accuracy": float((correct * weights).sum() / total),
    }
