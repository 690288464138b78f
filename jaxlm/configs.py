"""Shared experiment defaults, model-size presets and config validation.

Experiment files in `experiments/` start from `base_config()` and change
what they need; `validate(config)` runs before anything is built or compiled
and names the offending key in its error.
"""

import dataclasses

import ml_collections

from jaxlm import tasks
from jaxlm.data import pipeline
from jaxlm.inference import decode
from jaxlm.models import heads
from jaxlm.models.config import DTYPES, ConfigError, ModelConfig
from jaxlm.training import optim

# Model-size presets: overrides of ModelConfig's defaults.
MODEL_PRESETS = {
    # A few hundred K parameters: unit tests and CI end-to-end runs.
    "tiny": dict(vocab_size=512, embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128, max_len=128),
    # The quickstart model: trains on 2 CPU cores in minutes.
    "small": dict(vocab_size=4096, embed_dim=192, num_layers=4, num_heads=4, mlp_dim=512, max_len=512),
    # GPT-2 small (124M with a 50257-row vocabulary; padded to 50304 for fast matmuls).
    "gpt2_124m": dict(vocab_size=50304, embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072, max_len=1024,
                      position="learned", norm="layernorm", mlp="gelu", use_bias=True, norm_eps=1e-5),
    # GPT-2 medium (350M).
    "gpt2_350m": dict(vocab_size=50304, embed_dim=1024, num_layers=24, num_heads=16, mlp_dim=4096, max_len=1024,
                      position="learned", norm="layernorm", mlp="gelu", use_bias=True, norm_eps=1e-5),
    # Llama-3.2-1B shape with a 32K vocabulary (1.0B parameters): GQA, RoPE, RMSNorm, SwiGLU.
    "llama_1b": dict(vocab_size=32000, embed_dim=2048, num_layers=16, num_heads=32, num_kv_heads=8,
                     mlp_dim=8192, max_len=4096, rope_theta=500000.0, norm_eps=1e-5),
}


