"""grain pipelines: source -> tokenize -> pack or pad -> batch.

Pretraining packs documents (`lm_batches`); fine-tuning pads one example per
row (`padded_batches` of `classification_example` or `sft_example`), so that each
row has one label or one prompt/target pair. A language-modelling batch is a
dict of int32 `[B, T]` arrays:
- `tokens`: documents as `[bos] + ids + [eos]` (no bos for a tokenizer without one), concatenated and cut into rows
  of T tokens (a long document continues in the next row);
- `segment_ids`: 1, 2, ... for the document pieces of a row, 0 for padding;
- `positions`: index of each token within its piece of the row (restarts at 0).
The model attends only within a segment, so packing never leaks across
documents. Padded batches use the same keys (segment id 1 for the example, 0 for
padding; positions from 0), plus `label` `[B]` (classification) or `loss_mask`
`[B, T]` (SFT: 1 on the target tokens the loss is taken on). Iterators are
grain `DatasetIterator`s, whose position is saved in checkpoints
(`jaxlm.training.checkpoint`).
"""

import hashlib
import os
import re

import grain
import numpy as np
from grain.experimental import ConcatThenSplitIterDataset, WindowShuffleIterDataset, ZipIterDataset

from jaxlm.data.tokenizer import Tokenizer, train_tokenizer
from jaxlm.errors import check

TRUNCATIONS = ("right", "left")


def check_config(data) -> None:
  """Validates the `data` section on its own (its fit with the model is checked by `jaxlm.experiment`)."""
  check(bool(data.name), "data.name", "must name a dataset.")
  check(data.seq_len > 1, "data.seq_len", f"must be at least 2, got {data.seq_len}.")
  check(data.num_streams >= 0, "data.num_streams", f"must be >= 0 (0 = one per process), got {data.num_streams}.")
  check(data.shuffle_window >= 0, "data.shuffle_window", f"must be >= 0, got {data.shuffle_window}.")
  check(bool(data.tokenizer) or data.vocab_size > 4, "data.vocab_size", "must exceed the 4 special pieces.")
  check(data.truncation in TRUNCATIONS, "data.truncation", f"{data.truncation!r} is not one of {TRUNCATIONS}.")


def record_text(record: dict, field: str, index: int, dataset: str) -> str:
  """The UTF-8 text of `record[field]`; a clear error for a missing field, bad bytes or an empty text."""
  if field not in record:
    raise KeyError(
      f"{dataset} record {index} has no field {field!r} (fields: {sorted(record)}); "
      "set data.text_field to the field that holds the text."
    )
  value = record[field]
  if isinstance(value, bytes):
    try:
      value = value.decode("utf-8")
    except UnicodeDecodeError as error:
      raise ValueError(
        f"{dataset} record {index}, field {field!r}, is not valid UTF-8 ({error}); "
        "fix or remove the record in the source data."
      ) from error
  if not value:
    raise ValueError(f"{dataset} record {index}, field {field!r}, is empty; remove empty records from the source data.")
  return value


def cached_tokenizer_path(data_config, reserved: tuple[str, ...] = ()) -> str:
  """Where `tokenizer_for` caches the tokenizer it trains when `data.tokenizer` is empty (with `reserved`
  pieces: a hash of them is part of the name)."""
  data_dir = os.path.expanduser(data_config.data_dir or os.environ.get("TFDS_DATA_DIR", "~/tensorflow_datasets"))
  slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{data_config.name}-{data_config.text_field}-v{data_config.vocab_size}")
  if reserved:
    slug += "-r" + hashlib.sha256("\0".join(reserved).encode()).hexdigest()[:10]
  return os.path.join(data_dir, "jaxlm_tokenizers", f"{slug}.model")


def tokenizer_for(data_config, train_source, reserved: tuple[str, ...] = ()) -> Tokenizer:
  """Loads `data.tokenizer`, or trains one on the train split (with the task's `reserved` pieces) and caches it
  in the data directory.

  The cache path names the dataset, text field, vocabulary size and reserved pieces, so a
  changed setting never picks up a stale model.
  """
  if data_config.tokenizer:
    return Tokenizer(data_config.tokenizer)
  path = cached_tokenizer_path(data_config, reserved)
  if os.path.exists(path):
    return Tokenizer(path)
  texts = (record_text(train_source[i], data_config.text_field, i, data_config.name) for i in range(len(train_source)))
  return train_tokenizer(texts, path, data_config.vocab_size, reserved=reserved)


def _pad_rows(batch: dict, batch_size: int) -> dict:
  """Pads a short final batch with all-padding rows (segment id 0: no loss, no metrics)."""
  missing = batch_size - batch["tokens"].shape[0]
  if missing == 0:
    return batch
  return {key: np.pad(value, [(0, missing)] + [(0, 0)] * (value.ndim - 1)) for key, value in batch.items()}


