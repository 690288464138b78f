"""Shared experiment defaults and model-size presets: configs are data.

Experiment files in `experiments/` start from `base_config()` and change what
they need. Each section is validated by the module that owns it, all together
by `jaxlm.experiment.validate(config)` before anything is built or compiled.
`from_workdir(path)` reads a run's `config.json` back (what every mode but
`train` uses when no `--config` is given). `experiment_config("quickstart", "tiny")`
loads an experiment file the way `--config=experiments/quickstart.py:tiny` does
(for notebooks and scripts).
"""

import dataclasses
import importlib.util
import json
import os

import ml_collections

from jaxlm.errors import ConfigError
from jaxlm.models.config import PRESETS, ModelConfig

# The experiment files of the checkout this jaxlm is imported from (a clone, or an editable install of one).
EXPERIMENTS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")

# The architectures of the small encoder and encoder-decoder runs, on top of a size preset: a pretraining run and
# the fine-tunes that start from it must build the same model, so they read it from here.
# BERT-like encoder, pre-LayerNorm with rotary positions (at the small size it learns much faster than BERT's
# post-norm with learned positions, which the `bert_base` preset keeps): pretrain_mlm.py, finetune_packages.py:encoder.
ENCODER_STYLE = dict(
  family="encoder", position="rotary", norm="layernorm", embed_norm=True, mlp="gelu", use_bias=True, pooler=True
)
# T5: pre-RMSNorm, relative position bias, unscaled attention, ReLU MLP, tied head: pretrain_t5.py,
# sft_docstrings.py:t5. Without T5's D**-0.5 on the tied head's input (`tied_logits_scale`, kept by the t5_base
# preset and Hugging Face imports): T5 pairs it with N(0, 1) embeddings; with jaxlm's N(0, init_std) ones it
# leaves the logits ~100x too small, and pretrain_t5.py's default stalled at the unigram distribution (eval
# token accuracy flat at 0.079 over its 220 steps; without the scale: 0.092 after 30 steps).
T5_STYLE = dict(family="encoder_decoder", position="relative", norm="rmsnorm", mlp="relu", scale_attention=False)


def model_config_dict(preset: str = "small", **overrides) -> ml_collections.ConfigDict:
  """The `model` section: every ModelConfig field, from a preset plus overrides (0 sizes left for
  ModelConfig to resolve, so that an override of `num_heads` also moves the default `num_kv_heads`)."""
  if preset not in PRESETS:
    raise ConfigError(f"Unknown model preset {preset!r}; known presets: {sorted(PRESETS)}.")
  values = {field.name: field.default for field in dataclasses.fields(ModelConfig)}
  values.update({**PRESETS[preset], **overrides})
  ModelConfig(**values)  # fails here, naming the key, if the preset and overrides do not fit together
  return ml_collections.ConfigDict(values)


