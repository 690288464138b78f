"""Weight-only quantization: kernels stored in few bits, dequantized in the matmul; and its fake-quant for training.

Decoding reads every weight once per generated token and does little arithmetic with it, so its speed is the
bytes read: int8 kernels halve them against bfloat16 (quarter against float32), int4 halve them again. A model
built with `model.quantize = SCHEME` (what `decode.quantize` sets, or a post-training quantized workdir's
config) holds, for every `layers.Einsum` (attention, MLP and an untied output projection), an integer `kernel`,
a float32 `kernel_scale` and, if asymmetric, a float32 `kernel_offset`. Embedding tables and norms stay in the
compute dtype.

A scheme is named `int8` or `int4`, optionally `-g<G>` (per-group scales) and `-asym` (asymmetric):
  - per channel (default): one scale per output channel, over all the kernel's input axes;
  - per group (`-g128`): one scale per G consecutive weights along the last input axis (of each output channel);
  - symmetric: `q = round(w / scale)` in [-(2^(b-1) - 1), 2^(b-1) - 1], `scale = max |w| / (2^(b-1) - 1)`;
  - asymmetric: `q = round((w - offset) / scale)` in [-2^(b-1), 2^(b-1) - 1], `scale = (max w - min w) / (2^b - 1)`,
    `offset = min w + 2^(b-1) scale`, so `w ~ q scale + offset` uses all 2^b levels.
Either way a weight is recovered within `scale / 2` of its group. A symmetric per-channel kernel is multiplied
as stored and its output scaled (the same product); the others are dequantized into the matmul's operand.

Quantization-aware training (`model.fake_quantize = SCHEME`): the float kernel goes through `fake_quantize`, its
quantize-dequantize round trip in the forward with the straight-through gradient (identity), so the model trains
under exactly the forward that `model.quantize = SCHEME` will compute from the converted parameters.

Weights are quantized once, from a float checkpoint, into the tree of the quantized model (`convert_params`).
"""

import dataclasses
import functools
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import ConfigError

