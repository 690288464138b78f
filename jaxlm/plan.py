"""Plan before launch: per-device memory of a config on a mesh, without compiling or allocating anything.

`python -m jaxlm.main --config=experiments/pretrain.py:llama_1b --workdir=/tmp/plan --mode=plan`
(or `jaxlm.Experiment.plan()`)
prints every parameter's shape, logical axes, mesh sharding and bytes per device, then the optimizer
state, gradient and activation estimates and their total against the device's memory, so an
out-of-memory run is seen before it is paid for. `--config.mesh.*` overrides change the plan; the
device count is this machine's unless `num_devices` is given (plan a pod from a laptop).

Parameters, gradients and Adam moments are exact (from `jax.eval_shape` of the real init and the real
sharding rules). Activations are an estimate of what the backward pass keeps per layer (below).
"""

import dataclasses
import math
import os

import flax.linen as nn
import jax
import numpy as np

from jaxlm import sharding
from jaxlm.models import params as params_lib
from jaxlm.training import optim


@dataclasses.dataclass
class ParamRow:
  path: str
  shape: tuple[int, ...]
  dtype: str
  logical_axes: tuple
  mesh_axes: tuple
  bytes_per_device: int


@dataclasses.dataclass
class MemoryPlan:
  mesh: dict  # axis -> size
  params: list[ParamRow]
  param_bytes: int  # per device
  gradient_bytes: int  # per device: one gradient per parameter, in the parameter dtype
  optimizer_bytes: int  # per device: Adam moments (+ counters)
  activation_bytes: int  # per device: estimate, see `activation_bytes_per_device`
  total_bytes: int
  device_memory_bytes: int | None  # None when the backend does not say
  device_memory_source: str


def _mesh_ways(mesh_axes, mesh: dict) -> int:
  axes = () if mesh_axes is None else (mesh_axes,) if isinstance(mesh_axes, str) else mesh_axes
  return int(np.prod([mesh[axis] for axis in axes]))


def _per_device_bytes(shape, dtype, mesh_spec, mesh: dict) -> int:
  per_device = [math.ceil(size / _mesh_ways(axes, mesh)) for size, axes in zip(shape, tuple(mesh_spec) + (None,) * 8)]
  return int(np.prod(per_device, dtype=np.int64)) * np.dtype(dtype).itemsize