def base_config() -> ml_collections.ConfigDict:
  """Defaults shared by every training experiment (each key has a one-line comment)."""
  config = ml_collections.ConfigDict()
  config.task = "causal_lm"  # objective (jaxlm/tasks/): causal_lm, masked_lm, span_corruption, classification, seq2seq
  config.seed = 0  # seeds parameter init, data shuffling and dropout
  config.init_from = ""  # WORKDIR or WORKDIR/checkpoints/<step> of a pretrained run, or hf:DIR (Hugging Face)

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
  config.data.tokenizer = ""  # SentencePiece .model; '' = init_from's, else one trained on the train split (cached)
  config.data.vocab_size = 4096  # size of a tokenizer trained here (model.vocab_size must be >= it)
  config.data.seq_len = 256  # tokens per packed row
  config.data.shuffle_window = 1024  # packed training rows shuffled together (spreads long documents)
  config.data.num_streams = (
    0  # document streams per batch; 0 = one per process (fix it: same data on any process count)
  )

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
  config.train.best_metric = "loss"  # eval metric (as named in metrics.jsonl) ranking checkpoints, e.g. accuracy
  config.train.best_mode = "min"  # "min" or "max": which way best_metric is better
  config.train.early_stopping_patience = 0  # stop after this many evaluations without a better best_metric; 0 = off
  config.train.trainable = "all"  # what trains: "all" (full), "head" (task's new layer only), "lora" (adapters + head)
  config.train.skip_nonfinite_updates = False  # NaN/Inf update: False = stop (last checkpoint kept), True = skip it
  config.train.prune = ml_collections.ConfigDict()  # gradual pruning while training (compression/pruning.py)
  config.train.prune.sparsity = 0.0  # magnitude pruning: final fraction of targeted weights at zero; 0 = off
  config.train.prune.structure = ""  # N:M structured sparsity instead, e.g. "2:4"; '' = unstructured
  config.train.prune.scope = "layer"  # magnitude ranking per "layer" (each kernel, each layer of a stack) or "global"
  config.train.prune.start_step = 0  # schedule: masks recomputed from this step (sparsity ramps up cubically) ...
  config.train.prune.end_step = 0  # ... to this one, where the target sparsity is reached and the masks freeze
  config.train.prune.every = 10  # steps between mask updates on the ramp
  config.train.prune.targets = r"kernel$"  # regex of parameter paths pruned (default: kernels, never norms/embeddings)
  config.train.frozen = ""  # regex of parameter paths also kept frozen, e.g. "token_embed|attention"; '' = none

  config.classification = ml_collections.ConfigDict()
  config.classification.num_classes = 0  # classes C; 0 = from the dataset's label feature (config.json records it)
  config.classification.pooling = "last"  # hidden state the head reads: "last" non-pad token, "first" or "mean"
  config.classification.label_smoothing = 0.0  # eps: target = (1 - eps) one-hot + eps / classes
  config.classification.focal_gamma = 0.0  # focal loss (1 - p)^gamma * CE; 0 = plain cross-entropy
  config.classification.focal_adaptive = False  # adaptive gamma of Mukhoti et al. 2020 (5 if p < 0.2 else 3)
  config.classification.class_weights = ()  # loss weight per class, e.g. "(1.0, 3.0)"; () = all classes weigh 1

  config.corruption = ml_collections.ConfigDict()
  config.corruption.rate = 0.15  # masked_lm: fraction of tokens predicted (80% [MASK], 10% random, 10% kept);
  # span_corruption: noise density (fraction of tokens in dropped spans)
  config.corruption.mean_span_length = 3.0  # span_corruption: mean length of a dropped span (T5: 3)
  config.corruption.num_sentinels = 100  # span_corruption: sentinel pieces reserved in the tokenizer (T5: 100)

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
  config.decode.quantize = ""  # weight-only quantized kernels, quantized at load: 'int8', 'int4-g64', ...; '' = none

  config.calibration = ml_collections.ConfigDict()  # --mode=calibrate of a classifier (and the reports of --mode=eval)
  config.calibration.calibrators = ()  # evaluation.calibrators names; () = all that apply (platt: 2 classes only)
  config.calibration.fit_split = "validation"  # split the calibrators are fitted on (tested on data.test_split)
  config.calibration.num_bins = 15  # equal-width bins of ECE, MCE and the reliability diagrams
  config.calibration.num_resamples = 1000  # bootstrap resamples of every confidence interval and paired test
  config.calibration.confidence = 0.95  # level of the confidence intervals

  config.prompt = ml_collections.ConfigDict()  # --mode=calibrate of a language model: prompted classification
  config.prompt.templates = ("{text}\n# package:",)  # prompt templates, each with one {text}; label word follows
  config.prompt.label_words = ()  # one per class, appended to the prompt; () = " " + each class name of the data
  config.prompt.score = "sum"  # a multi-token label word scores the "sum" or "mean" of its token log-probs
  config.prompt.shots = (0,)  # settings: demonstrations per prompt, drawn from data.train_split
  config.prompt.orders = 1  # demonstration draws (seeds 0..orders-1) per template of a few-shot setting
  config.prompt.corrections = ("none", "contextual", "domain", "batch", "pmi")  # see evaluation/prompting.py
  config.prompt.content_free = ("N/A", "", "[MASK]")  # contextual calibration's content-free inputs
  config.prompt.domain_texts = 20  # domain-context calibration's random in-domain texts
  config.prompt.batch_size = 32  # batch calibration: test inputs per update of the running label prior
  config.prompt.split = "test"  # split classified
  config.prompt.num_examples = 200  # examples of it (a fixed shuffled sample); -1 = the whole split
  config.prompt.max_text_tokens = 48  # each input and demonstration cut to its first this many tokens
  config.prompt.prompts_per_batch = 4  # prompts per forward pass (each as one row per label word)

  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # data-parallel ways; -1 = all devices left
  config.mesh.fsdp = 1  # parameter-sharding (ZeRO-3) ways
  config.mesh.tensor = 1  # tensor-parallel ways
  # The first N of a one-process run's devices (-1: all): a debugging run on one device of a host, a small model
  # on one of 8 simulated CPU devices (the tests), without hiding the others from JAX.
  config.mesh.num_devices = -1
  return config


def _merge(config: ml_collections.ConfigDict, values: dict, prefix: str = "") -> None:
  """Sets `values` (nested dicts from JSON) into `config`; JSON lists become tuples where the config has one."""
  for key, value in values.items():
    if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict):
      _merge(config[key], value, f"{prefix}{key}.")
    elif key in config:
      config[key] = tuple(value) if isinstance(config[key], tuple) else value
    else:
      raise ConfigError(f"{prefix}{key}: in config.json but not a key of this jaxlm version's config; remove it.")


def from_workdir(workdir: str) -> ml_collections.ConfigDict:
  """The resolved config of the run in `workdir` (its config.json over today's defaults), locked.

  Keys added to jaxlm since the run keep their defaults; a key jaxlm no longer knows is an error.
  """
  path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist: {workdir} is not a jaxlm workdir (train one with --mode=train, "
      "or pass --config=experiments/X.py)."
    )
  with open(path) as f:
    values = json.load(f)
  config = base_config()
  _merge(config, values)
  config.lock()
  return config


def experiment_config(name: str, arg: str | None = None) -> ml_collections.ConfigDict:
  """`get_config(arg)` of `experiments/NAME.py` (or of the file NAME, a path ending in .py), locked, as
  `--config=experiments/NAME.py:ARG` loads it: a typo in a later `config.a.b = ...` is an error."""
  path = name if name.endswith(".py") else os.path.join(EXPERIMENTS_DIR, f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"{path} does not exist. Experiment configs live in the experiments/ folder of a jaxlm "
      "checkout: clone the repository and `pip install -e` it (or pass a path to the file)."
    )
  spec = importlib.util.spec_from_file_location(f"experiments_{os.path.basename(path)[:-3]}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg is not None else module.get_config()
  config.lock()
  return config
