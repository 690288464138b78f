"""Building blocks shared by every transformer: norms, rotary positions,
attention, MLP and the pre-norm transformer block.

Shape legend: B batch, T query length, S key length, D model width,
N query heads, K key/value heads, H head dim, F MLP width.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxlm.models import lora
from jaxlm.models.config import ModelConfig
from jaxlm.sharding import BATCH, EMBED, HEAD_DIM, HEADS, KV_HEADS, LAYERS, LENGTH, MLP

_REMAT_POLICIES = {
    "full": None,  # save nothing, recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def weight_init(std: float, axes: tuple):
  """Normal(0, std) initialiser that carries logical axis names."""
  return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros_init(axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones_init(axes: tuple):
  return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def norm(config: ModelConfig, name: str) -> nn.Module:
  """LayerNorm (GPT-2) or RMSNorm (Llama) over D; statistics in float32."""
  common = dict(epsilon=config.norm_eps, dtype=config.compute_dtype, param_dtype=config.weight_dtype,
                scale_init=ones_init((EMBED,)), name=name)
  if config.norm == "rmsnorm":
    return nn.RMSNorm(**common)
  return nn.LayerNorm(use_bias=config.use_bias, bias_init=zeros_init((EMBED,)), **common)


def apply_rotary(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), "rotate half" layout as in Llama.

  x: [B, T, N, H]; positions: [B, T] integer positions. Computed in float32.
  """
  half = x.shape[-1] // 2
  inverse_frequency = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)  # [H/2]
  angles = positions[..., None].astype(jnp.float32) * inverse_frequency  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return rotated.astype(x.dtype)


def attention_mask(query_segment_ids: jax.Array, key_segment_ids: jax.Array, causal: bool) -> jax.Array:
  """Boolean mask [B, 1, T, S]: attend only within the same segment (and to the past if causal).

  Segment ids number the documents packed into a row; padding has its own id
  (0), so every query sees at least itself and no row is fully masked.
  """
  mask = query_segment_ids[:, :, None] == key_segment_ids[:, None, :]
  if causal:
    length, key_length = query_segment_ids.shape[1], key_segment_ids.shape[1]
    mask &= jnp.tril(jnp.ones((length, key_length), dtype=bool))
  return mask[:, None, :, :]


class Einsum(nn.Module):
  """`einsum(equation, x, kernel) (+ bias)` with a kernel that carries logical axis names.

  The bias (if `config.use_bias` and `bias`) spans the kernel's last `output_dims` axes.
  A module whose path matches `config.lora_targets` gets LoRA adapters when `config.lora_rank` > 0
  (`jaxlm.models.lora`).
  """

  config: ModelConfig
  equation: str  # e.g. "BTD,DNH->BTNH"
  shape: tuple[int, ...]  # kernel shape
  axes: tuple[str, ...]  # kernel logical axes
  init_std: float  # stddev of the kernel's normal initialiser
  output_dims: int = 1  # trailing kernel axes that are output features
  bias: bool = True  # False: never a bias (the LM head), whatever config.use_bias says

  @nn.compact
  def __call__(self, x):
    config = self.config
    kernel = self.param("kernel", weight_init(self.init_std, self.axes), self.shape, config.weight_dtype)
    y = jnp.einsum(self.equation, x.astype(config.compute_dtype), kernel.astype(config.compute_dtype))
    if config.use_bias and self.bias:
      bias_shape, bias_axes = self.shape[-self.output_dims:], self.axes[-self.output_dims:]
      y += self.param("bias", zeros_init(bias_axes), bias_shape, config.weight_dtype).astype(config.compute_dtype)
    if config.lora_rank and lora.is_target(config, self.scope.path):
      y += lora.adapter(self, x, self.equation, self.shape, self.axes, self.output_dims)
    return y


