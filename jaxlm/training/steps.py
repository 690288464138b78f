"""The pure train and eval steps, and their one jitted form. The task supplies the loss; nothing here is task
specific."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxlm import sharding
from jaxlm.training.state import TrainState


def _micro_batches(batch: dict, num_micro: int) -> dict:
  """[B, ...] -> [M, B/M, ...]. Micro-batch j takes rows j, j+M, ..., so each stays spread over all devices."""

  def split(x):
    x = x.reshape(x.shape[0] // num_micro, num_micro, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1)

  return jax.tree.map(split, batch)


def train_step(
  state: TrainState, batch: dict, *, model, task, optimizer, schedule, dropout_rng, grad_accum_steps: int = 1
):
  """One optimizer step on the mean loss over all target tokens of the global batch.

  Gradient accumulation sums per-token losses and gradients over micro-batches
  and divides once by the total token count, so it gives the same update as
  the whole batch at once. Dropout keys come from `fold_in(dropout_rng, step)`.

  A non-finite update (NaN/Inf in the gradients or the new parameters) is not applied: parameters and optimizer
  state stay as they were (the step count still advances) and `metrics["nonfinite"]` is 1. The loop decides,
  without a host sync per step, whether that stops the run or is counted (`train.skip_nonfinite_updates`); a
  saved state is so always finite.
  """
  rng = jax.random.fold_in(dropout_rng, state.step)

  def loss_fn(params, micro_batch, micro_rng):
    return task.loss_and_metrics(model, params, micro_batch, train=True, rng=micro_rng)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if grad_accum_steps == 1:
    (_, sums), grads = grad_fn(state.params, batch, rng)
  else:

    def accumulate(carry, inputs):
      micro_batch, index = inputs
      (_, micro_sums), micro_grads = grad_fn(state.params, micro_batch, jax.random.fold_in(rng, index))
      return jax.tree.map(jnp.add, carry, (micro_grads, micro_sums)), None

    micro = _micro_batches(batch, grad_accum_steps)
    first = jax.tree.map(lambda x: x[0], micro)
    sums_shape = jax.eval_shape(lambda: loss_fn(state.params, first, rng)[1])
    zeros = (
      jax.tree.map(jnp.zeros_like, state.params),
      jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), sums_shape),
    )
    (grads, sums), _ = jax.lax.scan(accumulate, zeros, (micro, jnp.arange(grad_accum_steps)))

  weight = jnp.maximum(sums["weight"], 1.0)
  grads = jax.tree.map(lambda g: g / weight, grads)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  grad_norm, param_norm = optax.global_norm(grads), optax.global_norm(params)
  # Finite gradients keep Adam's moments finite; finite new parameters keep the model so.
  finite = jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
  keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
  metrics = {
    **sums,
    "grad_norm": grad_norm,
    "update_norm": optax.global_norm(updates),
    "param_norm": param_norm,
    "learning_rate": schedule(state.step),
    "nonfinite": (~finite).astype(jnp.int32),
  }
  return state.replace(
    step=state.step + 1,
    params=keep_if_finite(params, state.params),
    opt_state=keep_if_finite(opt_state, state.opt_state),
  ), metrics


def eval_step(params, batch: dict, *, model, task) -> dict:
  """Metric sums of one batch (summed over the global batch, so across devices too)."""
  _, sums = task.loss_and_metrics(model, params, batch, train=False)
  return sums


def jit_train_step(*, model, task, optimizer, schedule, dropout_rng, grad_accum_steps: int, state_sharding, mesh):
  """`train_step` jitted with explicit shardings, donating the state: the one place it is jitted (the loop, the
  benchmark and the tests all use it). Inputs are global batches laid out by `sharding.batch_sharding(mesh)`;
  metrics come back replicated."""
  return jax.jit(
    functools.partial(
      train_step,
      model=model,
      task=task,
      optimizer=optimizer,
      schedule=schedule,
      dropout_rng=dropout_rng,
      grad_accum_steps=grad_accum_steps,
    ),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=0,
  )


def jit_eval_step(*, model, task, param_sharding, mesh):
  """`eval_step` jitted with explicit shardings (parameters in `param_sharding`, batches over the data axes)."""
  return jax.jit(
    functools.partial(eval_step, model=model, task=task),
    in_shardings=(param_sharding, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )


def to_global(batch: dict, mesh) -> dict:
  """This process's rows of a batch -> global arrays laid out over the mesh's data axes."""
  batch_sharding = sharding.batch_sharding(mesh)
  return {key: jax.make_array_from_process_local_data(batch_sharding, value) for key, value in batch.items()}


def evaluate(eval_step, params, batches: list[dict], mesh) -> dict:
  """Metric sums of `params` over `batches` (host batches of this process), on the host.

  Each batch's sums (a few scalars and counts) are fetched and added on the host, in their own dtype (the same
  float32 additions the device would do). Adding them on the device instead dispatched one small program per metric
  and batch ahead of the eval step they wait for, and XLA:CPU deadlocked on that with simulated devices: the
  waiting programs took all of one device's in-flight slots, so its share of the eval step's all-reduce never ran.
  """
  totals = None
  with sharding.mesh_context(mesh):
    for batch in batches:
      sums = jax.device_get(eval_step(params, to_global(batch, mesh)))
      totals = sums if totals is None else jax.tree.map(np.add, totals, sums)
  return totals