def _tree_rows(abstract_tree, mesh: dict) -> list[ParamRow]:
  """One row per array leaf of a boxed abstract tree (leaves carry logical axis names; unboxed leaves, like
  Adam's step count, are replicated). Each leaf is read with its own names, so a tree with unboxed leaves or
  empty masked nodes (frozen parameters) cannot shift names onto the wrong array."""
  rows = []
  leaves, _ = jax.tree_util.tree_flatten_with_path(abstract_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  for path, leaf in leaves:
    boxed = isinstance(leaf, nn.Partitioned)
    value = leaf.value if boxed else leaf
    if not hasattr(value, "shape"):  # an empty masked node: a frozen parameter's (absent) optimizer state
      continue
    logical = tuple(leaf.names) if boxed else (None,) * len(value.shape)
    mesh_spec = tuple(nn.logical_to_mesh_axes(logical, sharding.LOGICAL_AXIS_RULES))
    rows.append(
      ParamRow(
        jax.tree_util.keystr(path, simple=True, separator="/"),
        tuple(value.shape),
        str(value.dtype),
        logical,
        mesh_spec,
        _per_device_bytes(value.shape, value.dtype, mesh_spec, mesh),
      )
    )
  return rows


def activation_bytes_per_device(config, model_config, mesh: dict) -> int:
  """What the backward pass keeps alive at its peak, per device (an estimate; see the module docstring).

  Per layer and token (B_local rows of T tokens; widths split by tensor parallelism `tp`), in the compute
  dtype: remat "none" keeps the block's inputs and norms (4 D), q/k/v and the attention output
  ((2N + 2K) H / tp), the MLP's hidden activations (swiglu/geglu 4 F / tp, gelu 2 F / tp) and, for XLA attention,
  the softmax probabilities (N T / tp); "save_dots" keeps the matmul outputs only; "full" keeps the block
  input (D) plus one layer's worth during its recomputation. The logits (B T V / tp; B C V / tp with
  `model.loss_chunk_size` C) are kept in float32 three times (logits, log-probabilities, gradient). Every
  family is counted the same way from its layer counts: the blocks of the encoder and of the decoder
  (`encoder_layers + decoder_layers`, all on T tokens: an encoder-decoder's decoder rows are taken as long as
  its encoder rows, an upper bound), plus per cross-attention block its norm input, query, output and softmax
  (2 D + 2 N H / tp + N T / tp). On CPU, XLA's compiled temporaries come out 1.2-2x this estimate
  (tests/test_plan.py), from fused float32 copies the estimate does not count.
  """
  m = model_config
  tp = mesh["tensor"]
  rows = config.train.batch_size // config.train.grad_accum_steps // (mesh["data"] * mesh["fsdp"])
  tokens = rows * config.data.seq_len
  itemsize = np.dtype(m.compute_dtype).itemsize
  heads = (2 * m.num_heads + 2 * m.num_kv_heads) * m.head_dim / tp
  mlp = (4 if m.mlp in ("swiglu", "geglu") else 2) * m.mlp_dim / tp
  scores = m.num_heads * config.data.seq_len / tp if m.attention not in ("cudnn", "pallas") else 0
  full_layer = 4 * m.embed_dim + heads + mlp + scores
  per_layer = {"none": full_layer, "save_dots": 2 * m.embed_dim + heads + mlp / 2, "full": m.embed_dim}[m.remat]
  cross = {
    "none": 2 * m.embed_dim + 2 * m.num_heads * m.head_dim / tp + scores,
    "save_dots": m.embed_dim + 2 * m.num_heads * m.head_dim / tp,
    "full": 0,
  }[m.remat]
  kept = (m.encoder_layers + m.decoder_layers) * per_layer + m.cross_attention_layers * cross
  kept += full_layer if m.remat == "full" else 0
  logit_tokens = rows * min(m.loss_chunk_size or config.data.seq_len, config.data.seq_len)
  return int(tokens * kept * itemsize + logit_tokens * 3 * 4 * m.vocab_size / tp)


def device_memory() -> tuple[int | None, str]:
  """(bytes one device can hold, where that number comes from)."""
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" in stats:
    return int(stats["bytes_limit"]), f"{jax.devices()[0].device_kind} bytes_limit"
  if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
    host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return host // jax.local_device_count(), f"host memory / {jax.local_device_count()} local devices"
  return None, "unknown"


def memory_plan(
  config, model_config, model: nn.Module, new_params: str | None = None, num_devices: int | None = None
) -> MemoryPlan:
  """The per-device memory plan of training `model` (the task's module) as `config` says, over `num_devices`
  (default: the devices `config.mesh` spans). The optimizer is the training one, trainable mask included: frozen
  parameters hold no Adam moments."""
  shape = sharding.mesh_shape(config.mesh, num_devices or len(sharding.mesh_devices(config.mesh)))
  mesh = dict(zip(sharding.MESH_AXES, shape))
  sharding.check_model_fits_mesh(model_config, mesh)
  optimizer, _, _ = optim.optimizer_for(config.train, new_params)
  abstract_params = params_lib.boxed_abstract_params(model)
  with nn.logical_axis_rules(sharding.LOGICAL_AXIS_RULES):
    abstract_opt_state = jax.eval_shape(optimizer.init, abstract_params)
  params = _tree_rows(abstract_params, mesh)
  param_bytes = sum(row.bytes_per_device for row in params)
  optimizer_bytes = sum(row.bytes_per_device for row in _tree_rows(abstract_opt_state, mesh))
  activation_bytes = activation_bytes_per_device(config, model_config, mesh)
  total = 2 * param_bytes + optimizer_bytes + activation_bytes
  limit, source = device_memory()
  return MemoryPlan(mesh, params, param_bytes, param_bytes, optimizer_bytes, activation_bytes, total, limit, source)


def _mib(num_bytes: int) -> str:
  return f"{num_bytes / 2**20:,.1f} MiB"


def format_plan(plan: MemoryPlan) -> str:
  """A table of the parameters and the per-device totals, ending with the verdict."""
  lines = [
    f"mesh {plan.mesh} ({int(np.prod(list(plan.mesh.values())))} devices)",
    "",
    f"{'parameter':<44} {'shape':<22} {'logical axes':<46} {'mesh axes':<34} {'per device':>12}",
  ]
  for row in plan.params:
    lines.append(
      f"{row.path:<44} {str(row.shape):<22} {str(row.logical_axes):<46} {str(row.mesh_axes):<34} "
      f"{_mib(row.bytes_per_device):>12}"
    )
  lines += [
    "",
    f"{'parameters':<24}{_mib(plan.param_bytes):>14}",
    f"{'gradients':<24}{_mib(plan.gradient_bytes):>14}",
    f"{'optimizer state':<24}{_mib(plan.optimizer_bytes):>14}",
    f"{'activations (estimate)':<24}{_mib(plan.activation_bytes):>14}",
    f"{'total per device':<24}{_mib(plan.total_bytes):>14}",
  ]
  if plan.device_memory_bytes:
    verdict = "fits" if plan.total_bytes <= plan.device_memory_bytes else "DOES NOT FIT"
    lines.append(
      f"{'device memory':<24}{_mib(plan.device_memory_bytes):>14}  ({plan.device_memory_source}): "
      f"{verdict}, {100 * plan.total_bytes / plan.device_memory_bytes:.0f}% used"
    )
    if verdict != "fits":
      lines.append(
        "To fit: more fsdp ways (mesh.fsdp), model.remat=full, a smaller train.batch_size per device or "
        "train.grad_accum_steps > 1."
      )
  return "\n".join(lines)
