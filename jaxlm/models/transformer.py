"""Transformer models built from the blocks in `layers.py`: the three families of `model.family`.

- `Decoder` (GPT-2, Llama): causal self-attention; next-token logits.
- `Encoder` (BERT): bidirectional self-attention over padded or packed rows; MLM logits, hidden states or the
  pooled first token.
- `EncoderDecoder` (T5, the original Transformer): an encoder stack and a causal decoder stack that
  cross-attends to the encoder output, sharing the token embedding.

Parameter names follow one layout so that Hugging Face BERT/T5 weights map with a small table:
`token_embed`, `position_embed`, `type_embed`, `embed_norm`, then per stack (`encoder/`, `decoder/`)
`layers/{attention,cross_attention}/{query,key,value,out}`, `layers/mlp/{up,gate,down}`,
`layers/{attention,cross_attention,mlp}_norm` (stacked over a leading layer axis), `final_norm`,
`relative_bias/embedding`; heads `pooler`, `mlm_transform`, `mlm_norm`, `mlm_bias`, `lm_head`.

Shape legend: B batch, T length (decoder), S source length (encoder), D model width, V vocabulary,
L layers, K key/value heads, H head dim.
"""

import dataclasses

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jaxlm.errors import ConfigError
from jaxlm.models import layers, lora
from jaxlm.models.config import ModelConfig
from jaxlm.sharding import BATCH, EMBED, LENGTH, POSITION, VOCAB


