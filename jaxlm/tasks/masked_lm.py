"""Masked language modelling (BERT, Devlin et al. 2019): predict tokens hidden from a bidirectional encoder.

Rows are packed documents, as for causal LM (`pipeline.lm_batches`). Of the tokens that are neither padding
nor special (pad, unk, bos, eos, reserved pieces), each is chosen for prediction with probability
`corruption.rate` (0.15); a chosen token becomes `[MASK]` 80% of the time, a random ordinary token 10% and
stays itself 10%. The loss and `masked_accuracy` are taken on the chosen tokens only. Masking happens on the
host in the data pipeline (`mask_tokens`), with grain's per-element random streams, so evaluation sees the
same masks every time and a resumed run the same masks as an uninterrupted one.

Shape legend: B batch, T length, V vocabulary.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import pipeline
from jaxlm.errors import check
from jaxlm.models.transformer import backbone
from jaxlm.tasks import base

MASK_PIECE = "[MASK]"
MASK_FRACTION, RANDOM_FRACTION = 0.8, 0.1  # of the chosen tokens; the remaining 10% keep their token


def mask_tokens(
  tokens: np.ndarray,
  segment_ids: np.ndarray,
  rng: np.random.Generator,
  *,
  rate: float,
  mask_id: int,
  ordinary_ids: np.ndarray,
) -> dict:
  """BERT's corruption of a batch [B, T]: {"tokens": corrupted, "targets": the originals, "masked": 1 where the
  loss is taken}. Only `ordinary_ids` (every id but the special and reserved ones) are ever chosen or drawn."""
  candidates = (segment_ids != 0) & np.isin(tokens, ordinary_ids)
  chosen = candidates & (rng.random(tokens.shape) < rate)
  kind = rng.random(tokens.shape)
  corrupted = np.where(chosen & (kind < MASK_FRACTION), mask_id, tokens)
  random_tokens = rng.choice(ordinary_ids, size=tokens.shape)
  corrupted = np.where(
    chosen & (kind >= MASK_FRACTION) & (kind < MASK_FRACTION + RANDOM_FRACTION), random_tokens, corrupted
  )
  return {"tokens": corrupted.astype(np.int32), "targets": tokens.astype(np.int32), "masked": chosen.astype(np.int32)}


@base.register("masked_lm")
@dataclasses.dataclass(frozen=True)
class MaskedLm(base.BaseTask):
  """Masked-token prediction on packed documents (encoder pretraining)."""

  rate: float = 0.15  # corruption.rate
  text_field: str = "text"
  seq_len: int = 256  # T
  dataset_name: str = ""
  shuffle_window: int = 0

  reserved_pieces = (MASK_PIECE,)

  @classmethod
  def check_config(cls, config) -> None:
    check(
      config.model.family == "encoder",
      "model.family",
      f"masked_lm trains an encoder; set model.family='encoder' (got {config.model.family!r}).",
    )
    check(0.0 < config.corruption.rate < 1.0, "corruption.rate", f"must be in (0, 1), got {config.corruption.rate}.")

  @classmethod
  def from_config(cls, config):
    data = config.data
    return cls(
      rate=config.corruption.rate,
      text_field=data.text_field,
      seq_len=data.seq_len,
      dataset_name=data.name,
      shuffle_window=data.shuffle_window,
    )

  def build_model(self, model_config):
    return backbone(model_config)

  def batches(self, source, tokenizer, *, batch_size, shuffle_seed, repeat, stream_index, stream_count):
    rows = pipeline.lm_batches(
      source,
      tokenizer,
      text_field=self.text_field,
      seq_len=self.seq_len,
      batch_size=batch_size,
      dataset_name=self.dataset_name,
      shuffle_seed=shuffle_seed,
      repeat=repeat,
      shuffle_window=self.shuffle_window if repeat else 0,
      stream_index=stream_index,
      stream_count=stream_count,
    )
    mask_id, ordinary = tokenizer.piece_id(MASK_PIECE), np.asarray(tokenizer.ordinary_ids(), np.int32)

    def corrupt(batch, rng):
      return {
        **batch,
        **mask_tokens(
          batch["tokens"], batch["segment_ids"], rng, rate=self.rate, mask_id=mask_id, ordinary_ids=ordinary
        ),
      }

    return rows.random_map(corrupt, seed=(shuffle_seed or 0) * 1009 + stream_index)

  def batch_shapes(self, rows):
    return {key: (rows, self.seq_len) for key in ("tokens", "segment_ids", "positions", "targets", "masked")}

  def random_batch(self, rows, vocab_size, rng):
    batch = super().random_batch(rows, vocab_size, rng)
    batch["targets"] = rng.integers(0, vocab_size, (rows, self.seq_len), dtype=np.int32)
    batch["masked"] = (rng.random((rows, self.seq_len)) < self.rate).astype(np.int32)
    return batch

  def weights(self, batch):
    return batch["masked"].astype(jnp.float32)

  def loss_sums(self, logits, batch, *, train):
    weights = self.weights(batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(log_probs, batch["targets"][..., None], axis=-1)[..., 0]
    loss_sum = jnp.sum(nll * weights)
    correct = jnp.argmax(logits, axis=-1) == batch["targets"]
    return loss_sum, {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": jnp.sum(correct * weights)}

  def summarize(self, sums):
    weight = max(float(sums["weight"]), 1.0)
    loss = float(sums["loss_sum"]) / weight
    return {
      "loss": loss,
      "perplexity": float(np.exp(min(loss, 80.0))),
      "masked_accuracy": float(sums["correct"]) / weight,
    }

  def predictions(self, logits, batch):
    """Per token: logits [B, T, V], the original token [B, T], 1 where it was chosen for prediction [B, T]."""
    return {"logits": logits, "labels": batch["targets"], "weights": self.weights(batch)}