SCALE = "kernel_scale"  # parameter name of a quantized kernel's scales, next to its `kernel`
OFFSET = "kernel_offset"  # parameter name of an asymmetric kernel's offsets
BITS = {"int8": (8, jnp.int8), "int4": (4, jnp.int4)}  # stored integer formats: bits and dtype
_NAME = re.compile(r"^(int8|int4)(?:-g(\d+))?(-asym)?$")


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How a kernel is stored (see the module docstring)."""

  name: str
  bits: int  # signed integer bits per weight
  storage_dtype: type  # dtype of the stored integers
  group_size: int = 0  # weights per scale along the last input axis; 0 = one scale per output channel
  symmetric: bool = True

  @property
  def max_int(self) -> int:
    return 2 ** (self.bits - 1) - 1

  @property
  def min_int(self) -> int:
    return -self.max_int if self.symmetric else -self.max_int - 1

  def scale_shape(self, kernel_shape: tuple, output_dims: int) -> tuple:
    """Per channel: the kernel's shape with its input axes set to 1. Per group: the last input axis divided by
    the group size, the other input axes kept."""
    inputs = len(kernel_shape) - output_dims
    if not self.group_size:
      return (1,) * inputs + tuple(kernel_shape[inputs:])
    if kernel_shape[inputs - 1] % self.group_size:
      raise ConfigError(
        f"model.quantize: {self.name!r} groups {self.group_size} weights, which do not divide a "
        f"kernel's input axis of {kernel_shape[inputs - 1]} ({kernel_shape}); choose a divisor."
      )
    return (*kernel_shape[: inputs - 1], kernel_shape[inputs - 1] // self.group_size, *kernel_shape[inputs:])


@functools.cache
def scheme(name: str, key: str = "model.quantize") -> Scheme:
  """The scheme of a name such as 'int8', 'int4-g64' or 'int4-g32-asym' (ConfigError naming `key` otherwise)."""
  match = _NAME.match(name)
  if not match or match.group(2) == "0":
    raise ConfigError(
      f"{key}: {name!r} is not a scheme: int8 or int4, optionally -g<G> (per-group "
      "scales, G > 0) and -asym (asymmetric), e.g. 'int8', 'int4-g64', 'int4-g32-asym'."
    )
  bits, dtype = BITS[match.group(1)]
  return Scheme(name, bits, dtype, int(match.group(2) or 0), not match.group(3))


def _groups(kernel: jax.Array, scale_shape: tuple) -> jax.Array:
  """[..., K_a, ...] -> [..., S_a, K_a / S_a, ...]: the weights sharing a scale lie along the odd axes."""
  return kernel.reshape([size for s, k in zip(scale_shape, kernel.shape) for size in (s, k // s)])


def _expand(scale: jax.Array, kernel_shape: tuple) -> jax.Array:
  """Scales (or offsets) broadcastable against the kernel: each one repeated over its group."""
  for axis, (s, k) in enumerate(zip(scale.shape, kernel_shape)):
    if 1 < s < k:
      scale = jnp.repeat(scale, k // s, axis=axis)
  return scale


def quantize_array(kernel: jax.Array, scale_shape: tuple, scheme: Scheme):
  """(integers in `scheme.storage_dtype`, float32 scales, float32 offsets or None if symmetric) of a float kernel,
  scales of `scale_shape` (each over the weights of its group: see `Scheme.scale_shape`)."""
  groups = _groups(kernel.astype(jnp.float32), scale_shape)
  within = tuple(range(1, groups.ndim, 2))
  if scheme.symmetric:
    scale = jnp.max(jnp.abs(groups), axis=within) / scheme.max_int
    offset = None
  else:
    low, high = jnp.min(groups, axis=within), jnp.max(groups, axis=within)
    scale = (high - low) / (2**scheme.bits - 1)
  scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero (or constant) group is kept exactly
  if not scheme.symmetric:
    offset = low - scheme.min_int * scale
  shifted = kernel.astype(jnp.float32) - (0.0 if offset is None else _expand(offset, kernel.shape))
  q = jnp.clip(jnp.round(shifted / _expand(scale, kernel.shape)), scheme.min_int, scheme.max_int)
  return q.astype(scheme.storage_dtype), scale, offset


def dequantize(q: jax.Array, scale: jax.Array, offset: jax.Array | None = None) -> jax.Array:
  """The float32 kernel a quantized one stands for."""
  kernel = q.astype(jnp.float32) * _expand(scale, q.shape)
  return kernel if offset is None else kernel + _expand(offset, q.shape)


def fake_quantize(kernel: jax.Array, output_dims: int, scheme: Scheme) -> jax.Array:
  """The quantize-dequantize round trip of `kernel` in its dtype, with the straight-through gradient (identity)."""
  q, scale, offset = quantize_array(
    jax.lax.stop_gradient(kernel), scheme.scale_shape(kernel.shape, output_dims), scheme
  )
  rounded = dequantize(q, scale, offset).astype(kernel.dtype)
  return kernel + jax.lax.stop_gradient(rounded - kernel)


def einsum(
  equation: str, x: jax.Array, q: jax.Array, scale: jax.Array, offset: jax.Array | None, output_dims: int, dtype
) -> jax.Array:
  """`einsum(equation, x, dequantize(q, scale, offset))` in `dtype`. Symmetric per-channel scales are applied to
  the output (the integer kernel is the matmul's operand); other schemes dequantize the operand."""
  per_channel = all(size == 1 for size in scale.shape[: scale.ndim - output_dims])
  if offset is None and per_channel:
    y = jnp.einsum(equation, x, q.astype(dtype))
    return y * scale.reshape(scale.shape[-output_dims:]).astype(dtype)
  return jnp.einsum(equation, x, dequantize(q, scale, offset).astype(dtype))


def kernel_params(module: nn.Module, shape: tuple, axes: tuple, output_dims: int):
  """(kernel, kernel_scale, kernel_offset or None) parameters of a quantized Einsum (zeros and ones at init: a
  quantized model is filled by `convert_params`, never trained)."""
  kind = scheme(module.config.quantize)
  q = module.param(
    "kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(), axes), shape, kind.storage_dtype
  )
  scale_shape = kind.scale_shape(shape, output_dims)
  scale_axes = tuple(axis if size == full else None for axis, size, full in zip(axes, scale_shape, shape))
  scale = module.param(
    SCALE, nn.with_logical_partitioning(nn.initializers.ones_init(), scale_axes), scale_shape, jnp.float32
  )
  offset = (
    None
    if kind.symmetric
    else module.param(
      OFFSET, nn.with_logical_partitioning(nn.initializers.zeros_init(), scale_axes), scale_shape, jnp.float32
    )
  )
  return q, scale, offset


def convert_params(params, abstract, scheme_name: str = ""):
  """`params` converted to the tree of `abstract` (the `abstract_params` of the model that will use them, e.g.
  one with another dtype or `quantize` set), in its shardings: every float `kernel` with a `kernel_scale` beside
  it quantized with `scheme_name` (scales of the abstract scale's shape), every other leaf cast."""

  def convert(tree, abstract):
    if not isinstance(tree, dict):
      return tree.astype(abstract.dtype)
    out = {key: convert(value, abstract[key]) for key, value in tree.items() if key != "kernel"}
    if "kernel" in tree and SCALE in abstract and SCALE not in tree:
      out["kernel"], out[SCALE], offset = quantize_array(tree["kernel"], abstract[SCALE].shape, scheme(scheme_name))
      if offset is not None:
        out[OFFSET] = offset
    elif "kernel" in tree:
      out["kernel"] = tree["kernel"].astype(abstract["kernel"].dtype)
    return out

  leaves = jax.tree.leaves(abstract)
  placed = all(getattr(leaf, "sharding", None) is not None for leaf in leaves)
  shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract) if placed else None
  return jax.jit(lambda tree: convert(tree, abstract), out_shardings=shardings)(params)


def kernel_bytes(params) -> int:
  """Bytes of all arrays of a parameter tree (what decoding reads per token, embeddings aside); int4 counts as half
  a byte, as it is packed in memory on accelerators."""

  def size(leaf):
    bits = 4 if leaf.dtype == jnp.int4 else 8 * np.dtype(leaf.dtype).itemsize
    return np.prod(leaf.shape) * bits // 8

  return int(sum(size(leaf) for leaf in jax.tree.leaves(params)))