class Decoder(nn.Module):
  """Decoder-only language model (GPT-2 / Llama style).

  Documents packed into one row are kept apart by `segment_ids`: a token
  attends only to earlier tokens of its own segment. Decoding passes a
  `layers.KVCache` instead, which supplies positions and mask.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    deterministic: bool = True,
    cache: layers.KVCache | None = None,
    return_hidden: bool = False,
  ):
    """tokens, positions, segment_ids: [B, T] int -> logits [B, T, V] (compute dtype).

    With a `cache`: `tokens` are written from slot `cache.index` (the whole left-padded prompt,
    then one token per step) and the result is `(logits, cache advanced by T)`.
    `return_hidden=True` returns the final-norm hidden states [B, T, D] instead of logits (for task heads).
    """
    config = self.config
    if cache is not None:
      positions, mask = cache.positions_and_mask(tokens.shape[1])
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)

    embed = token_embedding(config)
    x = embed(tokens)  # [B, T, D]
    if config.position == "learned":
      x += nn.Embed(
        config.max_len,
        config.embed_dim,
        embedding_init=layers.weight_init(config.init_std, (POSITION, EMBED)),
        dtype=config.compute_dtype,
        param_dtype=config.weight_dtype,
        name="position_embed",
      )(positions)
    x = nn.Dropout(config.dropout_rate, deterministic=deterministic)(x)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))

    if cache is None:
      # The flash kernel builds each block's mask from the segment ids; the others take a dense mask.
      mask = segment_ids if layers.uses_segment_ids(config) else layers.attention_mask(segment_ids, segment_ids, True)
      (x, _), _ = layers.stacked_blocks(config, deterministic, causal=True)((x, None), positions, mask)
    else:
      layer_cache = (cache.key, cache.value, jnp.zeros((), jnp.int32), cache.index)
      (x, (key, value, _, _)), _ = layers.stacked_blocks(config, deterministic, causal=True)(
        (x, layer_cache), positions, mask
      )
      cache = cache.replace(key=key, value=value, index=cache.index + tokens.shape[1])
    x = layers.norm(config, "final_norm")(x)
    if return_hidden:
      return x

    if config.tie_embeddings:
      logits = embed.attend(x)
    else:
      logits = lm_head(config)(x)
    logits = nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB))
    return logits if cache is None else (logits, cache)


class TokenEmbed(nn.Embed):
  """`nn.Embed` (the same parameters) whose `attend`, the tied output projection [..., D] -> [..., V], runs on all
  leading axes merged into one: the same numbers, and XLA then computes the embedding's gradient from the logits'
  gradient as it is, where [B, T, D] contracted over B and T first copies that gradient transposed to [V, B, T]
  (on CPU the largest copy of the train step at V = 4k, and a second pass over it)."""

  def attend(self, query: jax.Array) -> jax.Array:
    return super().attend(query.reshape(-1, query.shape[-1])).reshape(*query.shape[:-1], self.num_embeddings)


def token_embedding(config: ModelConfig, name: str | None = "token_embed") -> TokenEmbed:
  init = layers.weight_init(config.init_std, (VOCAB, EMBED))
  return TokenEmbed(
    config.vocab_size,
    config.embed_dim,
    embedding_init=init,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    name=name,
  )


def position_embedding(config: ModelConfig, name: str | None = "position_embed") -> nn.Embed:
  """The learned position table: max_len rows after `position_offset` leading ones (RoBERTa's)."""
  init = layers.weight_init(config.init_std, (POSITION, EMBED))
  return nn.Embed(
    config.max_len + config.position_offset,
    config.embed_dim,
    embedding_init=init,
    dtype=config.compute_dtype,
    param_dtype=config.weight_dtype,
    name=name,
  )


class Stack(nn.Module):
  """The blocks of an encoder (bidirectional) or a decoder (causal, cross-attending to an encoder output when
  `cross_attention`), then the final norm (pre-norm blocks only: post-norm blocks end normalised). With
  `position = "relative"` the stack owns T5's relative position bias, computed once and shared by its layers.
  """

  config: ModelConfig
  causal: bool
  cross_attention: bool = False

  @nn.compact
  def __call__(
    self,
    x,
    positions,
    segment_ids,
    deterministic: bool = True,
    encoded=None,
    encoder_segment_ids=None,
    cache: layers.KVCache | None = None,
    cross_cache=None,
  ):
    """x [B, T, D], positions and segment_ids [B, T] -> [B, T, D].

    Cross-attention reads `encoded` [B, S, D] where `encoder_segment_ids` [B, S] equals the query's segment
    id (packed rows: segment k of the decoder reads segment k of the encoder; padding reads nothing real).
    Decoding: `cache` (the self-attention KVCache, which then supplies positions and mask) and `cross_cache`
    `(keys, values)` [L, B, K, S, H]: written from `encoded` at prefill, read when `encoded` is None; the
    result is then `(x, cache, cross_cache)`.
    """
    config = self.config
    if cache is None:
      mask = layers.attention_mask(segment_ids, segment_ids, causal=self.causal)
      key_positions = positions
    else:
      positions, mask = cache.positions_and_mask(x.shape[1])
      key_positions = jnp.arange(cache.key.shape[3])[None, :] - cache.start[:, None]
    bias = None
    if config.position == "relative":
      bias = layers.RelativePositionBias(config, bidirectional=not self.causal, name="relative_bias")(
        positions, key_positions
      )
    cross = None
    if self.cross_attention:
      cross = (encoded, layers.attention_mask(segment_ids, encoder_segment_ids, causal=False))
    blocks = layers.stacked_blocks(config, deterministic, cross_attention=self.cross_attention, causal=self.causal)
    layer_cache = None if cache is None else (cache.key, cache.value, jnp.zeros((), jnp.int32), cache.index)
    carry = (x, layer_cache)
    if self.cross_attention:
      carry += (None if cross_cache is None else (*cross_cache, jnp.zeros((), jnp.int32)),)
    carry, _ = blocks(carry, positions, mask, bias, cross)
    x = carry[0]
    if config.norm_position == "pre":
      x = layers.norm(config, "final_norm")(x)
    if cache is None:
      return x
    key, value, _, _ = carry[1]
    cache = cache.replace(key=key, value=value, index=cache.index + x.shape[1])
    return x, cache, (None if cross_cache is None else carry[2][:2])


def embed(config: ModelConfig, token_embed: TokenEmbed, tokens, positions, token_types, deterministic: bool):
  """Token (+ learned position) (+ token type) embeddings (-> embedding norm) -> dropout: [B, T, D].

  Creates `position_embed`, `type_embed` and `embed_norm` in the calling module as the config asks.
  """
  x = token_embed(tokens)
  if config.position == "learned":
    x += position_embedding(config)(positions + config.position_offset)
  if config.type_vocab_size:
    token_types = jnp.zeros_like(tokens) if token_types is None else token_types
    x += nn.Embed(
      config.type_vocab_size,
      config.embed_dim,
      embedding_init=layers.weight_init(config.init_std, (None, EMBED)),
      dtype=config.compute_dtype,
      param_dtype=config.weight_dtype,
      name="type_embed",
    )(token_types)
  if config.embed_norm:
    x = layers.norm(config, "embed_norm")(x)
  x = nn.Dropout(config.dropout_rate, deterministic=deterministic)(x)
  return nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))


