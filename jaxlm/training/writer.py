"""Metric output of process 0: `metrics.jsonl`, TensorBoard event files and `config.json`."""

import json
import math
import os

import jax
import tensorboardX


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf."""


class MetricWriter:
  """Appends one JSON object per logged step and split to WORKDIR/metrics.jsonl, and TensorBoard scalars.

  Only process 0 writes; the others hold a disabled writer.
  """

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    self._tensorboard = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, split: str, metrics: dict) -> None:
    """Writes `{"step", "split", **metrics}`; raises NonFiniteLossError on a NaN/Inf loss (on every process)."""
    values = {key: float(value) for key, value in metrics.items()}
    if "loss" in values and not math.isfinite(values["loss"]):
      raise NonFiniteLossError(
          f"{split} loss is {values['loss']} at step {step}. Lower train.learning_rate, keep train.grad_clip > 0, "
          "or use float32 (model.dtype); the run restarts from the last good checkpoint.")
    if not self.enabled:
      return
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    for key, value in values.items():
      self._tensorboard.add_scalar(f"{split}/{key}", value, step)

  def write_config(self, workdir: str, config) -> None:
    if self.enabled:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True) + "\n")

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
