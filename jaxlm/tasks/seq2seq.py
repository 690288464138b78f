"""Sequence to sequence: prompt-masked fine-tuning of a decoder, or prompt-to-encoder / target-to-decoder
fine-tuning of an encoder-decoder (`model.family`).

Decoder: rows are `[bos] prompt separator target [eos]` (`pipeline.sft_example`); the
model reads the whole row, but only predictions of target tokens (and the
final eos) count: logits[t] is scored when `loss_mask[t + 1]` is 1.
Encoder-decoder: the encoder reads `[bos] prompt separator`, the decoder `[bos] target [eos]`
(`pipeline.encoder_decoder_example`), every target token and eos predicted; a model trained with another framing
says so in its config (an imported T5: the encoder reads `prompt separator </s>`, the decoder starts with pad:
`model.encoder_eos`, `model.decoder_start_id`; its tokenizer has no bos). Generation
quality is measured by greedy decoding from the prompt and comparing with the
reference: exact match and ROUGE-L F1 (`jaxlm.evaluation.metrics`), in the loop's test report.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np
from absl import logging

from jaxlm.data import pipeline
from jaxlm.errors import check
from jaxlm.evaluation import metrics
from jaxlm.models.transformer import backbone
from jaxlm.tasks import base, causal_lm, span_corruption


def target_weights(loss_mask) -> jnp.ndarray:
  """[B, T] float: 1 where logits[t] predict a target token (loss_mask[t + 1] = 1)."""
  return jnp.roll(loss_mask, -1, axis=1).at[:, -1].set(0).astype(jnp.float32)


@base.register("seq2seq")
@dataclasses.dataclass(frozen=True)
class Seq2Seq(causal_lm.CausalLm):
  """Next-token loss on the target tokens of padded prompt/target rows."""

  target_field: str = "target"  # record field with the target (text_field holds the prompt)
  separator: str = "\n"  # text between prompt and target (never truncated)
  truncation: str = "right"  # which end of a too-long prompt is cut: "right" (keep its start) or "left"
  encoder_decoder: bool = False  # model.family == "encoder_decoder"
  decoder_start_id: int = -1  # encoder-decoder: model.decoder_start_id (-1: the tokenizer's bos)
  encoder_eos: bool = False  # encoder-decoder: model.encoder_eos (the encoder reads the prompt, then eos)

  @classmethod
  def check_config(cls, config) -> None:
    check(
      config.model.family in ("decoder", "encoder_decoder"),
      "model.family",
      f"seq2seq trains a decoder or an encoder_decoder, not {config.model.family!r}.",
    )

  @classmethod
  def from_config(cls, config):
    data = config.data
    return cls(
      text_field=data.text_field,
      seq_len=data.seq_len,
      dataset_name=data.name,
      target_field=data.target_field,
      separator=data.separator,
      truncation=data.truncation,
      encoder_decoder=config.model.family == "encoder_decoder",
      decoder_start_id=config.model.decoder_start_id,
      encoder_eos=config.model.encoder_eos,
    )

  def build_model(self, model_config):
    return backbone(model_config)

  def encode(self, tokenizer, record, index):
    args = (
      tokenizer,
      pipeline.record_text(record, self.text_field, index, self.dataset_name),
      pipeline.record_text(record, self.target_field, index, self.dataset_name),
      self.seq_len,
      self.truncation,
      self.separator,
    )
    if not self.encoder_decoder:
      return pipeline.sft_example(*args)
    return pipeline.encoder_decoder_example(
      *args,
      decoder_start_id=pipeline.decoder_start_id(tokenizer, self.decoder_start_id),
      encoder_eos=self.encoder_eos,
    )

  def logits(self, model, params, batch, *, train, rng=None):
    if self.encoder_decoder:
      return span_corruption.encoder_decoder_logits(model, params, batch, train=train, rng=rng)
    return super().logits(model, params, batch, train=train, rng=rng)

  def batches(self, source, tokenizer, *, batch_size, shuffle_seed, repeat, stream_index, stream_count):
    return pipeline.padded_batches(
      source,
      lambda index, record: self.encode(tokenizer, record, index),
      batch_size=batch_size,
      shuffle_seed=shuffle_seed,
      repeat=repeat,
      stream_index=stream_index,
      stream_count=stream_count,
    )

  def batch_shapes(self, rows):
    keys = ("tokens", "segment_ids", "positions", "loss_mask")
    if self.encoder_decoder:
      keys += ("encoder_tokens", "encoder_segment_ids", "encoder_positions")
    return {key: (rows, self.seq_len) for key in keys}

  def random_batch(self, rows, vocab_size, rng):
    """Every decoder token a target (`loss_mask` 1)."""
    return {**super().random_batch(rows, vocab_size, rng), "loss_mask": np.ones((rows, self.seq_len), np.int32)}

  def weights(self, batch):
    return target_weights(batch["loss_mask"])

  def baselines(self, batches):
    return {}

  def prompt_text(self, tokenizer, record, index) -> str:
    """The text a generation continues (framed by `generate` as in training): the row's prompt, truncated as in
    training, and the separator."""
    row = self.encode(tokenizer, record, index)
    if self.encoder_decoder:
      return tokenizer.decode(row["encoder_tokens"][row["encoder_segment_ids"] != 0])
    return tokenizer.decode(row["tokens"][: int(row["loss_mask"].argmax())])

  def test_report(self, *, source, tokenizer, generate, max_examples, max_new_tokens) -> dict:
    """Greedy outputs for the first `max_examples` examples of `source` against their targets: exact match,
    ROUGE-L F1, corpus BLEU and the examples themselves (nothing when `max_examples` is 0)."""
    if not max_examples:
      return {}
    records = [(index, source[index]) for index in range(min(max_examples, len(source)))]
    outputs = generate([self.prompt_text(tokenizer, record, index) for index, record in records], max_new_tokens)
    generated = [output.text.strip() for output in outputs]
    references = [
      pipeline.record_text(record, self.target_field, index, self.dataset_name).strip() for index, record in records
    ]
    scores = {
      "exact_match": metrics.exact_match(generated, references),
      "rouge_l": metrics.rouge_l(generated, references),
      "bleu": metrics.bleu(generated, references),
    }
    logging.info("test generation over %d examples: %s", len(records), scores)
    return {
      "generation": {**scores, "examples": [{"reference": r, "generated": g} for r, g in zip(references, generated)]}
    }
