"""T5-style span-corruption pretraining of an encoder-decoder on the built-in `pystdlib_lm` corpus.

  python -m jaxlm.main --config=experiments/pretrain_t5.py --workdir=runs/t5

The default is the quickstart's size and time (a few minutes on 2 CPU cores): pre-RMSNorm blocks, T5's
relative position bias (shared across layers) and unscaled attention, tied embeddings (without T5's logit
scale: see `configs.T5_STYLE`); 15% of the tokens dropped in spans of mean length 3, each span a sentinel
piece reserved in the tokenizer. Eval rows of
WORKDIR/metrics.jsonl have `loss` and `token_accuracy` of the targets. Variants:
  tiny     seconds on CPU: tests and smoke runs;
  t5_base  t5-base's shape (223M) for accelerators; point data.* at a real corpus and tokenizer.
`--mode=generate` on the workdir decodes with the encoder run once (decode.strategy greedy/sample/beam).
"""

from jaxlm import configs


def get_config(arg: str | None = None):
  config = configs.base_config()
  config.task = "span_corruption"
  config.model = configs.model_config_dict("small", **configs.T5_STYLE)
  config.corruption.rate = 0.15  # noise density
  config.corruption.mean_span_length = 3.0
  config.corruption.num_sentinels = 32  # >= the spans of a row (14 for 256-token inputs)
  config.data.seq_len = 256  # encoder input tokens; the decoder reads ~0.2 of it
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
    config.model = configs.model_config_dict("tiny", **configs.T5_STYLE)
    config.corruption.num_sentinels = 8
    config.data.vocab_size = 512
    config.data.seq_len = 64
    config.train.steps = 400
    config.train.batch_size = 32
    config.train.learning_rate = 3e-3
    config.train.warmup_steps = 10
    config.train.log_every = 50
    config.train.eval_every = 10  # the first evaluation early: the test compares the last with it
    config.train.checkpoint_every = 400
    config.eval.batch_size = 16
    config.eval.num_batches = 2
    config.sample.max_new_tokens = 16
  elif arg == "t5_base":
    config.model = configs.model_config_dict("t5_base", dtype="bfloat16")
    config.corruption.num_sentinels = 100
    config.data.vocab_size = 32000
    config.data.seq_len = 512
    config.train.batch_size = 128
    config.train.learning_rate = 1e-3
    config.train.steps = 100000
    config.train.warmup_steps = 10000
    config.train.log_every = 100
    config.train.eval_every = 5000
    config.train.checkpoint_every = 5000
  elif arg:
    raise ValueError(f"Unknown pretrain_t5 variant {arg!r}; use 'tiny', 't5_base' or nothing.")
  return config
