"""Task heads on top of any backbone that returns hidden states `[B, T, D]`.

Pooling lives here, in one place, so that decoders now and encoders later
share it: the backbone only has to accept `return_hidden=True`.

Shape legend: B batch, T length, D model width, C classes.
"""

import flax.linen as nn
import jax.numpy as jnp

from jaxlm.models import layers
from jaxlm.models.config import ModelConfig
from jaxlm.sharding import EMBED

POOLINGS = ("last", "first", "mean", "pooler")


def pool(hidden, mask, method: str):
  """hidden [B, T, D], mask [B, T] (nonzero = token) -> [B, D].

  "last": the last token of the mask (a causal decoder's summary of the whole row);
  "first": the first token (an encoder's [CLS]); "mean": the masked mean. ("pooler", the encoder's own
  pooled vector, is the backbone's: see `SequenceClassifier`.)
  """
  mask = mask != 0
  length = mask.shape[1]
  if method == "mean":
    weights = mask.astype(hidden.dtype)[..., None]
    return (hidden * weights).sum(axis=1) / jnp.maximum(weights.sum(axis=1), 1.0)
  if method == "first":
    index = jnp.argmax(mask, axis=1)
  elif method == "last":
    index = length - 1 - jnp.argmax(mask[:, ::-1], axis=1)
  else:
    raise ValueError(f"Unknown pooling {method!r}; use one of {POOLINGS}.")
  return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]


class ClassificationHead(nn.Module):
  """pooled [B, D] -> dropout -> linear: logits [B, C] (float32)."""

  config: ModelConfig  # the backbone's (width, dtypes, dropout, init)
  num_classes: int  # C

  @nn.compact
  def __call__(self, pooled, deterministic: bool = True):
    config = self.config
    pooled = nn.Dropout(config.dropout_rate, deterministic=deterministic)(pooled)
    kernel = self.param(
      "kernel",
      layers.weight_init(config.init_std, (EMBED, None)),
      (config.embed_dim, self.num_classes),
      config.weight_dtype,
    )
    bias = self.param("bias", layers.zeros_init((None,)), (self.num_classes,), config.weight_dtype)
    return pooled.astype(jnp.float32) @ kernel.astype(jnp.float32) + bias.astype(jnp.float32)


class SequenceClassifier(nn.Module):
  """backbone -> pooled hidden state -> ClassificationHead: logits [B, C].

  Parameters: `backbone/...` (those of the backbone alone, so that a pretrained
  backbone restores into them) and `head/kernel` [D, C], `head/bias` [C].
  """

  backbone: nn.Module  # called as backbone(tokens, positions, segment_ids, deterministic=, return_hidden=True)
  # (pooling "pooler": return_pooled=True, an Encoder with model.pooler)
  config: ModelConfig  # the backbone's
  num_classes: int  # C
  pooling: str = "last"  # one of POOLINGS

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True):
    """tokens, positions, segment_ids: [B, T] int -> logits [B, C] (float32)."""
    if self.pooling == "pooler":
      pooled = self.backbone(tokens, positions, segment_ids, deterministic=deterministic, return_pooled=True)
    else:
      hidden = self.backbone(tokens, positions, segment_ids, deterministic=deterministic, return_hidden=True)
      pooled = pool(hidden, jnp.ones_like(tokens) if segment_ids is None else segment_ids, self.pooling)
    return ClassificationHead(self.config, self.num_classes, name="head")(pooled, deterministic)
