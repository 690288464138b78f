"""The train state pytree and its sharded creation ("born sharded")."""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training and is checkpointed (arrays only)."""

  step: jax.Array  # optimizer steps taken
  params: Any
  opt_state: Any


def init_fn(model: nn.Module, optimizer: optax.GradientTransformation, seq_len: int):
  def init(rng):
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, tokens)["params"]  # boxed: leaves carry logical axis names
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))
  return init


def state_shardings(model, optimizer, seq_len: int, mesh) -> tuple[Any, Any]:
  """(abstract state as ShapeDtypeStructs, NamedShardings), without allocating anything."""
  init = init_fn(model, optimizer, seq_len)
  with sharding.mesh_context(mesh):
    abstract = jax.eval_shape(init, jax.random.key(0))
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                          nn.meta.unbox(abstract), shardings)
  return abstract, shardings


def create_train_state(model, optimizer, seq_len: int, mesh, shardings, rng) -> TrainState:
  """Initialises parameters and optimizer state directly in `shardings` (from `state_shardings`):
  no host ever holds the full model."""
  init = init_fn(model, optimizer, seq_len)
  with sharding.mesh_context(mesh):
    return jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=shardings)(rng)


def count_params(params) -> int:
  return sum(int(x.size) for x in jax.tree.leaves(params))
