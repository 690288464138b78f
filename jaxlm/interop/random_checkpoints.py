"""Tiny Hugging Face checkpoints with random weights, built here by `transformers`, `tokenizers` and `sentencepiece`
(no download): a BERT-style WordPiece tokenizer trained on local text with a random BERT saved next to it, and a
T5-style Unigram tokenizer (no bos, `text </s>`, 100 sentinels) with a random T5 v1.0 or v1.1. What the tests of the
imports and colab/pretrained_encoder.ipynb start from where no real checkpoint is at hand; a directory written here
loads like one downloaded from the Hub (`jaxlm.interop.hf.load_pretrained`, `init_from=hf:DIR`).
"""

import os
import tempfile

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


# T5's sentinels <extra_id_0> ... <extra_id_99>: the last ids of its vocabulary, <extra_id_0> the very last.
T5_EXTRA_IDS = 100
T5_PADDING_ROWS = 12  # embedding rows past the tokenizer's pieces (T5 pads its 32,100 pieces to 32,128 rows)


def save_t5_tokenizer(directory: str, vocab_size: int, texts: list[str] | None = None) -> None:
  """A T5-style tokenizer in `directory`, as `transformers.T5Tokenizer` writes it (tokenizer.json, which frames a
  text as `text </s>`, and tokenizer_config.json): a SentencePiece Unigram model of `vocab_size - T5_EXTRA_IDS`
  pieces trained on `texts` (default: 3,000 standard-library lines) with T5's ids (<pad> 0, </s> 1, <unk> 2, no
  bos), then T5's sentinels."""
  import sentencepiece as spm
  import transformers

  with tempfile.TemporaryDirectory() as scratch:
    prefix = os.path.join(scratch, "spiece")
    spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts or stdlib_lines(3000)),
      model_prefix=prefix,
      vocab_size=vocab_size - T5_EXTRA_IDS,
      model_type="unigram",
      pad_id=0,
      eos_id=1,
      unk_id=2,
      bos_id=-1,
      minloglevel=2,
    )
    pieces = spm.SentencePieceProcessor(model_file=prefix + ".model")
  vocab = [(pieces.id_to_piece(i), pieces.get_score(i)) for i in range(pieces.vocab_size())]
  vocab += [(f"<extra_id_{i}>", 0.0) for i in reversed(range(T5_EXTRA_IDS))]
  transformers.T5Tokenizer(vocab=vocab, extra_ids=T5_EXTRA_IDS).save_pretrained(directory)


def t5_model(version: str = "1.0", **t5_config):
  """A `transformers.T5ForConditionalGeneration` with random weights (seed torch first): "1.0" ties the output head
  to the embedding and scales its input by D**-0.5, ReLU MLP; "1.1" (Flan-T5) has an lm_head of its own, no scale,
  gated-GELU MLP. `t5_config`: `transformers.T5Config` fields (the decoder starts with pad, 0, as T5's does)."""
  import transformers

  if version not in ("1.0", "1.1"):
    raise ValueError(f"T5 version {version!r} is not '1.0' or '1.1'.")
  config = dict(decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, **t5_config)
  if version == "1.0":
    return transformers.T5ForConditionalGeneration(transformers.T5Config(**config))
  # transformers >= 5 forces tie_word_embeddings=True in T5Config; set after construction it unties the model as
  # v1.1 checkpoints are.
  config = transformers.T5Config(**config, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
  config.tie_word_embeddings = False
  model = transformers.T5ForConditionalGeneration(config)
  for stack in (model.encoder, model.decoder):  # v1.1 shares the input embedding (untied, transformers 5 does not)
    stack.embed_tokens.weight.data.copy_(model.shared.weight.data)
  return model


def save_random_t5(directory: str, vocab_size: int = 512, version: str = "1.0", seed: int = 0, **t5_config) -> str:
  """A random T5 of `version` (`t5_model`) with its T5-style tokenizer (`save_t5_tokenizer`), saved in `directory`,
  which is returned. The model has `vocab_size` rows, the tokenizer `T5_PADDING_ROWS` pieces fewer. `t5_config`:
  `transformers.T5Config` fields over a tiny default (D=64, 2 + 2 layers of 4 heads of 16, F=128)."""
  import torch

  save_t5_tokenizer(directory, vocab_size - T5_PADDING_ROWS)
  config = dict(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, relative_attention_num_buckets=16)
  config.update(relative_attention_max_distance=32, dropout_rate=0.0, **t5_config)
  torch.manual_seed(seed)
  t5_model(version, vocab_size=vocab_size, **config).save_pretrained(directory)
  return directory
