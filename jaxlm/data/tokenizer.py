"""SentencePiece tokenizers: train on a corpus, load, encode and decode.

Tokenizers trained here are lossless: identity normalisation, no dummy
prefix, whitespace kept, and byte fallback for any character not in the
vocabulary, so `decode(encode(text)) == text` for every string (source code
depends on exact whitespace). Newlines are a token of their own. Objectives that need pieces of their own
(`[MASK]`, T5's sentinels) reserve them as control symbols: they have ids, but no text ever encodes to them.
"""

import os
import tempfile
from typing import Iterable, Iterator

import sentencepiece as spm
from absl import logging

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


class Tokenizer:
  """A loaded SentencePiece model with the ids jaxlm relies on."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(
          f"Tokenizer model {model_path!r} does not exist. Point data.tokenizer at a SentencePiece "
          "`.model` file, or leave it empty to train one on the dataset's train split.")
    self.path = model_path
    self._processor = spm.SentencePieceProcessor(model_file=model_path)
    if self._processor.pad_id() < 0 or self._processor.eos_id() < 0 or self._processor.bos_id() < 0:
      raise ValueError(f"Tokenizer {model_path!r} must define pad, bos and eos pieces (pad_id/bos_id/eos_id >= 0).")

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._processor.pad_id()

  @property
  def bos_id(self) -> int:
    return self._processor.bos_id()

  @property
  def eos_id(self) -> int:
    return self._processor.eos_id()

  def piece_id(self, piece: str) -> int:
    """The id of a reserved piece (e.g. "[MASK]"); a clear error when this tokenizer lacks it."""
    piece_id = self._processor.piece_to_id(piece)
    if piece_id == self._processor.unk_id() and piece != self._processor.id_to_piece(piece_id):
      raise ValueError(f"Tokenizer {self.path!r} has no piece {piece!r}; the objective needs a tokenizer trained "
                       "with it reserved (leave data.tokenizer empty to train one).")
    return piece_id

  def ordinary_ids(self) -> list[int]:
    """Ids of every piece that text can encode to: all but pad, unk, bos, eos and reserved (control) pieces."""
    processor = self._processor
    return [i for i in range(self.vocab_size) if not (processor.is_control(i) or processor.is_unknown(i))]

  def encode(self, text: str) -> list[int]:
    return self._processor.encode(text)

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad, bos and eos ids are dropped."""
    special = {self.pad_id, self.bos_id, self.eos_id}
    return self._processor.decode([int(i) for i in ids if int(i) not in special])


def _training_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
  """Non-empty lines of `texts`, up to `max_chars` characters in all."""
  total = 0
  for text in texts:
    for line in text.split("\n"):
      if line.strip():
        yield line
        total += len(line)
        if total >= max_chars:
          return


def train_tokenizer(texts: Iterable[str], model_path: str, vocab_size: int, max_chars: int = 20_000_000,
                    reserved: tuple[str, ...] = ()) -> Tokenizer:
  """Trains a lossless BPE SentencePiece model on `texts` and writes it atomically to `model_path`; `reserved`
  pieces get ids right after the four special ones (in order) and never come out of `encode`."""
  directory = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(directory, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=directory) as scratch:
    prefix = os.path.join(scratch, "spm")
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(texts, max_chars),
        model_prefix=prefix,
        vocab_size=vocab_size,
        model_type="bpe",
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        allow_whitespace_only_pieces=True,
        split_digits=True,
        byte_fallback=True,
        character_coverage=0.9999,
        user_defined_symbols=["\n"],
        control_symbols=list(reserved),
        pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        num_threads=os.cpu_count() or 1,
        minloglevel=2,
    )
    os.replace(prefix + ".model", model_path)  # atomic: a reader never sees half a model
  logging.info("Trained a %d-piece tokenizer: %s", vocab_size, model_path)
  return Tokenizer(model_path)