class Encoder(nn.Module):
  """Bidirectional encoder (BERT-style): every token attends to every token of its segment, before and after
  it; padding (segment id 0) is seen by padding only.

  Always builds (so that checkpoints restore across pretraining and fine-tuning) the MLM head of BERT:
  dense + activation + norm, then the tied embedding transposed plus a bias; and, with `model.pooler`,
  the pooler: dense + tanh on the first token.
  """

  config: ModelConfig

  @nn.compact
  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    deterministic: bool = True,
    return_hidden: bool = False,
    return_pooled: bool = False,
    token_types=None,
  ):
    """tokens, positions, segment_ids, token_types: [B, T] int -> MLM logits [B, T, V] (compute dtype);
    `return_hidden`: the hidden states [B, T, D]; `return_pooled`: the pooler's output [B, D]."""
    config = self.config
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    if segment_ids is None:
      segment_ids = jnp.ones_like(tokens)
    token_embed = token_embedding(config)
    x = embed(config, token_embed, tokens, positions, token_types, deterministic)
    x = Stack(config, causal=False, name="encoder")(x, positions, segment_ids, deterministic)

    pooled = None
    if config.pooler:
      pooled = layers.Einsum(
        config, "BTD,DE->BTE", (config.embed_dim, config.embed_dim), (EMBED, None), config.init_std, name="pooler"
      )(x[:, :1])
      pooled = jnp.tanh(pooled[:, 0])
    h = layers.Einsum(
      config, "BTD,DE->BTE", (config.embed_dim, config.embed_dim), (EMBED, None), config.init_std, name="mlm_transform"
    )(x)
    h = layers.norm(config, "mlm_norm")(layers.activation(config)(h))
    mlm_bias = self.param("mlm_bias", layers.zeros_init((VOCAB,)), (config.vocab_size,), config.weight_dtype)
    logits = nn.with_logical_constraint(
      token_embed.attend(h) + mlm_bias.astype(config.compute_dtype), (BATCH, LENGTH, VOCAB)
    )
    if return_pooled:
      if pooled is None:
        raise ValueError("return_pooled needs model.pooler = True (classification.pooling='pooler').")
      return pooled
    return x if return_hidden else logits


class EncoderDecoderCache(flax.struct.PyTreeNode):
  """What decoding an encoder-decoder keeps: the decoder's self-attention KVCache, every decoder layer's
  cross-attention keys and values of the encoder output (computed once, at prefill), and the encoder's
  segment ids (its padding mask)."""

  decoder: layers.KVCache
  cross_key: jax.Array  # [L, B, K, S, H]
  cross_value: jax.Array  # [L, B, K, S, H]
  encoder_segment_ids: jax.Array  # [B, S], 0 = padding

  def take(self, rows: jax.Array) -> "EncoderDecoderCache":
    """The cache of rows `rows` ([B'] indices), e.g. the surviving beams."""
    cross = [
      nn.with_logical_constraint(jnp.take(x, rows, axis=1), layers.KVCache.AXES)
      for x in (self.cross_key, self.cross_value)
    ]
    return EncoderDecoderCache(self.decoder.take(rows), *cross, self.encoder_segment_ids[rows])


