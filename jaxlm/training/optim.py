"""Optimizer: AdamW with warmup + decay schedule, global-norm clipping, a weight-decay mask, and the
trainable-parameter mask of fine-tuning (full, head-only, LoRA, frozen by name pattern).

Frozen parameters go through `optax.set_to_zero()` inside `optax.multi_transform`:
their update is exactly zero, and AdamW keeps no moments for them.
"""

import re

import jax
import optax

from jaxlm.compression import pruning
from jaxlm.errors import check
from jaxlm.models import lora
from jaxlm.models.params import path_name

TRAINABLE = ("all", "head", "lora")
SCHEDULES = ("cosine", "linear", "constant")


def check_config(train) -> None:
  """Validates the optimizer and schedule keys of the `train` section (ConfigError naming the key)."""
  check(train.learning_rate > 0, "train.learning_rate", f"must be positive, got {train.learning_rate}.")
  check(train.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {train.warmup_steps}.")
  check(train.schedule in SCHEDULES, "train.schedule", f"{train.schedule!r} is not one of {SCHEDULES}.")
  check(train.grad_clip >= 0, "train.grad_clip", f"must be >= 0 (0 disables clipping), got {train.grad_clip}.")
  check(train.trainable in TRAINABLE, "train.trainable", f"{train.trainable!r} is not one of {TRAINABLE}.")
  if train.frozen:
    try:
      re.compile(train.frozen)
    except re.error as error:
      check(False, "train.frozen", f"{train.frozen!r} is not a regular expression ({error}).")
  pruning.check_config(train.prune)


def learning_rate_schedule(train_config) -> optax.Schedule:
  """Linear warmup from 0 to the peak over `warmup_steps`, then cosine / linear decay or constant."""
  peak = train_config.learning_rate
  warmup = train_config.warmup_steps
  decay_steps = max(train_config.steps - warmup, 1)
  end = peak * train_config.end_learning_rate_fraction
  if train_config.schedule == "cosine":
    decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=train_config.end_learning_rate_fraction)
  elif train_config.schedule == "linear":
    decay = optax.linear_schedule(peak, end, decay_steps)
  else:
    decay = optax.constant_schedule(peak)
  if warmup == 0:
    return decay
  return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def weight_decay_mask(params):
  """True for matrices (`kernel`, `embedding`, LoRA factors), False for norm scales and biases."""

  def decays(path, _):
    names = {getattr(key, "key", None) for key in path}
    return bool(names & {"kernel", "embedding", *lora.ADAPTER_NAMES})

  return jax.tree_util.tree_map_with_path(decays, params)


def trainable_mask(params, trainable: str = "all", frozen: str = "", new_params: str | None = None):
  """True for the parameters that train, from the `train.trainable` recipe and the `train.frozen` regex.

  "all": every parameter (full fine-tuning); "head": only the task's new parameters (`new_params`, e.g. a
  classification head: "replace the last layer"); "lora": only LoRA adapters, plus the task's new parameters.
  Then every parameter whose path matches `frozen` (if set) is frozen, e.g. "token_embed|attention".
  """

  def trains(path, _):
    name = path_name(path)
    is_new = bool(new_params) and re.search(new_params, name) is not None
    chosen = {"all": True, "head": is_new, "lora": is_new or name.rsplit("/", 1)[-1] in lora.ADAPTER_NAMES}[trainable]
    return chosen and not (frozen and re.search(frozen, name))

  return jax.tree_util.tree_map_with_path(trains, params)


def create_optimizer(train_config, trainable=None) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW (+ clipping) on the parameters where the `trainable` mask (a tree of bools, or a function of the
  params giving one) is True; the others are frozen. `trainable=None` trains everything."""
  schedule = learning_rate_schedule(train_config)
  adamw = optax.adamw(
    schedule,
    b1=train_config.b1,
    b2=train_config.b2,
    eps=train_config.eps,
    weight_decay=train_config.weight_decay,
    mask=weight_decay_mask,
  )
  if train_config.grad_clip > 0:
    adamw = optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw)
  if trainable is None:
    return adamw, schedule

  def labels(params):
    mask = trainable(params) if callable(trainable) else trainable
    return jax.tree.map(lambda train: "train" if train else "frozen", mask)

  return optax.multi_transform({"train": adamw, "frozen": optax.set_to_zero()}, labels), schedule


def optimizer_for(train_config, new_params: str | None = None):
  """(optimizer, schedule, trainable) for the `train` section and a task adding `new_params`: the one recipe
  used by training and by the memory plan. `trainable` is None (everything trains) or `params -> mask`. With
  `train.prune` set, the pruning masks are applied last, to every update (`compression.pruning.gradual`)."""
  trainable = None
  if train_config.trainable != "all" or train_config.frozen:
    trainable = lambda params: trainable_mask(params, train_config.trainable, train_config.frozen, new_params)
  optimizer, schedule = create_optimizer(train_config, trainable)
  if pruning.enabled(train_config.prune):
    optimizer = optax.chain(optimizer, pruning.gradual(train_config.prune))
  return optimizer, schedule, trainable
