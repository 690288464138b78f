"""Transformer models built from the blocks in `layers.py`.

Shape legend: B batch, T length, D model width, V vocabulary.
"""

import flax.linen as nn
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
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
               cache: layers.KVCache | None = None, return_hidden: bool = False):
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

    embed = token_embed(config)
    x = embed(tokens)  # [B, T, D]
    if config.position == "learned":
      x += nn.Embed(
          config.max_len, config.embed_dim, embedding_init=layers.weight_init(config.init_std, (POSITION, EMBED)),
          dtype=config.compute_dtype, param_dtype=config.weight_dtype, name="position_embed")(positions)
    x = nn.Dropout(config.dropout_rate, deterministic=deterministic)(x)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))

    if cache is None:
      # The flash kernel builds each block's mask from the segment ids; the others take a dense mask.
      mask = segment_ids if layers.uses_segment_ids(config) else layers.attention_mask(segment_ids, segment_ids, True)
      (x, _), _ = layers.stacked_blocks(config, deterministic)((x, None), positions, mask)
    else:
      layer_cache = (cache.key, cache.value, jnp.zeros((), jnp.int32), cache.index)
      (x, (key, value, _, _)), _ = layers.stacked_blocks(config, deterministic)((x, layer_cache), positions, mask)
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


def token_embed(config: ModelConfig) -> nn.Embed:
  """The token embedding table [V, D] (parameters `token_embed/embedding`); tied, also the output projection."""
  init = layers.weight_init(config.init_std, (VOCAB, EMBED))
  return nn.Embed(config.vocab_size, config.embed_dim, embedding_init=init, dtype=config.compute_dtype,
                  param_dtype=config.weight_dtype, name="token_embed")


def lm_head(config: ModelConfig) -> layers.Einsum:
  """The untied output projection [B, T, D] -> [B, T, V] (parameters `lm_head/kernel`)."""
  return layers.Einsum(config, "BTD,DV->BTV", (config.embed_dim, config.vocab_size), (EMBED, VOCAB), config.init_std,
                       bias=False, name="lm_head")


def unembed(config: ModelConfig, params, hidden):
  """The Decoder's output projection alone: final hidden states [B, T, D] -> logits [B, T, V] (compute dtype),
  the same operations on the same parameters as the end of `Decoder.__call__`.

  For losses that project a few positions at a time and never hold all [B, T, V] logits
  (`jaxlm.tasks.causal_lm.chunked_next_token_sums`); hidden states come from `return_hidden=True`.
  """
  if config.tie_embeddings:
    return token_embed(config).apply({"params": params["token_embed"]}, hidden, method="attend")
  if config.lora_rank and lora.is_target(config, ("lm_head",)):
    raise ConfigError("model.loss_chunk_size: the chunked loss projects with the base lm_head kernel, and "
                      f"model.lora_targets={config.lora_targets!r} adapts it; merge the adapters, leave lm_head "
                      "out of lora_targets, or set model.loss_chunk_size=0.")
  return lm_head(config).apply({"params": params["lm_head"]}, hidden)
