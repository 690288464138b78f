"""Device mesh, logical axis names and the one table that maps them to mesh axes.

Modules annotate parameters and activations with the logical names below;
`LOGICAL_AXIS_RULES` maps each to physical mesh axes. Data parallelism, FSDP
(parameters sharded over `fsdp`) and tensor parallelism (heads / MLP / vocab
over `tensor`) all come from the mesh shape in the config, never from the model.
"""

import contextlib
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlm.errors import ConfigError

# Logical axis names (the only names modules use).
BATCH = "batch"
LENGTH = "length"
EMBED = "embed"
HEADS = "heads"
KV_HEADS = "kv_heads"
HEAD_DIM = "head_dim"
MLP = "mlp"
VOCAB = "vocab"
LAYERS = "layers"
POSITION = "position"  # rows of a learned position table

MESH_AXES = ("data", "fsdp", "tensor")

# Logical name -> mesh axes. A mesh axis is used at most once per array: flax
# drops a repeat, so activations `(batch, length, embed)` shard batch over
# data+fsdp and leave embed whole, while parameters shard embed over fsdp.
LOGICAL_AXIS_RULES = (
  (BATCH, ("data", "fsdp")),
  (LENGTH, None),
  (EMBED, "fsdp"),
  (HEADS, "tensor"),
  (KV_HEADS, "tensor"),
  (HEAD_DIM, None),
  (MLP, "tensor"),
  (VOCAB, "tensor"),
  (LAYERS, None),
  (POSITION, None),
)


def mesh_shape(mesh_config: Any, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.data/fsdp/tensor` (one of them may be -1: all remaining devices)."""
  sizes = [int(mesh_config[name]) for name in MESH_AXES]
  if sizes.count(-1) > 1:
    raise ConfigError("mesh: at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
  for name, size in zip(MESH_AXES, sizes):
    if size == 0 or size < -1:
      raise ConfigError(f"mesh.{name}: must be a positive device count or -1, got {size}.")
  known = int(np.prod([size for size in sizes if size != -1]))
  if -1 in sizes:
    if num_devices % known:
      raise ConfigError(f"mesh: the fixed axes ({known} devices) do not divide the {num_devices} devices.")
    sizes[sizes.index(-1)] = num_devices // known
  if int(np.prod(sizes)) != num_devices:
    raise ConfigError(
      f"mesh: data*fsdp*tensor = {int(np.prod(sizes))} but there are {num_devices} devices; "
      "set one of mesh.data, mesh.fsdp, mesh.tensor to -1."
    )
  return tuple(sizes)


def mesh_devices(mesh_config: Any) -> list:
  """The devices a mesh of `mesh_config` spans: every device, or the first `mesh.num_devices` of them (one
  process only: each process of a multi-process run holds its own devices)."""
  devices, num_devices = jax.devices(), int(mesh_config.get("num_devices", -1))
  if num_devices == -1:
    return devices
  if jax.process_count() > 1:
    raise ConfigError(f"mesh.num_devices: a multi-process run spans every device (-1), got {num_devices}.")
  if not 1 <= num_devices <= len(devices):
    raise ConfigError(f"mesh.num_devices: {num_devices} is not between 1 and the {len(devices)} devices (or -1: all).")
  return devices[:num_devices]


def create_mesh(mesh_config: Any, devices=None) -> Mesh:
  """A `Mesh` with axes ("data", "fsdp", "tensor") laid out for the device topology, over `devices` (default:
  `mesh_devices(mesh_config)`)."""
  devices = mesh_devices(mesh_config) if devices is None else devices
  shape = mesh_shape(mesh_config, len(devices))
  device_array = mesh_utils.create_device_mesh(shape, devices=devices, allow_split_physical_axes=True)
  return Mesh(device_array, MESH_AXES)


def mesh_context(mesh: Mesh) -> contextlib.ExitStack:
  """Context for tracing jitted code: `mesh` as the current mesh plus the logical-axis rules."""
  stack = contextlib.ExitStack()
  stack.enter_context(jax.set_mesh(mesh))
  stack.enter_context(nn.logical_axis_rules(LOGICAL_AXIS_RULES))
  return stack


def logical_to_sharding(logical_specs: Any, mesh: Mesh) -> Any:
  """Maps a pytree of logical `PartitionSpec`s to `NamedSharding`s on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_specs, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of an input array `[batch, ...]` of any rank (`[B, T]` tokens, `[B]` labels): rows over data and
  fsdp, the other axes whole."""
  spec = nn.logical_to_mesh_axes((BATCH,), LOGICAL_AXIS_RULES)
  return NamedSharding(mesh, spec)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch dimension is split."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def check_model_fits_mesh(model_config, mesh_axis_sizes: dict) -> None:
  """Raises ConfigError naming the `model.*` key whose size a mesh axis does not divide.

  Each sharded parameter dimension must split evenly over the mesh axes its logical name maps to
  (e.g. heads over `tensor`, the width over `fsdp`). `mesh_axis_sizes`: e.g. `mesh.shape`.
  """
  sizes = {
    HEADS: ("model.num_heads", model_config.num_heads),
    KV_HEADS: ("model.num_kv_heads", model_config.num_kv_heads),
    MLP: ("model.mlp_dim", model_config.mlp_dim),
    VOCAB: ("model.vocab_size", model_config.vocab_size),
    EMBED: ("model.embed_dim", model_config.embed_dim),
  }
  rules = dict(LOGICAL_AXIS_RULES)
  for logical, (key, size) in sizes.items():
    axes = rules[logical]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    ways = int(np.prod([mesh_axis_sizes[axis] for axis in axes]))
    if size % ways:
      names = " x ".join(f"mesh.{axis}" for axis in axes)
      raise ConfigError(
        f"{key}={size} does not split over {names} = {ways} devices; choose a size divisible "
        f"by {ways} or a smaller {names}."
      )
