"""The train state pytree: parameters plus the optimizer's state, laid out on the mesh.

Only training has a train state; everything else handles parameters alone (`jaxlm.models.params`).
"""

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxlm import sharding
from jaxlm.models import params as params_lib


class TrainState(flax.struct.PyTreeNode):
  """Everything that changes during training and is checkpointed (arrays only)."""

  step: jax.Array  # optimizer steps taken
  params: Any
  opt_state: Any


def state_shardings(model: nn.Module, optimizer: optax.GradientTransformation, mesh) -> tuple[Any, Any]:
  """(abstract state as ShapeDtypeStructs, NamedShardings), without allocating anything.

  The optimizer is initialised abstractly on the boxed parameters, so its moments inherit each
  parameter's logical axis names and are sharded like it.
  """
  boxed_params = params_lib.boxed_abstract_params(model)
  with sharding.mesh_context(mesh):
    opt_state = jax.eval_shape(optimizer.init, boxed_params)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=boxed_params, opt_state=opt_state)
  shardings = sharding.logical_to_sharding(nn.get_partition_spec(abstract), mesh)
  # Frozen parameters leave an empty `optax.MaskedNode` in the optimizer state, which the sharding tree holds
  # as one (prefix) leaf: keep the node.
  abstract = jax.tree.map(
    lambda x, s: x if isinstance(x, optax.MaskedNode) else jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    params_lib.unbox(abstract),
    shardings,
    is_leaf=lambda x: isinstance(x, optax.MaskedNode),
  )
  return abstract, shardings


def create_train_state(params, optimizer: optax.GradientTransformation, shardings, mesh) -> TrainState:
  """A step-0 state around `params` (already laid out in `shardings.params`, which they are donated to):
  the optimizer state is created directly in its shardings."""
  init = lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=optimizer.init(p))
  with sharding.mesh_context(mesh):
    return jax.jit(init, out_shardings=shardings, donate_argnums=0)(params)
