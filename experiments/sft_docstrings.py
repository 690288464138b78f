"""Supervised fine-tuning of the quickstart model to write a function's docstring summary (prompt-masked).

  python -m jaxlm.main --config=experiments/sft_docstrings.py --workdir=runs/docstrings \
      --config.init_from=runs/quickstart

Rows are `[bos] function-without-docstring \\n\"\"\" first-docstring-line [eos]` from the
built-in `pystdlib_docstrings`; the loss is taken on the docstring line (and eos)
only. Its test split is `pystdlib_lm`'s validation split, never seen in
pretraining. At the end the best checkpoint (lowest validation loss) is
evaluated on the test split, and `eval.generate_examples` test functions are
decoded greedily: WORKDIR/eval/report.json holds the loss, exact match, ROUGE-L
and the generated lines next to the references.

Variants (`--config=experiments/sft_docstrings.py:VARIANT`, combinable with commas):
  full      (default) every parameter trains;
  lora      rank-8 LoRA adapters on attention query/value and the MLP; base weights frozen;
  distill   KL to a teacher on the target tokens: set --config.distill.teacher=WORKDIR_OF_A_FULL_RUN;
  t5        seq2seq on the span-corruption-pretrained encoder-decoder of `experiments/pretrain_t5.py`
            (init_from=runs/t5): the function to the encoder, the docstring line to the decoder; or on a
            Hugging Face T5 with --config.init_from=hf:PATH (its architecture, tokenizer and framing);
  tiny      seconds on CPU, for tests (from a `quickstart.py:tiny` workdir, or `pretrain_t5.py:tiny` with t5).
"""

from jaxlm import configs

VARIANTS = ("full", "lora", "distill", "t5", "tiny")


def get_config(arg: str | None = None):
  variants = set(arg.split(",")) if arg else set()
  if variants - set(VARIANTS):
    raise ValueError(f"Unknown sft_docstrings variants {sorted(variants - set(VARIANTS))}; use {VARIANTS}.")
  config = configs.base_config()
  config.task = "seq2seq"
  config.init_from = "runs/quickstart"  # the quickstart workdir (its latest checkpoint and its tokenizer)
  config.model = configs.model_config_dict("small")  # must match the pretrained run
  config.data.name = "pystdlib_docstrings"
  config.data.text_field = "prompt"
  config.data.target_field = "target"
  config.data.separator = '\n"""'  # where a docstring would open
  config.data.truncation = "right"  # long functions keep their signature and first lines
  config.data.test_split = "test"
  config.data.seq_len = 256
  config.train.steps = 200
  config.train.batch_size = 16
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 20
  config.train.weight_decay = 0.01
  config.train.log_every = 10
  config.train.eval_every = 50
  config.train.checkpoint_every = 50
  config.train.keep_checkpoints = 1
  config.train.early_stopping_patience = 2
  config.eval.batch_size = 16
  config.eval.num_batches = -1  # the whole validation split
  config.eval.generate_examples = 40
  config.eval.max_new_tokens = 32
  config.sample.prompt = ""

  if "t5" in variants:
    config.init_from = "runs/t5"  # a pretrain_t5.py workdir
    config.model = configs.model_config_dict("small", **configs.T5_STYLE)
  if "lora" in variants:
    config.model.lora_rank = 8
    config.model.lora_targets = "attention/(query|value)|mlp/(gate|up|down)"
    config.train.trainable = "lora"
    config.train.learning_rate = 2e-3
  if "distill" in variants:
    config.distill.teacher = "runs/docstrings_full"  # a finished full fine-tune of this config
  if "tiny" in variants:
    config.init_from = ""  # tests point it at a quickstart.py:tiny workdir
    config.model = configs.model_config_dict(
      "tiny",
      lora_rank=config.model.lora_rank,
      lora_targets=config.model.lora_targets,
      **(configs.T5_STYLE if "t5" in variants else {}),
    )
    config.data.vocab_size = 512
    config.data.seq_len = 64
    config.train.steps = 4
    config.train.batch_size = 8
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = 2
    config.train.checkpoint_every = 2
    config.eval.batch_size = 8
    config.eval.num_batches = 2
    config.eval.generate_examples = 2
    config.eval.max_new_tokens = 8
  return config