def lm_batches(
  source,
  tokenizer: Tokenizer,
  *,
  text_field: str,
  seq_len: int,
  batch_size: int,
  dataset_name: str,
  shuffle_seed: int | None,
  repeat: bool,
  shuffle_window: int = 0,
  stream_index: int = 0,
  stream_count: int = 1,
) -> grain.IterDataset:
  """Packed language-modelling batches of `batch_size` rows from one stream of documents.

  Training: `shuffle_seed` set and `repeat=True` (documents reshuffled every epoch), and
  `shuffle_window` > 0: packed rows are shuffled within windows of that many rows, so that
  the rows of one long document spread over many batches instead of filling consecutive ones.
  Evaluation: one pass (in a fixed shuffled order if `shuffle_seed` is set), the last batch padded.
  The stream reads only the records `stream_index::stream_count` (see `stream_batches`).
  """

  def tokenize(index, record):
    ids = tokenizer.encode(record_text(record, text_field, index, dataset_name))
    return {"tokens": np.asarray([*tokenizer.bos_prefix, *ids, tokenizer.eos_id], dtype=np.int32)}

  documents = grain.MapDataset.source(source).map_with_index(tokenize)
  documents = documents[stream_index::stream_count]
  if shuffle_seed is not None:
    documents = documents.shuffle(seed=shuffle_seed)
  if repeat:
    documents = documents.repeat(None)
  stream = documents.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  rows = ConcatThenSplitIterDataset(stream, length_struct={"tokens": seq_len})
  if shuffle_window > 1 and shuffle_seed is not None:
    rows = WindowShuffleIterDataset(rows, window_size=shuffle_window, seed=shuffle_seed)
  batches = rows.batch(batch_size, drop_remainder=repeat)

  def to_model_batch(batch):
    return _pad_rows(
      {
        "tokens": batch["tokens"].astype(np.int32),
        "segment_ids": batch["tokens_segment_ids"].astype(np.int32),
        "positions": batch["tokens_positions"].astype(np.int32),
      },
      batch_size,
    )

  return batches.map(to_model_batch)


def concat_rows(batches: tuple[dict, ...]) -> dict:
  """One batch from several: the rows of each, in order."""
  return {key: np.concatenate([batch[key] for batch in batches]) for key in batches[0]}


def process_streams(num_streams: int, process_index: int, process_count: int) -> list[int]:
  """Indices of the document streams whose rows this process feeds.

  Global batch rows are split into `num_streams` equal blocks; block s always comes from stream s
  (records `s::num_streams`, packed on their own), and process p feeds the consecutive streams of its
  block of rows. For a fixed `num_streams` the global batches are therefore the same whatever the number
  of processes that divides it: a run on 1 host and on 4 hosts trains on identical data.
  """
  if num_streams % process_count:
    raise ValueError(f"data.num_streams={num_streams} must be a multiple of the {process_count} processes.")
  per_process = num_streams // process_count
  return [process_index * per_process + j for j in range(per_process)]


def zip_streams(streams: list[grain.IterDataset]) -> grain.IterDataset:
  """Batches whose rows are those of one batch of each stream, in order (checkpointable like each stream)."""
  return ZipIterDataset(streams).map(concat_rows)


def padding_batch(shapes: dict[str, tuple]) -> dict:
  """A batch of padding only (segment id 0: no targets, contributes nothing to any metric); `shapes` as
  `Task.batch_shapes(rows)`."""
  return {key: np.zeros(shape, np.int32) for key, shape in shapes.items()}


def truncate(ids: list[int], length: int, side: str) -> list[int]:
  """At most `length` ids: 'right' keeps the beginning (cuts the end), 'left' keeps the end."""
  if len(ids) <= length:
    return ids
  return ids[:length] if side == "right" else ids[len(ids) - length :]


def padded_row(ids: list[int], seq_len: int) -> dict:
  """`tokens`, `segment_ids`, `positions` [T] of one example right-padded to `seq_len`."""
  tokens = np.zeros(seq_len, np.int32)
  tokens[: len(ids)] = ids
  return {
    "tokens": tokens,
    "segment_ids": (np.arange(seq_len) < len(ids)).astype(np.int32),
    "positions": np.arange(seq_len, dtype=np.int32),
  }


def classification_example(tokenizer: Tokenizer, text: str, label: int, seq_len: int, truncation: str) -> dict:
  """`[bos] + text + [eos]`, the text cut to fit (`truncation`: which side is cut), with its `label`."""
  ids = truncate(tokenizer.encode(text), seq_len - 1 - len(tokenizer.bos_prefix), truncation)
  return {**padded_row([*tokenizer.bos_prefix, *ids, tokenizer.eos_id], seq_len), "label": np.int32(label)}