class EncoderDecoder(nn.Module):
  """Encoder-decoder (T5, the original Transformer): the encoder reads the source, the causal decoder reads
  the target so far and cross-attends to the encoder output; the token embedding is shared, the output head
  is the embedding transposed (times D**-0.5 with `tied_logits_scale`, T5) or its own `lm_head`."""

  config: ModelConfig

  def setup(self):
    config = self.config
    self.token_embed = token_embedding(config, name=None)
    if config.position == "learned":
      self.position_embed = position_embedding(config, name=None)
    self.dropout = nn.Dropout(config.dropout_rate)
    self.encoder = Stack(config, causal=False)
    self.decoder = Stack(
      dataclasses.replace(config, num_layers=config.decoder_layers), causal=True, cross_attention=True
    )
    if not config.tie_embeddings:
      self.lm_head = layers.Einsum(
        config, "BTD,DV->BTV", (config.embed_dim, config.vocab_size), (EMBED, VOCAB), config.init_std, bias=False
      )

  def _embed(self, tokens, positions, deterministic):
    x = self.token_embed(tokens)
    if self.config.position == "learned":
      x += self.position_embed(positions + self.config.position_offset)
    return nn.with_logical_constraint(self.dropout(x, deterministic=deterministic), (BATCH, LENGTH, EMBED))

  def _logits(self, x):
    config = self.config
    if config.tie_embeddings:
      logits = self.token_embed.attend(x * config.embed_dim**-0.5 if config.tied_logits_scale else x)
    else:
      logits = self.lm_head(x)
    return nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB))

  def encode(self, tokens, positions=None, segment_ids=None, deterministic: bool = True):
    """Source tokens, positions, segment ids [B, S] -> encoder output [B, S, D]."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    return self.encoder(self._embed(tokens, positions, deterministic), positions, segment_ids, deterministic)

  def __call__(
    self,
    tokens,
    positions=None,
    segment_ids=None,
    deterministic: bool = True,
    *,
    encoder_tokens=None,
    encoder_positions=None,
    encoder_segment_ids=None,
    return_hidden: bool = False,
  ):
    """Decoder tokens, positions, segment_ids [B, T] and source `encoder_*` [B, S] -> logits [B, T, V]
    (or the decoder's hidden states [B, T, D]). Without `encoder_tokens` (parameter init) the decoder
    tokens are also the source."""
    if encoder_tokens is None:
      encoder_tokens, encoder_positions, encoder_segment_ids = tokens, positions, segment_ids
    encoder_segment_ids = jnp.ones_like(encoder_tokens) if encoder_segment_ids is None else encoder_segment_ids
    encoded = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids, deterministic)
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape) if positions is None else positions
    segment_ids = jnp.ones_like(tokens) if segment_ids is None else segment_ids
    x = self.decoder(
      self._embed(tokens, positions, deterministic), positions, segment_ids, deterministic, encoded, encoder_segment_ids
    )
    return x if return_hidden else self._logits(x)

  def prefill(self, encoder_tokens, encoder_positions, encoder_segment_ids, tokens, length: int):
    """Runs the encoder once and the decoder on its first tokens [B, T0]: (logits [B, T0, V], an
    EncoderDecoderCache with `length` decoder slots holding the cross-attention keys/values of every layer)."""
    config = self.config
    encoded = self.encode(encoder_tokens, encoder_positions, encoder_segment_ids)
    start = jnp.zeros((tokens.shape[0],), jnp.int32)
    self_cache = layers.KVCache.create(dataclasses.replace(config, num_layers=config.decoder_layers), start, length)
    shape = (config.decoder_layers, tokens.shape[0], config.num_kv_heads, encoder_tokens.shape[1], config.head_dim)
    zeros = nn.with_logical_constraint(jnp.zeros(shape, config.compute_dtype), layers.KVCache.AXES)
    cache = EncoderDecoderCache(self_cache, zeros, zeros, encoder_segment_ids)
    return self.step(tokens, cache, encoded)

  def step(self, tokens, cache: EncoderDecoderCache, encoded=None):
    """Decoder tokens [B, T] written from slot `cache.decoder.index` -> (logits [B, T, V], advanced cache)."""
    positions, _ = cache.decoder.positions_and_mask(tokens.shape[1])
    x = self._embed(tokens, positions, True)
    segment_ids = jnp.ones_like(tokens)
    x, decoder_cache, (cross_key, cross_value) = self.decoder(
      x,
      None,
      segment_ids,
      True,
      encoded,
      cache.encoder_segment_ids,
      cache=cache.decoder,
      cross_cache=(cache.cross_key, cache.cross_value),
    )
    cache = cache.replace(decoder=decoder_cache, cross_key=cross_key, cross_value=cross_value)
    return self._logits(x), cache


FAMILIES = {"decoder": Decoder, "encoder": Encoder, "encoder_decoder": EncoderDecoder}


def backbone(model_config: ModelConfig) -> nn.Module:
  """The module of `model.family`: what a task builds (alone, or under a head)."""
  return FAMILIES[model_config.family](model_config)


def lm_head(config: ModelConfig) -> layers.Einsum:
  """The untied output projection [B, T, D] -> [B, T, V] (parameters `lm_head/kernel`)."""
  return layers.Einsum(
    config,
    "BTD,DV->BTV",
    (config.embed_dim, config.vocab_size),
    (EMBED, VOCAB),
    config.init_std,
    bias=False,
    name="lm_head",
  )


def unembed(config: ModelConfig, params, hidden):
  """The Decoder's output projection alone: final hidden states [B, T, D] -> logits [B, T, V] (compute dtype),
  the same operations on the same parameters as the end of `Decoder.__call__`.

  For losses that project a few positions at a time and never hold all [B, T, V] logits
  (`jaxlm.tasks.causal_lm.chunked_next_token_sums`); hidden states come from `return_hidden=True`.
  """
  if config.tie_embeddings:
    return token_embedding(config).apply({"params": params["token_embed"]}, hidden, method="attend")
  if config.lora_rank and lora.is_target(config, ("lm_head",)):
    raise ConfigError(
      "model.loss_chunk_size: the chunked loss projects with the base lm_head kernel, and "
      f"model.lora_targets={config.lora_targets!r} adapts it; merge the adapters, leave lm_head "
      "out of lora_targets, or set model.loss_chunk_size=0."
    )
  return lm_head(config).apply({"params": params["lm_head"]}, hidden)
