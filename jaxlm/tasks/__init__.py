"""Objectives, one module each, behind the `Task` protocol (`base.py`) and a registry by name.

`create(config)` builds the task of `config.task`; distillation (`distillation.Distillation`) wraps any of
them around a restored teacher.
"""

from jaxlm.errors import ConfigError
from jaxlm.tasks import (  # noqa: F401  (registers the tasks)
  causal_lm,
  classification,
  masked_lm,
  seq2seq,
  span_corruption,
)
from jaxlm.tasks.base import REGISTRY, BaseTask, Task, register


def task_class(name: str) -> type:
  """The registered class of `config.task = name`."""
  if name not in REGISTRY:
    raise ConfigError(f"task: {name!r} is not one of {sorted(REGISTRY)}.")
  return REGISTRY[name]


def create(config) -> Task:
  """The task of `config.task` with its options."""
  return task_class(config.task).from_config(config)


__all__ = ["REGISTRY", "BaseTask", "Task", "create", "register", "task_class"]
