"""Quickstart: a small Llama-style decoder pretrained on the built-in `pystdlib_lm` corpus.

  python -m jaxlm.main --config=experiments/quickstart.py --workdir=runs/quickstart

About five minutes on 2 CPU cores; the validation loss ends well below the
unigram entropy of the corpus (both are in WORKDIR/metrics.jsonl), then a
greedy sample is printed. `--config=experiments/quickstart.py:tiny` is the
seconds-long variant used by the tests.
"""

from jaxlm import configs


def get_config(arg: str | None = None):
  config = configs.base_config()
  config.model = configs.model_config_dict("small")
  config.data.seq_len = 256
  config.train.steps = 220
  config.train.batch_size = 16
  config.train.learning_rate = 2e-3
  config.train.warmup_steps = 30
  config.train.log_every = 10
  config.train.eval_every = 55
  config.train.checkpoint_every = 55
  config.eval.batch_size = 16
  config.eval.num_batches = 8
  config.sample.prompt = "    def __init__(self"

  if arg == "tiny":  # seconds on CPU: tests and smoke runs
    config.model = configs.model_config_dict("tiny")
    config.data.vocab_size = 512
    config.data.seq_len = 64
    config.train.steps = 8
    config.train.batch_size = 8
    config.train.warmup_steps = 2
    config.train.log_every = 1
    config.train.eval_every = 4
    config.train.checkpoint_every = 4
    config.eval.batch_size = 8
    config.eval.num_batches = 2
    config.sample.max_new_tokens = 16
  elif arg:
    raise ValueError(f"Unknown quickstart variant {arg!r}; use 'tiny' or nothing.")
  return config
