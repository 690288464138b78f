"""Parameters as plain pytrees, born sharded: their abstract shapes, their shardings and their initialisation.

No optimizer, no train state: what a notebook, evaluation, generation or a checkpoint reader needs.
`jax.eval_shape` of the model's init gives every parameter's shape, dtype and logical axis names; the
one rules table (`jaxlm.sharding`) turns the names into shardings on a mesh; `init_params` then runs the
init jitted with those output shardings, so no host ever holds the full model.
"""

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm import sharding


def boxed_init_fn(model: nn.Module) -> Callable:
  """`rng -> params` whose leaves are still boxed with their logical axis names (`nn.Partitioned`).

  The model is initialised on one [1, 16] token array, which fits every jaxlm model (parameter shapes never
  depend on the input length; 16 is the shortest row the Pallas flash-attention kernel tiles).
  """
  return lambda rng: model.init(rng, jnp.zeros((1, 16), jnp.int32))["params"]


def unbox(tree: Any) -> Any:
  """Plain arrays (or ShapeDtypeStructs) from a tree whose leaves may carry logical axis metadata."""
  return nn.meta.unbox(tree)


@functools.lru_cache(maxsize=32)
def boxed_abstract_params(model: nn.Module) -> Any:
  """`jax.eval_shape` of `boxed_init_fn(model)`: ShapeDtypeStructs boxed with their logical axis names.

  Traced once per model (modules are frozen dataclasses, equal when built alike) and shared by everything that
  needs only shapes and names: shardings, restores, plans and the train state's abstract optimizer state. A
  tiny CLI run traced the model's init four times for these before the train step was traced at all."""
  with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    return jax.eval_shape(boxed_init_fn(model), jax.random.key(0))


def logical_specs(model: nn.Module) -> Any:
  """A tree of logical `PartitionSpec`s (e.g. `("embed", "mlp")`), one per parameter."""
  return nn.get_partition_spec(boxed_abstract_params(model))


def abstract_params(model: nn.Module, mesh: jax.sharding.Mesh | None = None) -> Any:
  """ShapeDtypeStructs of every parameter, each with its `NamedSharding` on `mesh` (none without a mesh).

  Nothing is allocated: this is what a checkpoint restores into and what a plan counts.
  """
  abstract = unbox(boxed_abstract_params(model))
  if mesh is None:
    return abstract
  shardings = sharding.logical_to_sharding(logical_specs(model), mesh)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)


def init_params(model: nn.Module, rng: jax.Array, mesh: jax.sharding.Mesh | None = None) -> Any:
  """Freshly initialised parameters, created directly in their shardings on `mesh` (or on the default device)."""
  init = boxed_init_fn(model)
  if mesh is None:
    return jax.jit(lambda key: unbox(init(key)))(rng)
  shardings = sharding.logical_to_sharding(logical_specs(model), mesh)
  with sharding.mesh_context(mesh):
    return jax.jit(lambda key: unbox(init(key)), out_shardings=shardings)(rng)


def init_some_params(model: nn.Module, rng: jax.Array, names, mesh: jax.sharding.Mesh | None = None) -> dict:
  """{name: value} of the parameters `names` (`path_name`s) exactly as `init_params(model, rng, mesh)` creates
  them, from an init jitted for these outputs alone: XLA drops the rest of the initialiser, so filling the new
  head of a restored model neither computes nor compiles the random init of every other weight."""
  if not names:
    return {}
  init = boxed_init_fn(model)

  def subset(key):
    flat = flatten(unbox(init(key)))
    return {name: flat[name] for name in names}

  if mesh is None:
    return jax.jit(subset)(rng)
  shardings = flatten(sharding.logical_to_sharding(logical_specs(model), mesh))
  with sharding.mesh_context(mesh):
    return jax.jit(subset, out_shardings={name: shardings[name] for name in names})(rng)


def count(params: Any) -> int:
  """Number of scalars in a parameter tree (arrays or ShapeDtypeStructs)."""
  return sum(int(x.size) for x in jax.tree.leaves(params))


def path_name(path) -> str:
  """'/'-joined names of a tree path, e.g. 'backbone/layers/attention/query/kernel': the one spelling of a
  parameter's name (checkpoint matching, trainable masks, error messages)."""
  return "/".join(str(key.key) for key in path if hasattr(key, "key"))


def flatten(tree: Any) -> dict:
  """{path name: leaf} of a parameter tree."""
  return {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
