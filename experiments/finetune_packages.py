"""Fine-tune the quickstart model to name the standard-library package of a function (19 classes).

  python -m jaxlm.main --config=experiments/finetune_packages.py --workdir=runs/packages \
      --config.init_from=runs/quickstart

Variants (`--config=experiments/finetune_packages.py:VARIANT`), all on the same
splits of the built-in `pystdlib_packages`, each a switch on the same loop:
  full       (default) every parameter trains;
  head_only  only the new classification head trains ("replace the last layer"; a higher learning rate);
  lora       rank-8 LoRA adapters on the attention query/value and MLP kernels, plus the head; base weights frozen;
  distill    full fine-tuning plus KL to a teacher: set --config.distill.teacher=WORKDIR_OF_A_FULL_RUN;
  scratch    the same model and steps from a random init (no init_from): what pretraining is worth;
  encoder    the MLM-pretrained encoder of `experiments/pretrain_mlm.py` (init_from=runs/mlm) with a linear head
             on its first token ("BERT + a fully connected layer"; classification.pooling='pooler' reads the pooler);
  tiny       seconds on CPU, for tests (from a `quickstart.py:tiny` workdir); combine as "tiny,lora".
Validation accuracy is evaluated every `train.eval_every` steps; the best checkpoint by it is evaluated on the
test split into WORKDIR/eval/report.json (accuracy, macro-F1, the majority-class baseline, parameter counts).
Other knobs: classification.pooling/label_smoothing/focal_adaptive/class_weights, train.frozen (regex).

Public TFDS sets of the same shape (prepared once with `tfds build NAME --file_format=array_record`):
  --config.data.name=imdb_reviews --config.data.eval_split=test --config.data.test_split=''
  --config.data.name=glue/sst2 --config.data.text_field=sentence --config.data.test_split=''  (test labels hidden)
  --config.data.name=ag_news_subset --config.data.text_field=description --config.data.eval_split=test \
      --config.data.test_split=''
"""

from jaxlm import configs

VARIANTS = ("full", "head_only", "lora", "distill", "scratch", "encoder", "tiny")


def get_config(arg: str | None = None):
  variants = set(arg.split(",")) if arg else set()
  if variants - set(VARIANTS):
    raise ValueError(f"Unknown finetune_packages variants {sorted(variants - set(VARIANTS))}; use {VARIANTS}.")
  config = configs.base_config()
  config.task = "classification"
  config.init_from = "runs/quickstart"  # the quickstart workdir (its latest checkpoint and its tokenizer)
  config.model = configs.model_config_dict("small")  # must match the pretrained run
  config.data.name = "pystdlib_packages"
  config.data.test_split = "test"
  config.data.seq_len = 96  # function sources cut to their first 94 tokens (signature and beginning)
  config.train.steps = 250
  config.train.batch_size = 32
  config.train.learning_rate = 1e-3
  config.train.warmup_steps = 25
  config.train.weight_decay = 0.01
  config.train.log_every = 10
  config.train.eval_every = 50
  config.train.checkpoint_every = 50
  config.train.keep_checkpoints = 1
  config.train.best_metric = "accuracy"
  config.train.best_mode = "max"
  config.train.early_stopping_patience = 3
  config.eval.batch_size = 64
  config.eval.num_batches = -1  # the whole validation split
  config.sample.prompt = ""

  if "encoder" in variants:
    config.init_from = "runs/mlm"  # a pretrain_mlm.py workdir
    config.model = configs.model_config_dict("small", **configs.ENCODER_STYLE)
    config.classification.pooling = "first"
  if "head_only" in variants:
    config.train.trainable = "head"
    config.train.learning_rate = 5e-3
  if "lora" in variants:
    config.model.lora_rank = 8
    config.model.lora_alpha = 16.0
    config.model.lora_targets = "attention/(query|value)|mlp/(gate|up|down)"
    config.train.trainable = "lora"
    config.train.learning_rate = 2e-3
  if "distill" in variants:
    config.distill.teacher = "runs/packages_full"  # a finished full fine-tune of this config
    config.distill.weight = 0.5
    config.distill.temperature = 2.0
  if "scratch" in variants:
    config.init_from = ""
    config.data.vocab_size = config.model.vocab_size  # trains its own tokenizer unless data.tokenizer is set
  if "tiny" in variants:
    config.init_from = ""  # tests point it at a quickstart.py:tiny workdir
    config.model = configs.model_config_dict(
      "tiny",
      lora_rank=config.model.lora_rank,
      lora_targets=config.model.lora_targets,
      **(configs.ENCODER_STYLE if "encoder" in variants else {}),
    )
    config.data.vocab_size = 512
    config.data.seq_len = 64
    config.train.steps = 6
    config.train.batch_size = 8
    config.train.warmup_steps = 1
    config.train.log_every = 1
    config.train.eval_every = 3
    config.train.checkpoint_every = 3
    config.eval.batch_size = 8
    config.eval.num_batches = 2
  return config
