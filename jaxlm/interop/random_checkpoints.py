"""Tiny Hugging Face checkpoints with random weights, built here by `transformers` and `tokenizers` (no download):
a BERT-style WordPiece tokenizer trained on local text, and a random BERT saved next to it. What the tests of the
BERT import and colab/pretrained_encoder.ipynb start from where no real checkpoint is at hand; a directory
written here loads like one downloaded from the Hub (`jaxlm.interop.hf.load_pretrained`, `init_from=hf:DIR`).
"""

import os

# BERT's special tokens by their tokenizer_config.json roles (jaxlm maps [CLS] -> bos, [SEP] -> eos).
BERT_SPECIALS = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]")


def stdlib_lines(count: int) -> list[str]:
  """The first `count` non-empty lines of a few standard-library modules (local text, no download)."""
  import email
  import json

  lines = []
  for module in (os, json, email):
    with open(module.__file__, encoding="utf-8") as f:
      lines += [line for line in f.read().splitlines() if line.strip()]
  return lines[:count]


def save_wordpiece_tokenizer(directory: str, vocab_size: int, texts: list[str] | None = None) -> None:
  """A BERT-style WordPiece tokenizer.json trained on `texts` (default: 3,000 standard-library lines), with BERT's
  `[CLS] text [SEP]` post-processor, and a tokenizer_config.json naming `BERT_SPECIALS` (no bos/eos), in
  `directory`."""
  import tokenizers
  import transformers
  from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

  tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
  tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
  tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
  tokenizer.decoder = decoders.WordPiece()
  tokenizer.train_from_iterator(
    texts or stdlib_lines(3000),
    trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]),
  )
  cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
  tokenizer.post_processor = processors.TemplateProcessing(
    single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
  )
  transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, **BERT_SPECIALS).save_pretrained(directory)


def save_random_bert(directory: str, vocab_size: int = 512, seed: int = 0, **bert_config) -> str:
  """A random `BertForPreTraining` (pooler, MLM and next-sentence heads) with its WordPiece tokenizer of about
  `vocab_size` pieces (the model's vocabulary is the tokenizer's), saved in `directory`, which is returned.
  `bert_config`: `transformers.BertConfig` fields over a tiny default (D=64, 2 layers of 4 heads, F=128)."""
  import torch
  import transformers

  from jaxlm.interop import hf

  save_wordpiece_tokenizer(directory, vocab_size)
  config = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
  config.update(max_position_embeddings=64, **bert_config)
  torch.manual_seed(seed)
  model = transformers.BertForPreTraining(
    transformers.BertConfig(vocab_size=hf.load_tokenizer(directory).vocab_size, **config)
  )
  model.save_pretrained(directory)
  return directory