def frame_prompt(tokenizer: Tokenizer, ids: list[int], encoder_eos: bool) -> list[int]:
  """A prompt's `ids` as a model reads them: `[bos] + ids` (nothing before them for a tokenizer without bos), then
  eos for an encoder trained so (`model.encoder_eos`; T5's `prompt </s>`). Training rows and generation frame
  prompts here alike."""
  return [*tokenizer.bos_prefix, *ids, *([tokenizer.eos_id] if encoder_eos else [])]


def sft_example(tokenizer: Tokenizer, prompt: str, target: str, seq_len: int, truncation: str, separator: str) -> dict:
  """`[bos] + prompt + separator + target + [eos]`; `loss_mask` is 1 on target and eos only.

  The target (with eos) keeps up to half the row; the prompt is cut to fit the rest
  (`truncation`: which side of the prompt is cut); the separator is never cut.
  """
  target_ids = truncate(tokenizer.encode(target), seq_len // 2 - 1, "right") + [tokenizer.eos_id]
  separator_ids = tokenizer.encode(separator) if separator else []
  room = seq_len - len(frame_prompt(tokenizer, separator_ids, False)) - len(target_ids)
  context = frame_prompt(tokenizer, truncate(tokenizer.encode(prompt), room, truncation) + separator_ids, False)
  row = padded_row(context + target_ids, seq_len)
  row["loss_mask"] = np.zeros(seq_len, np.int32)
  row["loss_mask"][len(context) : len(context) + len(target_ids)] = 1
  return row


def decoder_start_id(tokenizer: Tokenizer, configured: int) -> int:
  """The token an encoder-decoder's decoder starts with: `model.decoder_start_id` (`configured`; T5: 0, its pad),
  or for -1 the tokenizer's bos (jaxlm's own encoder-decoders)."""
  if configured >= 0:
    return configured
  check(
    tokenizer.bos_id is not None,
    "model.decoder_start_id",
    f"is -1 (start the decoder with bos) and the tokenizer {tokenizer.path} has no bos; set the id the model "
    "was trained to start its decoder with (T5: 0, its pad).",
  )
  return tokenizer.bos_id


def encoder_decoder_example(
  tokenizer: Tokenizer,
  prompt: str,
  target: str,
  seq_len: int,
  truncation: str,
  separator: str,
  *,
  decoder_start_id: int,
  encoder_eos: bool,
) -> dict:
  """Encoder `frame_prompt(prompt + separator)` (`encoder_*` keys; the prompt cut to fit, `truncation` its side),
  decoder `[decoder_start_id] + target + [eos]` (the target cut to fit; `loss_mask` 1 on target and eos), each
  `seq_len` long. The encoder row is what generation feeds the encoder for the prompt text with its separator."""
  separator_ids = tokenizer.encode(separator) if separator else []
  room = seq_len - len(frame_prompt(tokenizer, separator_ids, encoder_eos))
  prompt_ids = truncate(tokenizer.encode(prompt), room, truncation)
  encoder = padded_row(frame_prompt(tokenizer, prompt_ids + separator_ids, encoder_eos), seq_len)
  target_ids = truncate(tokenizer.encode(target), seq_len - 2, "right") + [tokenizer.eos_id]
  row = padded_row([decoder_start_id, *target_ids], seq_len)
  row["loss_mask"] = np.zeros(seq_len, np.int32)
  row["loss_mask"][1 : 1 + len(target_ids)] = 1
  return {**row, **{f"encoder_{key}": value for key, value in encoder.items()}}


def padded_batches(
  source,
  encode,
  *,
  batch_size: int,
  shuffle_seed: int | None,
  repeat: bool,
  stream_index: int = 0,
  stream_count: int = 1,
) -> grain.IterDataset:
  """One example per row: `encode(index, record) -> dict of arrays`, batched (`lm_batches` for the options)."""
  examples = grain.MapDataset.source(source).map_with_index(encode)[stream_index::stream_count]
  if shuffle_seed is not None:
    examples = examples.shuffle(seed=shuffle_seed)
  if repeat:
    examples = examples.repeat(None)
  stream = examples.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=64))
  return stream.batch(batch_size, drop_remainder=repeat).map(lambda batch: _pad_rows(batch, batch_size))


def record_label(record: dict, field: str, index: int, dataset: str, num_classes: int) -> int:
  """The integer class of `record[field]`, checked against the number of classes."""
  if field not in record:
    raise KeyError(
      f"{dataset} record {index} has no field {field!r} (fields: {sorted(record)}); "
      "set data.label_field to the field that holds the class."
    )
  label = int(record[field])
  if not 0 <= label < num_classes:
    raise ValueError(
      f"{dataset} record {index} has label {label}, outside [0, {num_classes}); "
      "unlabelled splits (label -1, e.g. GLUE test) cannot be trained or evaluated on."
    )
  return label
