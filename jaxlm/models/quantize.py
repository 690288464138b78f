"""Weight-only quantization for decoding: kernels stored in few bits, dequantized in the matmul.

Decoding reads every weight once per generated token and does little arithmetic with it, so its speed is
the bytes read: int8 kernels halve them against bfloat16 (quarter against float32). A model built with
`model.quantize = "int8"` (what `decode.quantize` sets) holds, for every `layers.Einsum` (attention, MLP and
an untied output projection), an int8 `kernel` and a float32 `kernel_scale`: symmetric, one scale per output
channel (`scale = max |w| / 127` over the kernel's input axes; `q = round(w / scale)`). The matmul runs on
`q` in the compute dtype and multiplies its output by the scale, which for per-channel scales is the same
as multiplying the kernel. Embedding tables and norms stay in the compute dtype.

Weights are quantized once, from a float checkpoint, into the tree of the quantized model (`convert_params`). A scheme is a `Scheme` in `SCHEMES`; a later one (int4, per-group scales, quantization-aware
training) adds its fields and its branch in `quantize_array` / `einsum`, not a second copy of this module.
"""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

SCALE = "kernel_scale"  # parameter name of a quantized kernel's scales, next to its `kernel`


@dataclasses.dataclass(frozen=True)
class Scheme:
  """How a kernel is stored."""

  name: str
  bits: int  # signed integer bits per weight
  storage_dtype: type  # dtype of the stored integers

  @property
  def max_int(self) -> int:
    return 2 ** (self.bits - 1) - 1  # symmetric: [-max_int, max_int]


SCHEMES = {"int8": Scheme("int8", 8, jnp.int8)}


def scheme(name: str) -> Scheme:
  return SCHEMES[name]


def scale_shape(kernel_shape: tuple, output_dims: int) -> tuple:
  """One scale per output channel: the kernel's shape with its input axes set to 1."""
  return (1,) * (len(kernel_shape) - output_dims) + tuple(kernel_shape[-output_dims:])


def quantize_array(kernel: jax.Array, reduce_axes: tuple, scheme: Scheme) -> tuple[jax.Array, jax.Array]:
  """(integers in `scheme.storage_dtype`, float32 scales) of a float kernel, scales over `reduce_axes` (kept)."""
  kernel = kernel.astype(jnp.float32)
  scale = jnp.max(jnp.abs(kernel), axis=reduce_axes, keepdims=True) / scheme.max_int
  scale = jnp.where(scale == 0, 1.0, scale)  # an all-zero channel stays zero
  q = jnp.clip(jnp.round(kernel / scale), -scheme.max_int, scheme.max_int).astype(scheme.storage_dtype)
  return q, scale


def dequantize(q: jax.Array, scale: jax.Array) -> jax.Array:
  """The float32 kernel a quantized one stands for."""
  return q.astype(jnp.float32) * scale


def einsum(equation: str, x: jax.Array, q: jax.Array, scale: jax.Array, output_dims: int, dtype) -> jax.Array:
  """`einsum(equation, x, dequantize(q, scale))` in `dtype`, the per-channel scales applied to the output."""
  y = jnp.einsum(equation, x, q.astype(dtype))
  return y * scale.reshape(scale.shape[-output_dims:]).astype(dtype)


def kernel_params(module: nn.Module, shape: tuple, axes: tuple, output_dims: int):
  """The quantized `kernel` and its `kernel_scale` parameters of an Einsum (zeros and ones at init: a
  quantized model is filled by `quantize_params`, never trained)."""
  config = module.config
  q = module.param("kernel", nn.with_logical_partitioning(nn.initializers.zeros_init(), axes), shape,
                   scheme(config.quantize).storage_dtype)
  scale_axes = (None,) * (len(shape) - output_dims) + tuple(axes[-output_dims:])
  scale = module.param(SCALE, nn.with_logical_partitioning(nn.initializers.ones_init(), scale_axes),
                       scale_shape(shape, output_dims), jnp.float32)
  return q, scale


def convert_params(params, abstract, scheme_name: str = ""):
  """`params` converted to the tree of `abstract` (the `abstract_params` of the model that will use them, e.g.
  one with another dtype or `quantize` set), in its shardings: every `kernel` with a `kernel_scale` beside it
  quantized with `scheme_name` (scales over the axes where the scale has size 1), every other leaf cast."""

  def convert(tree, abstract):
    if not isinstance(tree, dict):
      return tree.astype(abstract.dtype)
    out = {key: convert(value, abstract[key]) for key, value in tree.items() if key != "kernel"}
    if "kernel" in tree and SCALE in abstract:
      reduce_axes = tuple(axis for axis, size in enumerate(abstract[SCALE].shape) if size == 1)
      out["kernel"], out[SCALE] = quantize_array(tree["kernel"], reduce_axes, scheme(scheme_name))
    elif "kernel" in tree:
      out["kernel"] = tree["kernel"].astype(abstract["kernel"].dtype)
    return out

  leaves = jax.tree.leaves(abstract)
  placed = all(getattr(leaf, "sharding", None) is not None for leaf in leaves)
  shardings = jax.tree.map(lambda leaf: leaf.sharding, abstract) if placed else None
  return jax.jit(lambda tree: convert(tree, abstract), out_shardings=shardings)(params)


def kernel_bytes(params) -> int:
  """Bytes of all arrays of a parameter tree (what decoding reads per token, embeddings aside)."""
  return int(sum(np.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(params)))
