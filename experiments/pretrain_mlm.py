"""BERT-style masked-language-model pretraining of an encoder on the built-in `pystdlib_lm` corpus.

  python -m jaxlm.main --config=experiments/pretrain_mlm.py --workdir=runs/mlm

The default is the quickstart's size and time (a few minutes on 2 CPU cores): a pre-LayerNorm encoder with
rotary positions and a pooler (at this size it learns much faster than BERT's post-norm with learned
positions, which `bert_base` keeps), 15% of tokens predicted (80/10/10). Eval rows of
WORKDIR/metrics.jsonl have `loss` and `masked_accuracy`. Variants:
  tiny       seconds on CPU: tests and smoke runs;
  bert_base  bert-base-uncased's shape (110M) for accelerators; point data.* at a real corpus and tokenizer.
The encoder it trains is fine-tuned by `experiments/finetune_packages.py:encoder`.
"""

from jaxlm import configs


def get_config(arg: str | None = None):
  config = configs.base_config()
  config.task = "masked_lm"
  config.model = configs.model_config_dict("small", **configs.ENCODER_STYLE)
  config.corruption.rate = 0.15  # tokens predicted per row (BERT)
  config.data.seq_len = 128
  config.train.steps = 300
  config.train.batch_size = 32
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 30
  config.train.weight_decay = 0.01
  config.train.b2 = 0.98
  config.train.log_every = 10
  config.train.eval_every = 60
  config.train.checkpoint_every = 60
  config.eval.batch_size = 32
  config.eval.num_batches = 8
  config.sample.prompt = ""  # an encoder does not continue text

  if arg == "tiny":  # seconds on CPU: tests and smoke runs
    config.model = configs.model_config_dict("tiny", **configs.ENCODER_STYLE)
    config.data.vocab_size = 512
    config.data.seq_len = 64
    config.train.steps = 500
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 10
    config.train.log_every = 50
    config.train.eval_every = 10  # the first evaluation early: the test compares the last with it
    config.train.checkpoint_every = 500
    config.eval.batch_size = 16
    config.eval.num_batches = 2
  elif arg == "bert_base":
    config.model = configs.model_config_dict("bert_base", dtype="bfloat16")
    config.data.vocab_size = 30522
    config.data.seq_len = 512
    config.train.batch_size = 256
    config.train.learning_rate = 1e-4
    config.train.steps = 100000
    config.train.warmup_steps = 10000
    config.train.log_every = 100
    config.train.eval_every = 5000
    config.train.checkpoint_every = 5000
  elif arg:
    raise ValueError(f"Unknown pretrain_mlm variant {arg!r}; use 'tiny', 'bert_base' or nothing.")
  return config
