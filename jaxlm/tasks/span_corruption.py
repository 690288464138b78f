"""T5's span corruption (Raffel et al. 2020): an encoder-decoder restores spans dropped from its input.

Documents are concatenated and cut into chunks of `tokens_length` tokens (as T5's `reduce_concat_tokens` +
`split_tokens`: one chunk is one example). In each chunk a fraction `corruption.rate` (0.15) of the tokens,
in spans of mean length `corruption.mean_span_length` (3), is noise (`random_spans_noise_mask`, T5's
algorithm). The encoder reads the chunk with each noise span replaced by one sentinel (`<extra_id_0>`,
`<extra_id_1>`, ... in order) and eos; the decoder reads its start token (`model.decoder_start_id`: the
tokenizer's bos, or T5's pad) then, for each span, its sentinel and its tokens, then eos, and predicts each next
token. `tokens_length` is the longest chunk whose corrupted input
fits `data.seq_len` (T5's `random_spans_helper`); the decoder length follows from it. Metric: token accuracy
of the targets. Sentinels are pieces reserved in the tokenizer, so no text ever encodes to them.

Shape legend: B batch, S encoder length (data.seq_len), T decoder length.
"""

import dataclasses

import jax.numpy as jnp
import numpy as np

from jaxlm.data import pipeline
from jaxlm.errors import check
from jaxlm.models.transformer import backbone
from jaxlm.tasks import base, causal_lm


def sentinel_pieces(count: int) -> tuple[str, ...]:
  return tuple(f"<extra_id_{i}>" for i in range(count))


def corrupted_lengths(tokens_length: int, noise_density: float, mean_span_length: float) -> tuple[int, int, int]:
  """Of a chunk of `tokens_length` tokens: (inputs length with eos, targets length with eos, noise spans)."""
  num_noise = min(max(round(tokens_length * noise_density), 1), tokens_length - 1)
  num_spans = max(round(num_noise / mean_span_length), 1)
  return tokens_length - num_noise + num_spans + 1, num_noise + num_spans + 1, num_spans


def chunk_length(inputs_length: int, noise_density: float, mean_span_length: float) -> int:
  """The longest chunk whose corrupted input (with eos) fits `inputs_length` (T5's `random_spans_helper`)."""
  length = 2
  while corrupted_lengths(length + 1, noise_density, mean_span_length)[0] <= inputs_length:
    length += 1
  return length


def random_spans_noise_mask(
  length: int, noise_density: float, mean_span_length: float, rng: np.random.Generator
) -> np.ndarray:
  """Boolean [length]: True on noise. Noise and non-noise alternate in spans (non-noise first), the span
  lengths drawn as random segmentations of the token counts (T5's algorithm)."""
  _, _, num_spans = corrupted_lengths(length, noise_density, mean_span_length)
  num_noise = min(max(round(length * noise_density), 1), length - 1)

  def segment_lengths(num_items, num_segments):
    first = np.concatenate([[False], rng.permutation(np.arange(num_items - 1) < num_segments - 1)])
    return np.bincount(np.cumsum(first), minlength=num_segments)

  spans = np.stack([segment_lengths(length - num_noise, num_spans), segment_lengths(num_noise, num_spans)], axis=1)
  return np.repeat(np.tile([False, True], num_spans), spans.reshape(-1))


