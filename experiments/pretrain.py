"""Pretraining presets for accelerators: `--config=experiments/pretrain.py:PRESET`.

  python -m jaxlm.main --config=experiments/pretrain.py:gpt2_124m --workdir=runs/gpt2 \
      --config.data.name=c4 --config.data.tokenizer=/path/to/spm.model

PRESET is a model size from `jaxlm.models.PRESETS` (gpt2_124m,
gpt2_350m, llama_1b, small, tiny). Defaults train on the built-in
`pystdlib_lm` corpus; point `data.name` at a prepared TFDS dataset (c4,
lm1b, ...) and `data.tokenizer` at a SentencePiece model for real runs.
"""

from jaxlm import configs

# Per preset: (sequence length, global batch in rows, peak learning rate, steps).
SCHEDULES = {
  "tiny": (64, 8, 3e-3, 100),
  "small": (256, 32, 3e-3, 2000),
  "gpt2_124m": (1024, 512, 6e-4, 20000),
  "gpt2_350m": (1024, 512, 3e-4, 40000),
  "llama_1b": (2048, 512, 3e-4, 50000),
}


def get_config(preset: str = "gpt2_124m"):
  if preset not in SCHEDULES:
    raise ValueError(f"Unknown preset {preset!r}; choose one of {sorted(SCHEDULES)}.")
  seq_len, batch_size, learning_rate, steps = SCHEDULES[preset]
  config = configs.base_config()
  config.model = configs.model_config_dict(preset)
  if preset not in ("tiny", "small"):
    config.model.dtype = "bfloat16"  # bf16 compute, float32 master weights
    config.data.vocab_size = 32000  # when training a tokenizer here
  else:
    config.data.vocab_size = config.model.vocab_size
  config.data.seq_len = seq_len
  config.train.batch_size = batch_size
  config.train.learning_rate = learning_rate
  config.train.steps = steps
  config.train.warmup_steps = max(steps // 50, 10)
  config.train.log_every = 10 if preset in ("tiny", "small") else 50
  config.train.eval_every = max(steps // 20, 10)
  config.train.checkpoint_every = max(steps // 20, 10)
  config.eval.batch_size = min(batch_size, 64)
  return config
