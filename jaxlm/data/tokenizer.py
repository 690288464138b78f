"""Tokenizers: SentencePiece models (trained here) and Hugging Face `tokenizer.json` files, behind one interface.

`Tokenizer(path)` picks the backend by the file's content: a JSON object is a Hugging Face `tokenizer.json` (BPE,
WordPiece or Unigram, through the `tokenizers` package), anything else a SentencePiece model. A `tokenizer.json`
does not say which tokens are bos, eos and pad; they come from a top-level `"jaxlm_special_tokens"` entry that
`Tokenizer.save` writes into jaxlm's copy (e.g. a workdir's), else from the `tokenizer_config.json` beside it
(the Hugging Face layout). A tokenizer without a pad token (GPT-2) pads with its eos token; one without bos and eos
but with [CLS] and [SEP] (BERT, RoBERTa's <s> and </s> are named both ways) uses [CLS] as bos and [SEP] as eos, so
that every task frames a text as BERT does: [CLS] text [SEP]. A tokenizer may have no bos at all (T5's SentencePiece
model or tokenizer.json): the tasks then start a text with nothing (`bos_prefix` is empty), as T5 was trained.

Tokenizers trained here are lossless: identity normalisation, no dummy
prefix, whitespace kept, and byte fallback for any character not in the
vocabulary, so `decode(encode(text)) == text` for every string (source code
depends on exact whitespace). Newlines are a token of their own. Objectives that need pieces of their own
(`[MASK]`, T5's sentinels) reserve them as control symbols: they have ids, but no text ever encodes to them.
"""

import json
import os
import shutil
import tempfile
from typing import Iterable, Iterator

import sentencepiece as spm
from absl import logging

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


SPECIAL_TOKENS_KEY = "jaxlm_special_tokens"  # in jaxlm's copy of a tokenizer.json: {"bos": str, "eos": ..., "pad": ...}