class Attention(nn.Module):
  """Multi-head or grouped-query attention through `jax.nn.dot_product_attention`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x, positions, mask):
    """x: [B, T, D]; positions: [B, T]; mask: [B, 1, T, T] -> [B, T, D]."""
    config = self.config
    D, N, K, H = config.embed_dim, config.num_heads, config.kv_heads, config.dim_per_head
    std = config.init_std
    query = Einsum(config, "BTD,DNH->BTNH", (D, N, H), (EMBED, HEADS, HEAD_DIM), std, 2, name="query")(x)
    key = Einsum(config, "BTD,DKH->BTKH", (D, K, H), (EMBED, KV_HEADS, HEAD_DIM), std, 2, name="key")(x)
    value = Einsum(config, "BTD,DKH->BTKH", (D, K, H), (EMBED, KV_HEADS, HEAD_DIM), std, 2, name="value")(x)
    if config.position == "rotary":
      query = apply_rotary(query, positions, config.rope_theta)
      key = apply_rotary(key, positions, config.rope_theta)
    query = nn.with_logical_constraint(query, (BATCH, LENGTH, HEADS, HEAD_DIM))
    key = nn.with_logical_constraint(key, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    value = nn.with_logical_constraint(value, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))

    implementation = None if config.attention == "auto" else config.attention
    out = jax.nn.dot_product_attention(query, key, value, mask=mask, implementation=implementation)
    out = nn.with_logical_constraint(out, (BATCH, LENGTH, HEADS, HEAD_DIM))  # [B, T, N, H]
    return Einsum(config, "BTNH,NHD->BTD", (N, H, D), (HEADS, HEAD_DIM, EMBED), residual_std(config),
                  name="out")(out)


def residual_std(config: ModelConfig) -> float:
  """Projections into the residual stream start smaller (GPT-2): std / sqrt(2 L)."""
  return config.init_std / (2 * config.num_layers) ** 0.5


class Mlp(nn.Module):
  """GELU MLP (GPT-2) or SwiGLU (Llama): [B, T, D] -> [B, T, D]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    config = self.config
    D, F = config.embed_dim, config.mlp_dim

    def up(name):
      return Einsum(config, "BTD,DF->BTF", (D, F), (EMBED, MLP), config.init_std, name=name)(x)

    if config.mlp == "swiglu":
      hidden = nn.silu(up("gate")) * up("up")
    else:
      hidden = nn.gelu(up("up"), approximate=True)
    hidden = nn.with_logical_constraint(hidden, (BATCH, LENGTH, MLP))  # [B, T, F]
    return Einsum(config, "BTF,FD->BTD", (F, D), (MLP, EMBED), residual_std(config), name="down")(hidden)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Attention(Norm(x)), then x + Mlp(Norm(x)).

  The mask decides what kind of block it is (causal for decoders, full for
  encoders). Returns `(x, None)` so that it can be stacked with `nn.scan`.
  """

  config: ModelConfig
  deterministic: bool = True  # False turns dropout on (training)

  @nn.compact
  def __call__(self, x, positions, mask):
    config = self.config
    dropout = nn.Dropout(config.dropout_rate, deterministic=self.deterministic)
    h = Attention(config, name="attention")(norm(config, "attention_norm")(x), positions, mask)
    x = x + dropout(h)
    h = Mlp(config, name="mlp")(norm(config, "mlp_norm")(x))
    x = x + dropout(h)
    return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED)), None


def stacked_blocks(config: ModelConfig, deterministic: bool, name: str = "layers") -> nn.Module:
  """`num_layers` blocks as one `nn.scan` (compile time independent of depth), optionally rematerialised.

  Parameters get a leading `layers` axis of size L.
  """
  block = TransformerBlock
  if config.remat != "none":
    block = nn.remat(block, policy=_REMAT_POLICIES[config.remat], prevent_cse=False)
  stack = nn.scan(
      block,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(nn.broadcast, nn.broadcast),
      length=config.num_layers,
      metadata_params={nn.PARTITION_NAME: LAYERS},
  )
  return stack(config, deterministic, name=name)