def corrupt(tokens: np.ndarray, noise: np.ndarray, sentinel_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(inputs, targets) without eos: each noise span becomes its sentinel in the inputs; the targets are, span
  after span, its sentinel and its tokens."""
  starts = noise & ~np.concatenate([[False], noise[:-1]])
  span = np.cumsum(starts) - 1  # the span a noise token belongs to
  inputs = np.where(starts, sentinel_ids[np.maximum(span, 0)], tokens)[~noise | starts]
  targets = np.insert(tokens[noise], np.flatnonzero(starts[noise]), sentinel_ids[: int(starts.sum())])
  return inputs.astype(np.int32), targets.astype(np.int32)


@base.register("span_corruption")
@dataclasses.dataclass(frozen=True)
class SpanCorruption(base.BaseTask):
  """Span-corruption pretraining of an encoder-decoder on concatenated documents."""

  noise_density: float = 0.15
  mean_span_length: float = 3.0
  num_sentinels: int = 100
  text_field: str = "text"
  seq_len: int = 256  # S: encoder input length
  dataset_name: str = ""
  shuffle_window: int = 0
  decoder_start_id: int = -1  # model.decoder_start_id (-1: the tokenizer's bos)

  generates_text = True

  @classmethod
  def check_config(cls, config) -> None:
    options = config.corruption
    check(
      config.model.family == "encoder_decoder",
      "model.family",
      f"span_corruption trains an encoder-decoder; set model.family='encoder_decoder' (got {config.model.family!r}).",
    )
    check(0.0 < options.rate < 0.5, "corruption.rate", f"must be in (0, 0.5), got {options.rate}.")
    check(options.mean_span_length >= 1, "corruption.mean_span_length", "must be >= 1.")
    length = chunk_length(config.data.seq_len, options.rate, options.mean_span_length)
    _, targets, spans = corrupted_lengths(length, options.rate, options.mean_span_length)
    check(
      spans <= options.num_sentinels,
      "corruption.num_sentinels",
      f"{options.num_sentinels} sentinels for rows of {spans} spans; raise it to at least {spans}.",
    )
    check(
      targets + 1 <= config.model.max_len,
      "model.max_len",
      f"the decoder reads {targets + 1} tokens; raise model.max_len.",
    )

  @classmethod
  def from_config(cls, config):
    data, options = config.data, config.corruption
    return cls(
      noise_density=options.rate,
      mean_span_length=options.mean_span_length,
      num_sentinels=options.num_sentinels,
      text_field=data.text_field,
      seq_len=data.seq_len,
      dataset_name=data.name,
      shuffle_window=data.shuffle_window,
      decoder_start_id=config.model.decoder_start_id,
    )

  @property
  def reserved_pieces(self):
    return sentinel_pieces(self.num_sentinels)

  @property
  def lengths(self) -> tuple[int, int]:
    """(chunk length, decoder length: start token + targets + eos)."""
    length = chunk_length(self.seq_len, self.noise_density, self.mean_span_length)
    return length, corrupted_lengths(length, self.noise_density, self.mean_span_length)[1] + 1

  def build_model(self, model_config):
    return backbone(model_config)

  def example(self, tokens: np.ndarray, rng: np.random.Generator, tokenizer_ids: tuple[int, int, np.ndarray]) -> dict:
    """One padded encoder/decoder example of a chunk (all padding for an empty chunk)."""
    start, eos, sentinels = tokenizer_ids
    decoder_length = self.lengths[1]
    if len(tokens) < 2:
      return {
        **{f"encoder_{key}": value for key, value in pipeline.padded_row([], self.seq_len).items()},
        **pipeline.padded_row([], decoder_length),
      }
    noise = random_spans_noise_mask(len(tokens), self.noise_density, self.mean_span_length, rng)
    inputs, targets = corrupt(tokens, noise, sentinels)
    encoder = pipeline.padded_row([*inputs, eos], self.seq_len)
    return {
      **{f"encoder_{key}": value for key, value in encoder.items()},
      **pipeline.padded_row([start, *targets, eos], decoder_length),
    }

  def batches(self, source, tokenizer, *, batch_size, shuffle_seed, repeat, stream_index, stream_count):
    chunks = pipeline.lm_batches(
      source,
      tokenizer,
      text_field=self.text_field,
      seq_len=self.lengths[0],
      batch_size=batch_size,
      dataset_name=self.dataset_name,
      shuffle_seed=shuffle_seed,
      repeat=repeat,
      shuffle_window=self.shuffle_window if repeat else 0,
      stream_index=stream_index,
      stream_count=stream_count,
    )
    ids = (
      pipeline.decoder_start_id(tokenizer, self.decoder_start_id),
      tokenizer.eos_id,
      np.asarray([tokenizer.piece_id(piece) for piece in self.reserved_pieces], np.int32),
    )

    def to_examples(batch, rng):
      rows = [
        self.example(tokens[segments != 0], rng, ids) for tokens, segments in zip(batch["tokens"], batch["segment_ids"])
      ]
      return pipeline.concat_rows(tuple({key: value[None] for key, value in row.items()} for row in rows))

    return chunks.random_map(to_examples, seed=(shuffle_seed or 0) * 1009 + stream_index)

  def batch_shapes(self, rows):
    decoder = {key: (rows, self.lengths[1]) for key in ("tokens", "segment_ids", "positions")}
    return {**decoder, **{f"encoder_{key}": (rows, self.seq_len) for key in ("tokens", "segment_ids", "positions")}}

  def logits(self, model, params, batch, *, train, rng=None):
    return encoder_decoder_logits(model, params, batch, train=train, rng=rng)

  def weights(self, batch):
    return causal_lm.target_weights(batch["segment_ids"])

  def loss_sums(self, logits, batch, *, train):
    return causal_lm.next_token_sums(logits, batch["tokens"], self.weights(batch), train=train)

  def summarize(self, sums):
    return causal_lm.summarize(sums)

  def predictions(self, logits, batch):
    """Per decoder token: logits [B, T, V], the next token [B, T], the target weights [B, T]."""
    return {"logits": logits, "labels": jnp.roll(batch["tokens"], -1, axis=1), "weights": self.weights(batch)}


def encoder_decoder_logits(model, params, batch, *, train: bool, rng=None):
  """Decoder logits [B, T, V] of an EncoderDecoder on a batch with `encoder_*` (source) and decoder keys."""
  return model.apply(
    {"params": params},
    batch["tokens"],
    batch["positions"],
    batch["segment_ids"],
    deterministic=not train,
    encoder_tokens=batch["encoder_tokens"],
    encoder_positions=batch["encoder_positions"],
    encoder_segment_ids=batch["encoder_segment_ids"],
    rngs={"dropout": rng} if train else {},
  )
