"""LoRA adapters (Hu et al. 2021) on the model's Einsum kernels, and merging them into the base weights.

With `model.lora_rank` = r > 0, every `layers.Einsum` whose module path (e.g.
`layers/attention/query`) matches the regex `model.lora_targets` gets two extra
parameters next to its `kernel` W: `lora_a` A `[*in, r]` (normal init) and
`lora_b` B `[r, *out]` (zeros, so training starts from the base model). The
layer computes `x W + (alpha / r) (x A) B`. Training only the adapters is
`train.trainable = "lora"` (`jaxlm.training.optim`); `merge_lora` folds them
into W for inference, giving a plain model (`lora_rank = 0`) with the same
outputs. Kernels of scanned layers carry a leading layer axis, and so do A, B.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp

ADAPTER_NAMES = ("lora_a", "lora_b")


def is_target(config, module_path) -> bool:
  return re.search(config.lora_targets, "/".join(module_path)) is not None


def adapter(module: nn.Module, x, equation: str, shape: tuple, axes: tuple, output_dims: int):
  """(alpha / r) (x A) B for the Einsum `module` computing `equation` with a kernel of `shape` / `axes`."""
  config = module.config
  x_letters, rest = equation.split(",")
  kernel_letters, y_letters = rest.split("->")
  in_letters, out_letters = kernel_letters[:-output_dims], kernel_letters[-output_dims:]
  kept = "".join(c for c in x_letters if c not in in_letters)  # x's letters that are not contracted
  in_shape, out_shape = shape[:-output_dims], shape[-output_dims:]
  fan_in = 1
  for size in in_shape:
    fan_in *= size
  rank = config.lora_rank
  a = module.param(
    "lora_a",
    nn.with_logical_partitioning(nn.initializers.normal(fan_in**-0.5), (*axes[:-output_dims], None)),
    (*in_shape, rank),
    config.weight_dtype,
  )
  b = module.param(
    "lora_b",
    nn.with_logical_partitioning(nn.initializers.zeros_init(), (None, *axes[-output_dims:])),
    (rank, *out_shape),
    config.weight_dtype,
  )
  dtype = config.compute_dtype
  low = jnp.einsum(f"{x_letters},{in_letters}r->{kept}r", x.astype(dtype), a.astype(dtype))
  return (config.lora_alpha / rank) * jnp.einsum(f"{kept}r,r{out_letters}->{y_letters}", low, b.astype(dtype))


def merge_lora(params, lora_alpha: float):
  """`params` with every adapter pair folded into its kernel (W + (alpha / r) A @ B) and removed.

  Use the result with the same model config and `lora_rank = 0`.
  """

  def merge(tree):
    if not isinstance(tree, dict):
      return tree
    merged = {key: merge(value) for key, value in tree.items() if key not in ADAPTER_NAMES}
    if "lora_a" in tree:
      a, b, kernel = tree["lora_a"], tree["lora_b"], tree["kernel"]
      rank = a.shape[-1]
      layered = kernel.ndim == a.ndim + b.ndim - 3  # a leading layer axis shared by A, B and W
      lead = a.shape[:1] if layered else ()
      delta = jnp.reshape(a, (*lead, -1, rank)) @ jnp.reshape(b, (*lead, rank, -1))
      merged["kernel"] = (kernel + (lora_alpha / rank) * delta.reshape(kernel.shape)).astype(kernel.dtype)
    return merged

  return merge(jax.tree.map(lambda x: x, params))