class Tokenizer:
  """A loaded SentencePiece model or Hugging Face tokenizer.json with the ids jaxlm relies on."""

  def __init__(self, model_path: str):
    if not os.path.exists(model_path):
      raise FileNotFoundError(
        f"Tokenizer model {model_path!r} does not exist. Point data.tokenizer at a SentencePiece "
        "`.model` file or a Hugging Face tokenizer.json, or leave it empty to train one on the dataset's train "
        "split."
      )
    self.path = model_path
    with open(model_path, "rb") as f:
      content = f.read()
    self._json = json.loads(content) if content.lstrip().startswith(b"{") else None
    if self._json is None:
      self._processor = spm.SentencePieceProcessor(model_file=model_path)
      if self._processor.pad_id() < 0 or self._processor.eos_id() < 0:
        raise ValueError(f"Tokenizer {model_path!r} must define pad and eos pieces (pad_id/eos_id >= 0).")
      roles = dict(pad=self._processor.pad_id(), bos=self._processor.bos_id(), eos=self._processor.eos_id())
      self._ids = {role: piece_id for role, piece_id in roles.items() if piece_id >= 0}  # T5's has no bos
    else:
      import tokenizers  # only Hugging Face tokenizers need it

      self._special_tokens = self._json.pop(SPECIAL_TOKENS_KEY, None) or hf_special_tokens(os.path.dirname(model_path))
      self._hf = tokenizers.Tokenizer.from_str(json.dumps(self._json))
      self._ids = {}
      for role, token in self._special_tokens.items():
        self._ids[role] = self._hf.token_to_id(token)
        if self._ids[role] is None:
          raise ValueError(f"Tokenizer {model_path!r}: its {role} token {token!r} is not in its vocabulary.")

  @property
  def kind(self) -> str:
    """ "sentencepiece" or "tokenizers" (a Hugging Face tokenizer.json)."""
    return "sentencepiece" if self._json is None else "tokenizers"

  @property
  def vocab_size(self) -> int:
    return self._processor.vocab_size() if self._json is None else self._hf.get_vocab_size(with_added_tokens=True)

  @property
  def pad_id(self) -> int:
    return self._ids["pad"]

  @property
  def bos_id(self) -> int | None:
    """None for a tokenizer without bos (T5's)."""
    return self._ids.get("bos")

  @property
  def bos_prefix(self) -> list[int]:
    """What the tasks start a text with: [bos_id], or [] for a tokenizer without bos."""
    return [] if self.bos_id is None else [self.bos_id]

  @property
  def eos_id(self) -> int:
    return self._ids["eos"]

  def piece_id(self, piece: str) -> int:
    """The id of a reserved piece (e.g. "[MASK]"); a clear error when this tokenizer lacks it."""
    if self._json is not None:
      piece_id = self._hf.token_to_id(piece)
      if piece_id is None:
        raise ValueError(f"Tokenizer {self.path!r} has no token {piece!r}; the objective needs it.")
      return piece_id
    piece_id = self._processor.piece_to_id(piece)
    if piece_id == self._processor.unk_id() and piece != self._processor.id_to_piece(piece_id):
      raise ValueError(
        f"Tokenizer {self.path!r} has no piece {piece!r}; the objective needs a tokenizer trained "
        "with it reserved (leave data.tokenizer empty to train one)."
      )
    return piece_id

  def ordinary_ids(self) -> list[int]:
    """Ids of every piece that text can encode to: all but pad, unk, bos, eos and reserved (control) pieces
    (a tokenizer.json: all but its special added tokens)."""
    if self._json is not None:
      special = {token["id"] for token in self._json.get("added_tokens", []) if token.get("special")}
      return [i for i in range(self.vocab_size) if i not in special]
    processor = self._processor
    return [i for i in range(self.vocab_size) if not (processor.is_control(i) or processor.is_unknown(i))]

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without bos/eos (the tasks add those where they belong)."""
    if self._json is None:
      return self._processor.encode(text)
    return self._hf.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Iterable[int]) -> str:
    """Text of `ids`; pad, bos and eos ids are dropped."""
    special = {self.pad_id, self.bos_id, self.eos_id}
    ids = [int(i) for i in ids if int(i) not in special]
    return self._processor.decode(ids) if self._json is None else self._hf.decode(ids, skip_special_tokens=False)

  def save(self, path: str) -> None:
    """Writes a self-contained copy to `path` atomically (a tokenizer.json gets its special tokens inside)."""
    with tempfile.NamedTemporaryFile("w", dir=os.path.dirname(os.path.abspath(path)), delete=False) as f:
      temporary = f.name
      if self._json is not None:
        json.dump({**self._json, SPECIAL_TOKENS_KEY: self._special_tokens}, f, ensure_ascii=False)
    if self._json is None:
      shutil.copyfile(self.path, temporary)
    os.replace(temporary, path)

  def hf_files(self) -> dict[str, dict]:
    """{file name: JSON} of this tokenizer in the Hugging Face layout (tokenizer.json, tokenizer_config.json);
    only for tokenizer.json tokenizers."""
    if self._json is None:
      raise ValueError(f"Tokenizer {self.path!r} is a SentencePiece model, not a tokenizer.json.")
    roles = {f"{role}_token": token for role, token in self._special_tokens.items()}
    return {
      "tokenizer.json": self._json,
      "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast", **roles},
    }


def hf_special_tokens(directory: str) -> dict[str, str]:
  """{"eos", "pad", and "bos" if it has one} tokens of the Hugging Face tokenizer in `directory`, from its
  tokenizer_config.json (else special_tokens_map.json). No pad token: the eos token pads (GPT-2 has none). No bos /
  eos token: the cls / sep token (BERT). Neither bos nor cls (T5): no bos."""
  found = {}
  for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the second wins
    path = os.path.join(directory, name)
    if os.path.exists(path):
      with open(path) as f:
        values = json.load(f)
      for role in ("bos", "eos", "pad", "cls", "sep"):
        token = values.get(f"{role}_token")
        token = token.get("content") if isinstance(token, dict) else token
        if token:
          found[role] = token
  for role, fallback in (("bos", "cls"), ("eos", "sep")):
    if fallback in found:
      found.setdefault(role, found[fallback])
  found = {role: found[role] for role in ("bos", "eos", "pad") if role in found}
  if "eos" not in found:
    raise ValueError(
      f"The tokenizer in {directory} names no eos_token (tokenizer_config.json or "
      'special_tokens_map.json); jaxlm needs one: add `"eos_token": "..."` there.'
    )
  found.setdefault("pad", found["eos"])
  return found


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


def train_tokenizer(
  texts: Iterable[str], model_path: str, vocab_size: int, max_chars: int = 20_000_000, reserved: tuple[str, ...] = ()
) -> Tokenizer:
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
      pad_id=PAD_ID,
      unk_id=UNK_ID,
      bos_id=BOS_ID,
      eos_id=EOS_ID,
      num_threads=os.cpu_count() or 1,
      minloglevel=2,
    )
    os.replace(prefix + ".model", model_path)  # atomic: a reader never sees half a model
  logging.info("Trained a %d-piece tokenizer: %s", vocab_size, model_path)
  return Tokenizer(model_path)
