"""Knowledge distillation: the student's task loss plus a temperature-softened KL to a frozen teacher.

loss = (1 - weight) * task loss + weight * temperature^2 * KL(softmax(teacher / tau) || softmax(student / tau)),
the KL taken on every prediction the task scores (each row of a classifier, each
target token of a language model) with the task's weights, so its sum is
normalised like the task loss. The temperature^2 factor keeps the gradient scale
independent of tau (Hinton et al. 2015). Teacher and student share the task, and
so the batches and the tokenizer; their sizes may differ.
"""

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.errors import check


def check_config(distill) -> None:
  """Validates the `distill` section."""
  check(0.0 <= distill.weight <= 1.0, "distill.weight", f"must be in [0, 1], got {distill.weight}.")
  check(distill.temperature > 0, "distill.temperature", f"must be positive, got {distill.temperature}.")


@dataclasses.dataclass(frozen=True)
class Distillation:
  """Wraps the student's task (`jaxlm.tasks.base.Task`): the loss and its summary add the KL term; everything
  else is the student's, forwarded explicitly below."""

  student: Any  # the task being trained (jaxlm.tasks.base.Task)
  teacher_model: nn.Module
  teacher_params: Any  # frozen, closed over by the compiled step
  weight: float = 0.5  # share of the KL term in the loss
  temperature: float = 2.0  # tau

  @property
  def name(self) -> str:
    return self.student.name

  @property
  def new_params(self) -> str | None:
    return self.student.new_params

  @property
  def generates_text(self) -> bool:
    return self.student.generates_text

  def build_model(self, model_config):
    return self.student.build_model(model_config)

  def batches(self, *args, **kwargs):
    return self.student.batches(*args, **kwargs)

  def batch_shapes(self, rows):
    return self.student.batch_shapes(rows)

  def random_batch(self, rows, vocab_size, rng):
    return self.student.random_batch(rows, vocab_size, rng)

  def weights(self, batch):
    return self.student.weights(batch)

  def baselines(self, batches):
    return self.student.baselines(batches)

  def predictions(self, logits, batch):
    return self.student.predictions(logits, batch)

  def test_report(self, **kwargs):
    return self.student.test_report(**kwargs)

  def loss_and_metrics(self, model, params, batch, *, train, rng=None):
    return self.loss_sums(self.logits(model, params, batch, train=train, rng=rng), batch, train=train)

  def logits(self, model, params, batch, *, train, rng=None):
    return self.student.logits(model, params, batch, train=train, rng=rng)

  def loss_sums(self, logits, batch, *, train):
    task_loss, sums = self.student.loss_sums(logits, batch, train=train)
    teacher_logits = self.student.logits(self.teacher_model, self.teacher_params, batch, train=False)
    teacher_log_probs = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_logits).astype(jnp.float32) / self.temperature)
    student_log_probs = jax.nn.log_softmax(logits.astype(jnp.float32) / self.temperature)
    kl = jnp.sum(jnp.exp(teacher_log_probs) * (teacher_log_probs - student_log_probs), axis=-1)
    kl_sum = jnp.sum(kl * self.student.weights(batch)) * self.temperature**2
    loss = (1 - self.weight) * task_loss + self.weight * kl_sum
    return loss, {**sums, "loss_sum": loss, "task_loss_sum": task_loss, "distill_kl_sum": kl_sum}

  def summarize(self, sums):
    weight = max(float(sums["weight"]), 1e-9)
    return {
      **self.student.summarize({**sums, "loss_sum": sums["task_loss_sum"]}),
      "loss": float(sums["loss_sum"]) / weight,
      "task_loss": float(sums["task_loss_sum"]) / weight,
      "distill_kl": float(sums["distill_kl_sum"]) / weight,
    }
