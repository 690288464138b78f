"""Optimizer: AdamW with warmup + decay schedule, global-norm clipping and a weight-decay mask."""

import jax
import optax


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
  """True for matrices (`kernel`, `embedding`), False for norm scales and biases."""

  def decays(path, _):
    names = {getattr(key, "key", None) for key in path}
    return bool(names & {"kernel", "embedding"})

  return jax.tree_util.tree_map_with_path(decays, params)


def create_optimizer(train_config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  schedule = learning_rate_schedule(train_config)
  adamw = optax.adamw(schedule, b1=train_config.b1, b2=train_config.b2, eps=train_config.eps,
                      weight_decay=train_config.weight_decay, mask=weight_decay_mask)
  if train_config.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(train_config.grad_clip), adamw), schedule
  return adamw, schedule
