"""Building blocks shared by every transformer: norms, rotary positions,
attention, MLP and the pre-norm transformer block.

Decoding threads a `KVCache` through the same modules: the keys and values
of the tokens seen so far, so that each new token costs one position of work.

Shape legend: B batch, T query length, S key length (cache slots), D model width,
L layers, N query heads, K key/value heads, H head dim, F MLP width.
"""

import functools

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.models import flash_attention, lora, quantize
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
  common = dict(
    epsilon=config.norm_eps,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    scale_init=ones_init((EMBED,)),
    name=name,
  )
  if config.norm == "rmsnorm":
    return nn.RMSNorm(**common)
  return nn.LayerNorm(use_bias=config.use_bias, bias_init=zeros_init((EMBED,)), **common)


def rotary_inverse_frequency(config: ModelConfig) -> np.ndarray:
  """Inverse frequencies [H/2] (float32) of the rotary rotation: theta^(-2i/H), with `config.rope_scaling_type`
  applied. "llama3" is Hugging Face's `_compute_llama3_parameters`: low frequencies (wavelength above
  original_max_len / low_freq_factor) divided by the factor, high ones (below original_max_len / high_freq_factor)
  kept, a linear blend in 1/wavelength between."""
  half = config.head_dim // 2
  inverse_frequency = 1.0 / config.rope_theta ** (np.arange(half, dtype=np.float32) / half)
  if config.rope_scaling_type == "llama3":
    factor, low, high = config.rope_scaling_factor, config.rope_low_freq_factor, config.rope_high_freq_factor
    wavelength = 2 * np.pi / inverse_frequency
    smooth = (config.rope_original_max_len / wavelength - low) / (high - low)
    blended = (1 - smooth) * inverse_frequency / factor + smooth * inverse_frequency
    inverse_frequency = np.where(
      wavelength > config.rope_original_max_len / low,
      inverse_frequency / factor,
      np.where(wavelength < config.rope_original_max_len / high, inverse_frequency, blended),
    )
  return inverse_frequency.astype(np.float32)


def apply_rotary(x: jax.Array, positions: jax.Array, inverse_frequency: np.ndarray) -> jax.Array:
  """Rotary position embedding (Su et al. 2021), "rotate half" layout as in Llama.

  x: [B, T, N, H]; positions: [B, T] integer positions; inverse_frequency: [H/2] (`rotary_inverse_frequency`).
  Computed in float32.
  """
  angles = positions[..., None].astype(jnp.float32) * jnp.asarray(inverse_frequency)  # [B, T, H/2]
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


class KVCache(flax.struct.PyTreeNode):
  """Keys and values of every layer for the decoding of a batch of left-padded rows.

  Every row writes its next token into the same slot `index`, so an update is
  one `dynamic_update_slice`; row b holds padding before slot `start[b]`,
  which is masked out and shifts that row's positions (position = slot - start).
  """

  key: jax.Array  # [L, B, K, S, H] in the compute dtype (head-major: what the attention dots read)
  value: jax.Array  # [L, B, K, S, H]
  start: jax.Array  # [B] int32, first slot of each row's tokens
  index: jax.Array  # [] int32, next slot to write

  # Logical axes of `key` and `value`: shard like activations (batch, kv heads) under the training rules.
  AXES = (LAYERS, BATCH, KV_HEADS, LENGTH, HEAD_DIM)

  @classmethod
  def create(cls, config: ModelConfig, start: jax.Array, length: int) -> "KVCache":
    """An empty cache of `length` slots for rows whose tokens begin at slots `start` ([B])."""
    shape = (config.num_layers, start.shape[0], config.num_kv_heads, length, config.head_dim)
    zeros = nn.with_logical_constraint(jnp.zeros(shape, config.compute_dtype), cls.AXES)
    return cls(key=zeros, value=zeros, start=start.astype(jnp.int32), index=jnp.zeros((), jnp.int32))

  def take(self, rows: jax.Array) -> "KVCache":
    """The cache of rows `rows` ([B'] indices), e.g. the beams that survive a beam-search step."""
    key = nn.with_logical_constraint(jnp.take(self.key, rows, axis=1), self.AXES)
    value = nn.with_logical_constraint(jnp.take(self.value, rows, axis=1), self.AXES)
    return self.replace(key=key, value=value, start=self.start[rows])

  def positions_and_mask(self, length: int) -> tuple[jax.Array, jax.Array]:
    """Positions [B, T] and attention mask [B, 1, T, S] of `length` tokens written from slot `index`.

    A token sees the slots from its row's start up to its own; a padding slot sees only itself.
    """
    query_slots = self.index + jnp.arange(length)  # [T]
    key_slots = jnp.arange(self.key.shape[3])  # [S]
    positions = jnp.maximum(query_slots[None, :] - self.start[:, None], 0)  # [B, T]
    visible = (key_slots[None, None, :] <= query_slots[None, :, None]) & (
      key_slots[None, None, :] >= self.start[:, None, None]
    )  # [B, T, S]
    visible |= key_slots[None, None, :] == query_slots[None, :, None]
    return positions, visible[:, None]


