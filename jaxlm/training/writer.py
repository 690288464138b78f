"""Metric output of process 0: `metrics.jsonl` and TensorBoard event files, one history per workdir."""

import json
import math
import os
import sys

import jax

from jaxlm.errors import NonFiniteLossError


def _kept(line: str, step: int) -> bool:
  """Whether a metrics.jsonl line belongs to the history up to `step` (a line torn by a kill mid-write does not)."""
  try:
    return line.endswith("\n") and int(json.loads(line)["step"]) <= step
  except (ValueError, KeyError, TypeError):
    return False


def _tensorboardx():
  """The tensorboardX module, imported without torch when torch is not imported yet: tensorboardX imports torch
  whenever it is installed, only to accept torch tensors (1.3 s of CPU and torch's OpenMP runtime in every training
  process); jaxlm writes Python floats. A later `import torch` works as usual."""
  if "torch" in sys.modules:
    import tensorboardX

    return tensorboardX
  sys.modules["torch"] = None  # `import torch` raises ImportError, which tensorboardX handles
  try:
    import tensorboardX
  finally:
    del sys.modules["torch"]
  return tensorboardX


def read_rows(workdir: str, split: str) -> list[dict]:
  """The rows of `split` in WORKDIR/metrics.jsonl, in the order written (none if the file does not exist); a last
  line still being written (a running or killed run) is not read."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [row for row in map(json.loads, (line for line in f if line.endswith("\n"))) if row["split"] == split]


class MetricWriter:
  """Appends one JSON object per logged step and split to WORKDIR/metrics.jsonl, and TensorBoard scalars.

  A run resuming from step S first drops the rows after S (and a torn last line), atomically, and TensorBoard
  purges its events after S, so both tell one history with steps increasing per split; a row for a step the
  split already has (re-evaluating a finished run) is not written again. Only process 0 writes; the others hold
  a disabled writer.
  """

  def __init__(self, workdir: str, step: int = 0):
    self.enabled = jax.process_index() == 0
    if not self.enabled:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    kept = []
    if os.path.exists(path):
      with open(path) as f:
        kept = [line for line in f if _kept(line, step)]
      with open(path + ".tmp", "w") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._last_step = {}
    for row in map(json.loads, kept):
      self._last_step[row["split"]] = max(self._last_step.get(row["split"], 0), row["step"])
    self._jsonl = open(path, "a", buffering=1)
    self._tensorboard = _tensorboardx().SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=step + 1)

  def write(self, step: int, split: str, metrics: dict, require_finite_loss: bool = True) -> None:
    """Writes `{"step", "split", **metrics}`; raises NonFiniteLossError on a NaN/Inf loss (on every process)
    unless not `require_finite_loss`."""
    values = {key: float(value) for key, value in metrics.items()}
    if require_finite_loss and "loss" in values and not math.isfinite(values["loss"]):
      raise NonFiniteLossError(
        f"{split} loss is {values['loss']} at step {step}. Lower train.learning_rate, keep train.grad_clip > 0, "
        "or use float32 (model.dtype); rerunning the same command resumes from the last checkpoint."
      )
    if not self.enabled or step <= self._last_step.get(split, 0):
      return
    self._last_step[split] = step
    self._jsonl.write(json.dumps({"step": step, "split": split, **values}) + "\n")
    for key, value in values.items():
      self._tensorboard.add_scalar(f"{split}/{key}", value, step)

  def close(self) -> None:
    if self.enabled:
      self._jsonl.close()
      self._tensorboard.close()