def model_config_dict(preset: str = "small", **overrides) -> ml_collections.ConfigDict:
  """The `model` section: every ModelConfig field, from a preset plus overrides."""
  if preset not in MODEL_PRESETS:
    raise ConfigError(f"Unknown model preset {preset!r}; known presets: {sorted(MODEL_PRESETS)}.")
  values = dataclasses.asdict(ModelConfig(**{**MODEL_PRESETS[preset], **overrides}))
  return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every training experiment (each key has a one-line comment)."""
  config = ml_collections.ConfigDict()
  config.task = "causal_lm"  # objective (jaxlm/tasks/): causal_lm, classification or seq2seq (prompt-masked SFT)
  config.seed = 0  # seeds parameter init, data shuffling and dropout
  config.init_from = ""  # WORKDIR or WORKDIR/checkpoints/<step> of a pretrained run: backbone + tokenizer

  config.model = model_config_dict("small")

  config.data = ml_collections.ConfigDict()
  config.data.name = "pystdlib_lm"  # built-in corpus or TFDS name (tiny_shakespeare, lm1b, c4, ...)
  config.data.data_dir = ""  # TFDS data directory; '' = $TFDS_DATA_DIR or ~/tensorflow_datasets
  config.data.text_field = "text"  # record field that holds the document text (seq2seq: the prompt)
  config.data.label_field = "label"  # classification: record field with the integer class
  config.data.target_field = "target"  # seq2seq: record field with the target text
  config.data.separator = "\n"  # seq2seq: text between prompt and target
  config.data.truncation = "right"  # padded tasks: cut a too-long text (prompt) at its "right" end or its "left"
  config.data.train_split = "train"  # split trained on
  config.data.eval_split = "validation"  # split evaluated on every train.eval_every steps
  config.data.test_split = ""  # split of the final evaluation (best checkpoint) -> WORKDIR/eval/report.json; '' = none
  config.data.tokenizer = ""  # SentencePiece .model; '' = train one on the train split (cached in data_dir)
  config.data.vocab_size = 4096  # size of a tokenizer trained here (model.vocab_size must be >= it)
  config.data.seq_len = 256  # tokens per packed row
  config.data.shuffle_window = 1024  # packed training rows shuffled together (spreads long documents)
  config.data.num_streams = 0  # document streams per batch; 0 = one per process (fix it: same data on any process count)

  config.train = ml_collections.ConfigDict()
  config.train.steps = 1000  # optimizer steps
  config.train.batch_size = 32  # global batch (rows of data.seq_len tokens)
  config.train.grad_accum_steps = 1  # micro-batches per step (batch_size must divide evenly)
  config.train.learning_rate = 3e-4  # peak learning rate
  config.train.schedule = "cosine"  # after warmup: cosine, linear or constant
  config.train.warmup_steps = 100  # linear warmup from 0 to the peak
  config.train.end_learning_rate_fraction = 0.1  # final LR as a fraction of the peak (cosine/linear)
  config.train.weight_decay = 0.1  # AdamW decoupled decay on kernels and embeddings (not norms, biases)
  config.train.b1 = 0.9  # Adam beta1
  config.train.b2 = 0.95  # Adam beta2
  config.train.eps = 1e-8  # Adam epsilon
  config.train.grad_clip = 1.0  # clip by global norm; 0 disables
  config.train.log_every = 10  # steps between train-metric rows
  config.train.eval_every = 200  # steps between evaluations; 0 = only at the end
  config.train.checkpoint_every = 200  # steps between checkpoints (a final one is always written)
  config.train.keep_checkpoints = 2  # most recent checkpoints kept (plus the best by train.best_metric)
  config.train.best_metric = "eval_loss"  # eval metric that ranks checkpoints, e.g. eval_accuracy, eval_macro_f1
  config.train.best_mode = "min"  # "min" or "max": which way best_metric is better
  config.train.early_stopping_patience = 0  # stop after this many evaluations without a better best_metric; 0 = off
  config.train.trainable = "all"  # what trains: "all" (full), "head" (task's new layer only), "lora" (adapters + head)
  config.train.frozen = ""  # regex of parameter paths also kept frozen, e.g. "token_embed|attention"; '' = none

  config.classification = ml_collections.ConfigDict()
  config.classification.pooling = "last"  # hidden state the head reads: "last" non-pad token, "first" or "mean"
  config.classification.label_smoothing = 0.0  # eps: target = (1 - eps) one-hot + eps / classes
  config.classification.focal_gamma = 0.0  # focal loss (1 - p)^gamma * CE; 0 = plain cross-entropy
  config.classification.focal_adaptive = False  # adaptive gamma of Mukhoti et al. 2020 (5 if p < 0.2 else 3)
  config.classification.class_weights = ()  # loss weight per class, e.g. "(1.0, 3.0)"; () = all classes weigh 1

  config.distill = ml_collections.ConfigDict()
  config.distill.teacher = ""  # WORKDIR or checkpoint of a teacher for the same task; '' = no distillation
  config.distill.weight = 0.5  # loss = (1 - weight) task loss + weight tau^2 KL(teacher || student)
  config.distill.temperature = 2.0  # tau, softening both distributions

  config.eval = ml_collections.ConfigDict()
  config.eval.batch_size = 32  # global eval batch
  config.eval.num_batches = 20  # batches per evaluation (a fixed sample of the split); -1 = whole split
  config.eval.generate_examples = 0  # seq2seq: test examples decoded greedily for exact match / ROUGE-L in the report
  config.eval.max_new_tokens = 32  # tokens generated for each of them

  config.sample = ml_collections.ConfigDict()
  config.sample.prompt = "def "  # prompt of the greedy sample printed at the end ('' = no sample)
  config.sample.max_new_tokens = 64  # tokens generated for it

  config.decode = ml_collections.ConfigDict()
  config.decode.strategy = "greedy"  # --mode=generate: greedy, sample or beam
  config.decode.max_new_tokens = 64  # tokens generated per prompt (fewer if EOS comes first)
  config.decode.temperature = 1.0  # sample: logits are divided by it (> 0)
  config.decode.top_k = 0  # sample: keep the k most likely tokens; 0 = all
  config.decode.top_p = 1.0  # sample: nucleus, keep the smallest set of tokens with this probability; 1 = all
  config.decode.beam_size = 4  # beam: hypotheses kept per prompt
  config.decode.length_penalty = 0.0  # beam: score = sum of log-probs / length ** length_penalty
  config.decode.seed = 0  # PRNG seed of sampling
  config.decode.dtype = ""  # weights and activations while decoding ('bfloat16', ...); '' = as trained

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel ways; -1 = all devices left
  config.mesh.fsdp = 1  # parameter-sharding (ZeRO-3) ways
  config.mesh.tensor = 1  # tensor-parallel ways
  return config


SCHEDULES = ("cosine", "linear", "constant")


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks the whole config before anything is built; returns the frozen ModelConfig.

  Raises ConfigError naming the key and the fix. (Unknown keys and wrong
  types are already refused by the locked ConfigDict when overrides apply.)
  """

  def check(ok: bool, key: str, message: str):
    if not ok:
      raise ConfigError(f"{key}: {message}")

  for section in ("model", "data", "train", "eval", "sample", "decode", "mesh", "classification", "distill"):
    check(section in config, section, "missing section; start the config from jaxlm.configs.base_config().")
  check(config.task in tasks.TASKS, "task", f"{config.task!r} is not one of {tasks.TASKS}.")
  model_config = ModelConfig.from_config(config.model)

  train, data = config.train, config.data
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    check(train[key] > 0, f"train.{key}", f"must be positive, got {train[key]}.")
  check(train.eval_every >= 0, "train.eval_every", f"must be >= 0, got {train.eval_every}.")
  check(train.warmup_steps >= 0, "train.warmup_steps", f"must be >= 0, got {train.warmup_steps}.")
  check(train.learning_rate > 0, "train.learning_rate", f"must be positive, got {train.learning_rate}.")
  check(train.schedule in SCHEDULES, "train.schedule", f"{train.schedule!r} is not one of {SCHEDULES}.")
  check(train.batch_size % train.grad_accum_steps == 0, "train.grad_accum_steps",
        f"{train.grad_accum_steps} micro-batches do not divide train.batch_size={train.batch_size}.")
  check(data.seq_len > 1, "data.seq_len", f"must be at least 2, got {data.seq_len}.")
  check(data.seq_len <= model_config.max_len, "data.seq_len",
        f"{data.seq_len} exceeds model.max_len={model_config.max_len}; raise model.max_len or lower data.seq_len.")
  check(bool(data.name), "data.name", "must name a dataset.")
  check(data.num_streams >= 0, "data.num_streams", f"must be >= 0 (0 = one per process), got {data.num_streams}.")
  check(data.tokenizer or data.vocab_size > 4, "data.vocab_size", "must exceed the 4 special pieces.")
  check(data.tokenizer or data.vocab_size <= model_config.vocab_size, "data.vocab_size",
        f"{data.vocab_size} exceeds model.vocab_size={model_config.vocab_size}; the embedding table needs a "
        "row per token.")
  check(config.eval.batch_size > 0, "eval.batch_size", f"must be positive, got {config.eval.batch_size}.")
  check(config.eval.num_batches == -1 or config.eval.num_batches > 0, "eval.num_batches",
        f"must be positive or -1 (whole split), got {config.eval.num_batches}.")
  check(config.sample.max_new_tokens >= 0, "sample.max_new_tokens", "must be >= 0.")
  decode.DecodeSettings.from_config(config.decode)
  check(config.decode.dtype in ("", *DTYPES), "decode.dtype", f"{config.decode.dtype!r} is not '' or one of "
        f"{tuple(DTYPES)}.")
  check(data.truncation in pipeline.TRUNCATIONS, "data.truncation",
        f"{data.truncation!r} is not one of {pipeline.TRUNCATIONS}.")
  check(train.best_mode in ("min", "max"), "train.best_mode", f"must be 'min' or 'max', got {train.best_mode!r}.")
  check(train.best_metric.startswith("eval_"), "train.best_metric",
        f"{train.best_metric!r} must name an eval metric, e.g. eval_loss or eval_accuracy.")
  check(train.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0 = off).")
  check(train.trainable in optim.TRAINABLE, "train.trainable",
        f"{train.trainable!r} is not one of {optim.TRAINABLE}.")
  check(train.trainable != "head" or config.task == "classification", "train.trainable",
        f"'head' trains only a task's new head, and task {config.task!r} adds none; use 'all', 'lora' or train.frozen.")
  check(train.trainable != "lora" or model_config.lora_rank > 0, "train.trainable",
        "'lora' needs adapters: set model.lora_rank > 0 (and model.lora_targets).")
  check(config.classification.pooling in heads.POOLINGS, "classification.pooling",
        f"{config.classification.pooling!r} is not one of {heads.POOLINGS}.")
  check(0.0 <= config.classification.label_smoothing < 1.0, "classification.label_smoothing", "must be in [0, 1).")
  check(config.classification.focal_gamma >= 0, "classification.focal_gamma", "must be >= 0.")
  check(0.0 <= config.distill.weight <= 1.0, "distill.weight", f"must be in [0, 1], got {config.distill.weight}.")
  check(config.distill.temperature > 0, "distill.temperature", f"must be positive, got {config.distill.temperature}.")
  check(config.eval.generate_examples >= 0, "eval.generate_examples", "must be >= 0.")
  return model_config