class Einsum(nn.Module):
  """`einsum(equation, x, kernel) (+ bias)` with a kernel that carries logical axis names.

  The bias (if `config.use_bias` and `bias`) spans the kernel's last `output_dims` axes.
  A module whose path matches `config.lora_targets` gets LoRA adapters when `config.lora_rank` > 0
  (`jaxlm.models.lora`); with `config.quantize` the kernel is stored quantized (`jaxlm.models.quantize`).
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
    # The product runs on B and T merged into one axis ("BTD,DF->BTF" as "TD,DF->TF"): the same numbers, and
    # XLA's CPU backend then lays out the backward pass without transposed elementwise fusions (~25% faster
    # train step there; no change on GPU). Sharding is unaffected: merging B (sharded) with T (whole) keeps it.
    if not (self.equation.startswith("BT") and self.equation.split("->")[1].startswith("BT")):
      raise ValueError(f"Einsum {self.name}: equation {self.equation!r} must map [B, T, ...] to [B, T, ...].")
    flat = x.reshape((-1, *x.shape[2:])).astype(config.compute_dtype)
    if config.quantize:  # weight-only quantized kernel: dequantized in the matmul
      q, scale, offset = quantize.kernel_params(self, self.shape, self.axes, self.output_dims)
      y = quantize.einsum(
        self.equation.replace("B", ""), flat, q, scale, offset, self.output_dims, config.compute_dtype
      )
    else:
      kernel = self.param("kernel", weight_init(self.init_std, self.axes), self.shape, config.weight_dtype)
      if config.fake_quantize:  # quantization-aware training: the forward of the quantized model, STE gradient
        kernel = quantize.fake_quantize(kernel, self.output_dims, quantize.scheme(config.fake_quantize))
      y = jnp.einsum(self.equation.replace("B", ""), flat, kernel.astype(config.compute_dtype))
    y = y.reshape((*x.shape[:2], *y.shape[1:]))
    if config.use_bias and self.bias:
      bias_shape, bias_axes = self.shape[-self.output_dims :], self.axes[-self.output_dims :]
      y += self.param("bias", zeros_init(bias_axes), bias_shape, config.weight_dtype).astype(config.compute_dtype)
    if config.lora_rank and lora.is_target(config, self.scope.path):
      y += lora.adapter(self, x, self.equation, self.shape, self.axes, self.output_dims)
    return y


def uses_segment_ids(config: ModelConfig, cache=None) -> bool:
  """Whether attention takes segment ids (the flash kernel) rather than a dense mask: training and scoring
  with `model.attention = "pallas"`; decoding with a cache always uses the dense mask of its slots."""
  return config.attention == "pallas" and cache is None


def relative_buckets(relative: jax.Array, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
  """T5's bucket of each relative position (key position - query position), as in Raffel et al. 2020.

  Half the buckets (of each direction, when bidirectional) hold exact distances 0, 1, ...; the rest grow
  logarithmically up to `max_distance`, beyond which distances share the last bucket. A causal stack
  buckets only the past (keys after the query get bucket 0; the mask hides them anyway).
  """
  buckets = jnp.zeros_like(relative)
  if bidirectional:
    num_buckets //= 2
    buckets = (relative > 0).astype(relative.dtype) * num_buckets
    distance = jnp.abs(relative)
  else:
    distance = -jnp.minimum(relative, 0)
  exact = num_buckets // 2
  log_ratio = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / exact) / jnp.log(max_distance / exact)
  large = jnp.minimum(exact + (log_ratio * (num_buckets - exact)).astype(relative.dtype), num_buckets - 1)
  return buckets + jnp.where(distance < exact, distance, large)


class RelativePositionBias(nn.Module):
  """T5's learned bias of each head for each relative-position bucket: [B, N, T, S], computed once per stack
  and added to the attention logits of every layer (shared across layers)."""

  config: ModelConfig
  bidirectional: bool  # encoder: both directions; causal decoder: the past only

  @nn.compact
  def __call__(self, query_positions, key_positions):
    """query_positions [B, T], key_positions [B, S] -> bias [B, N, T, S] (compute dtype)."""
    config = self.config
    table = self.param(
      "embedding",
      weight_init(config.init_std, (None, HEADS)),
      (config.relative_buckets, config.num_heads),
      config.weight_dtype,
    )
    relative = key_positions[:, None, :] - query_positions[:, :, None]  # [B, T, S]
    buckets = relative_buckets(relative, self.bidirectional, config.relative_buckets, config.relative_max_distance)
    return jnp.take(table, buckets, axis=0).transpose(0, 3, 1, 2).astype(config.compute_dtype)


class Attention(nn.Module):
  """Multi-head or grouped-query attention through `jax.nn.dot_product_attention` (or, for decoders, the flash
  kernel with segment ids: `model.attention = "pallas"`, `jaxlm.models.flash_attention`): self-attention, or
  cross-attention (`cross=True`) whose keys and values come from an encoder's output."""

  config: ModelConfig
  cross: bool = False  # keys/values from `source` (no rotary); a cache holds the encoder's keys/values per layer
  causal: bool = False  # the mask is causal (decoder self-attention): query blocks may skip the keys after them

  @nn.compact
  def __call__(self, x, positions, mask, cache=None, bias=None, source=None):
    """x: [B, T, D]; positions: [B, T]; mask: [B, 1, T, S]; bias: None or [B, N, T, S] added to the logits
    (T5's relative positions) -> [B, T, D].

    With `model.attention = "pallas"` (and no cache) `mask` is the segment ids [B, T] instead, and the
    causal attention within segments runs in the flash kernel of `jaxlm.models.flash_attention`.

    Without a cache S = T. With `cache = (keys, values, layer, index)` (every layer's
    [L, B, K, S, H] slots, this layer's number and the first slot to write), the T new
    keys and values are written in place from slot `index` of this layer, the queries
    attend over its S slots, and the result is `(out, (keys, values, layer + 1, index))`.

    Cross-attention: `source` [B, S, D] is the encoder output. With `cache = (keys, values, layer)`,
    keys and values of `source` are written into this layer's slots (prefill), or, with `source` None,
    read from them (each decoding step); the result is `(out, (keys, values, layer + 1))`.
    """
    config = self.config
    D, N, K, H = config.embed_dim, config.num_heads, config.num_kv_heads, config.head_dim
    std = config.init_std
    query = Einsum(config, "BTD,DNH->BTNH", (D, N, H), (EMBED, HEADS, HEAD_DIM), std, 2, name="query")(x)
    keys_from = source if self.cross else x
    key = value = None
    if keys_from is not None:
      key = Einsum(config, "BTD,DKH->BTKH", (D, K, H), (EMBED, KV_HEADS, HEAD_DIM), std, 2, name="key")(keys_from)
      value = Einsum(config, "BTD,DKH->BTKH", (D, K, H), (EMBED, KV_HEADS, HEAD_DIM), std, 2, name="value")(keys_from)
    if config.position == "rotary" and not self.cross:
      inverse_frequency = rotary_inverse_frequency(config)
      query = apply_rotary(query, positions, inverse_frequency)
      key = apply_rotary(key, positions, inverse_frequency)
    query = nn.with_logical_constraint(query, (BATCH, LENGTH, HEADS, HEAD_DIM))
    if key is not None:
      key = nn.with_logical_constraint(key, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
      value = nn.with_logical_constraint(value, (BATCH, LENGTH, KV_HEADS, HEAD_DIM))
    if cache is not None:
      keys, values, layer, *index = cache
      at = (layer, 0, 0, index[0] if index else 0, 0)
      if key is not None:
        new_keys, new_values = (update.transpose(0, 2, 1, 3)[None].astype(keys.dtype) for update in (key, value))
        keys = nn.with_logical_constraint(jax.lax.dynamic_update_slice(keys, new_keys, at), KVCache.AXES)
        values = nn.with_logical_constraint(jax.lax.dynamic_update_slice(values, new_values, at), KVCache.AXES)
      # [B, S, K, H] views of this layer's slots (the transposes cancel against the ones inside the attention).
      key = jax.lax.dynamic_index_in_dim(keys, layer, keepdims=False).transpose(0, 2, 1, 3)
      value = jax.lax.dynamic_index_in_dim(values, layer, keepdims=False).transpose(0, 2, 1, 3)

    if uses_segment_ids(config, cache):  # ModelConfig allows it for decoders only: no bias, no cross, 1/sqrt(H)
      out = flash_attention.segment_attention(query, key, value, segment_ids=mask, causal=True)
    else:
      scale = None if config.scale_attention else 1.0  # None: 1 / sqrt(H)
      blocks = causal_query_blocks(config, query.shape[1]) if self.causal and cache is None else 1
      out = causal_block_attention(query, key, value, bias, mask, scale, blocks, attention_implementation(config))
    out = nn.with_logical_constraint(out, (BATCH, LENGTH, HEADS, HEAD_DIM))  # [B, T, N, H]
    out = Einsum(config, "BTNH,NHD->BTD", (N, H, D), (HEADS, HEAD_DIM, EMBED), residual_std(config), name="out")(out)
    return out if cache is None else (out, (keys, values, layer + 1, *index))


def attention_implementation(config: ModelConfig) -> str | None:
  """`jax.nn.dot_product_attention`'s implementation for `model.attention` (None: jax picks; "blocks" is XLA's)."""
  return config.attention if config.attention in ("xla", "cudnn") else None


CAUSAL_BLOCKS = 4  # query blocks of causal self-attention under model.attention = "blocks" (or "auto" on CPU)
MIN_BLOCK_ROWS = 4  # queries per block at least


def causal_query_blocks(config: ModelConfig, length: int) -> int:
  """How many query blocks causal self-attention over `length` positions runs in: CAUSAL_BLOCKS with
  `model.attention = "blocks"`, and with "auto" on a CPU backend (where XLA's attention is the dense [T, T]
  computation); 1 (one dense attention) otherwise, or when `length` does not split into whole blocks of at least
  MIN_BLOCK_ROWS queries (shorter blocks save nothing worth their extra operations)."""
  wanted = config.attention == "blocks" or (config.attention == "auto" and jax.default_backend() == "cpu")
  whole = length % CAUSAL_BLOCKS == 0 and length // CAUSAL_BLOCKS >= MIN_BLOCK_ROWS
  return CAUSAL_BLOCKS if wanted and whole else 1


def causal_block_attention(query, key, value, bias, mask, scale, blocks: int, implementation: str | None):
  """`jax.nn.dot_product_attention` of query [B, T, N, H] over key/value [B, T, K, H] (bias [B, N, T, T] or
  None, mask [B, 1, T, T]) computed in `blocks` blocks of queries, block i attending only to the keys up to its
  own end: the keys after a block are masked for all its queries when the mask is causal, so their scores are
  never computed (about 3/8 of the [T, T] work skipped at 4 blocks, forward and backward). The softmax of each
  query runs over the same unmasked keys as in one dense attention: the same function, rounded differently
  only by the shorter sums. `blocks = 1` is the dense attention itself (any mask)."""
  length = query.shape[1]
  outputs = []
  for block in range(blocks):
    start, end = block * length // blocks, (block + 1) * length // blocks
    columns = end if blocks > 1 else key.shape[1]  # the keys this block can see
    outputs.append(
      jax.nn.dot_product_attention(
        query[:, start:end],
        key[:, :columns],
        value[:, :columns],
        bias=None if bias is None else bias[:, :, start:end, :columns],
        mask=None if mask is None else mask[:, :, start:end, :columns],
        scale=scale,
        implementation=implementation,
      )
    )
  return outputs[0] if blocks == 1 else jnp.concatenate(outputs, axis=1)


def residual_std(config: ModelConfig) -> float:
  """Projections into the residual stream start smaller (GPT-2): std / sqrt(2 L)."""
  return config.init_std / (2 * config.num_layers) ** 0.5


def activation(config: ModelConfig):
  """The nonlinearity of a non-gated MLP (and of BERT's MLM transform), and GeGLU's gate (tanh GELU)."""
  if config.mlp == "relu":
    return nn.relu
  return functools.partial(nn.gelu, approximate=config.mlp != "gelu_exact")


class Mlp(nn.Module):
  """GELU MLP (GPT-2, BERT), ReLU MLP (T5), SwiGLU (Llama) or GeGLU (T5 v1.1): [B, T, D] -> [B, T, D]."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x):
    config = self.config
    D, F = config.embed_dim, config.mlp_dim

    def up(name):
      return Einsum(config, "BTD,DF->BTF", (D, F), (EMBED, MLP), config.init_std, name=name)(x)

    if config.mlp in ("swiglu", "geglu"):
      hidden = (nn.silu if config.mlp == "swiglu" else activation(config))(up("gate")) * up("up")
    else:
      hidden = activation(config)(up("up"))
    hidden = nn.with_logical_constraint(hidden, (BATCH, LENGTH, MLP))  # [B, T, F]
    return Einsum(config, "BTF,FD->BTD", (F, D), (MLP, EMBED), residual_std(config), name="down")(hidden)


class TransformerBlock(nn.Module):
  """Pre-norm block: x + Attention(Norm(x)), then x + Mlp(Norm(x)); post-norm (`model.norm_position`, BERT):
  Norm(x + Attention(x)), then Norm(x + Mlp(x)). A decoder block of an encoder-decoder (`cross_attention`)
  has a cross-attention sub-block to the encoder output between the two.

  The mask decides what kind of block it is (causal for decoders, full for
  encoders). The carry is `(x, cache)` so that blocks stack with `nn.scan`:
  `cache` is None (training, scoring) or the decoding cache of every layer,
  updated in place (see `Attention`); returns `((x, cache), None)`. With cross-attention the carry is
  `(x, cache, cross_cache)` (see `Attention` for the cross-attention cache).
  """

  config: ModelConfig
  deterministic: bool = True  # False turns dropout on (training)
  cross_attention: bool = False  # the decoder of an encoder-decoder
  causal: bool = False  # causal self-attention (decoders): lets the attention skip the keys after a query block

  @nn.compact
  def __call__(self, carry, positions, mask, bias=None, cross=None):
    """bias: None or T5's relative position bias [B, N, T, T]; cross: with cross_attention,
    `(encoded [B, S, D] or None when the cache holds its keys/values, cross_mask [B, 1, T, S])`."""
    config = self.config
    x, cache = carry[:2]
    post = config.norm_position == "post"
    dropout = nn.Dropout(config.dropout_rate, deterministic=self.deterministic)
    attention = Attention(config, causal=self.causal, name="attention")
    h = x if post else norm(config, "attention_norm")(x)
    if cache is None:
      h = attention(h, positions, mask, bias=bias)
    else:
      h, cache = attention(h, positions, mask, cache, bias=bias)
    x = x + dropout(h)
    if post:
      x = norm(config, "attention_norm")(x)
    if self.cross_attention:
      (encoded, cross_mask), cross_cache = cross, carry[2]
      cross_attention = Attention(config, cross=True, name="cross_attention")
      h = x if post else norm(config, "cross_attention_norm")(x)
      if cross_cache is None:
        h = cross_attention(h, positions, cross_mask, source=encoded)
      else:
        h, cross_cache = cross_attention(h, positions, cross_mask, cross_cache, source=encoded)
      x = x + dropout(h)
      if post:
        x = norm(config, "cross_attention_norm")(x)
    h = Mlp(config, name="mlp")(x if post else norm(config, "mlp_norm")(x))
    x = x + dropout(h)
    if post:
      x = norm(config, "mlp_norm")(x)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))
    return ((x, cache, cross_cache) if self.cross_attention else (x, cache)), None


def stacked_blocks(
  config: ModelConfig, deterministic: bool, name: str = "layers", cross_attention: bool = False, causal: bool = False
) -> nn.Module:
  """`num_layers` blocks as one `nn.scan` (compile time independent of depth), optionally rematerialised.

  Parameters get a leading `layers` axis of size L. Called as `stack((x, cache), positions, mask)` (and
  optionally `bias`, `cross`: see `TransformerBlock`, whose arguments are the same for every layer); the
  decoding cache (or None) travels in the carry, so each layer updates its own slots in place.
  """
  block = TransformerBlock
  if config.remat != "none":
    block = nn.remat(block, policy=_REMAT_POLICIES[config.remat], prevent_cse=False)
  stack = nn.scan(
    block,
    variable_axes={"params": 0},
    split_rngs={"params": True, "dropout": True},
    in_axes=nn.broadcast,
    length=config.num_layers,
    unroll=config.scan_unroll,
    metadata_params={nn.PARTITION_NAME: LAYERS},
  )
  return stack(config, deterministic, cross_attention, causal, name=name)
