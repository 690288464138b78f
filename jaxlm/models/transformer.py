"""Transformer models built from the blocks in `layers.py`.

Shape legend: B batch, T length, D model width, V vocabulary.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import layers
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

    token_embed = nn.Embed(
        config.vocab_size, config.embed_dim, embedding_init=layers.weight_init(config.init_std, (VOCAB, EMBED)),
        dtype=config.compute_dtype, param_dtype=config.weight_dtype, name="token_embed")
    x = token_embed(tokens)  # [B, T, D]
    if config.position == "learned":
      x += nn.Embed(
          config.max_len, config.embed_dim, embedding_init=layers.weight_init(config.init_std, (POSITION, EMBED)),
          dtype=config.compute_dtype, param_dtype=config.weight_dtype, name="position_embed")(positions)
    x = nn.Dropout(config.dropout_rate, deterministic=deterministic)(x)
    x = nn.with_logical_constraint(x, (BATCH, LENGTH, EMBED))

    if cache is None:
      mask = layers.attention_mask(segment_ids, segment_ids, causal=True)
      (x, _), _ = layers.stacked_blocks(config, deterministic)((x, None), positions, mask)
    else:
      layer_cache = (cache.key, cache.value, jnp.zeros((), jnp.int32), cache.index)
      (x, (key, value, _, _)), _ = layers.stacked_blocks(config, deterministic)((x, layer_cache), positions, mask)
      cache = cache.replace(key=key, value=value, index=cache.index + tokens.shape[1])
    x = layers.norm(config, "final_norm")(x)
    if return_hidden:
      return x

    if config.tie_embeddings:
      logits = token_embed.attend(x)
    else:
      lm_head = layers.Einsum(config, "BTD,DV->BTV", (config.embed_dim, config.vocab_size), (EMBED, VOCAB),
                              config.init_std, bias=False, name="lm_head")
      logits = lm_head(x)
    logits = nn.with_logical_constraint(logits, (BATCH, LENGTH, VOCAB))
    return logits if cache is None else (logits, cache)
