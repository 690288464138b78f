"""Experiment configs: every file parses and validates; bad values fail early, naming the key."""

import glob
import os

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from jaxlm import configs, sharding
from jaxlm.experiment import validate
from jaxlm.errors import ConfigError

EXPERIMENTS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "experiments", "*.py")))
VARIANTS = {
  "quickstart.py": [None, "tiny"],
  "pretrain.py": ["gpt2_124m", "gpt2_350m", "llama_1b", "small"],
  "finetune_packages.py": [
    None,
    "head_only",
    "lora",
    "distill",
    "scratch",
    "encoder",
    "tiny",
    "tiny,lora",
    "tiny,encoder",
  ],
  "pretrain_mlm.py": [None, "tiny", "bert_base"],
  "pretrain_t5.py": [None, "tiny", "t5_base"],
  "sft_docstrings.py": [None, "lora", "distill", "t5", "tiny", "tiny,lora", "tiny,t5"],
  "calibrate_packages.py": [None, "tiny", "tiny,lora"],
  "prompted_packages.py": [None, "tiny"],
  "workdir.py": [],
}  # its argument is a workdir: test_workdir_config_file_reads_config_json


def load(path, arg=None, overrides=()):
  """Loads a config file the way main.py does (locked), with `--config.X=Y` overrides."""
  argv = ["prog", f"--config={path}{':' + arg if arg else ''}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_every_experiment_has_known_variants():
  assert {os.path.basename(p) for p in EXPERIMENTS} == set(VARIANTS)


@pytest.mark.parametrize("path", EXPERIMENTS, ids=os.path.basename)
def test_every_experiment_parses_and_validates(path):
  for arg in VARIANTS[os.path.basename(path)]:
    config = load(path, arg)
    model_config = validate(config)
    for key in ("steps", "batch_size", "log_every", "eval_every", "checkpoint_every"):
      assert key in config.train
    assert model_config.vocab_size >= config.data.vocab_size
    assert config.data.seq_len <= model_config.max_len


def test_overrides_apply_and_typos_are_refused():
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "quickstart.py")
  config = load(path, "tiny", ["--config.train.steps=50", "--config.model.num_layers=3"])
  assert (config.train.steps, config.model.num_layers) == (50, 3)
  with pytest.raises(Exception, match="stpes"):
    load(path, "tiny", ["--config.train.stpes=50"])
  with pytest.raises(Exception, match="steps"):
    load(path, "tiny", ["--config.train.steps=many"])


def test_workdir_config_file_reads_config_json_and_takes_overrides(tiny_workdir):
  path = os.path.join(os.path.dirname(__file__), "..", "experiments", "workdir.py")
  config = load(path, tiny_workdir, ["--config.decode.top_p=0.5"])
  saved = configs.from_workdir(tiny_workdir)
  assert config.decode.top_p == 0.5 and saved.decode.top_p == 1.0
  config.decode.top_p = 1.0
  assert config.to_dict() == saved.to_dict()
  with pytest.raises(Exception, match="stpes"):
    load(path, tiny_workdir, ["--config.train.stpes=50"])


def tiny_config() -> ml_collections.ConfigDict:
  config = configs.base_config()
  config.model = configs.model_config_dict("tiny")
  config.data.vocab_size = 512
  config.data.seq_len = 64
  return config


@pytest.mark.parametrize(
  "key, value, message",
  [
    ("model.num_heads", 3, "model.num_heads: 3 heads do not divide embed_dim=64"),
    ("data.seq_len", 4096, "data.seq_len: 4096 exceeds model.max_len=128"),
    ("train.grad_accum_steps", 5, "train.grad_accum_steps: 5 micro-batches do not divide"),
    ("train.schedule", "exponential", "train.schedule"),
    ("data.vocab_size", 100000, "data.vocab_size: 100000 exceeds model.vocab_size=512"),
    ("train.steps", 0, "train.steps: must be positive"),
    ("task", "translation", "task: 'translation'"),
    ("train.trainable", "lora", "train.trainable: 'lora' needs adapters: set model.lora_rank > 0"),
    ("train.trainable", "head", "train.trainable: 'head' trains only a task's new head"),
    ("train.best_mode", "best", "train.best_mode: must be 'min' or 'max'"),
    ("classification.pooling", "max", "classification.pooling: 'max' is not one of"),
    ("classification.class_weights", (1.0, 3.0), "classification.class_weights: has 2 weights for 3 classes"),
    (
      "train.best_metric",
      "eval_loss",
      "train.best_metric: name the metric as in metrics.jsonl's eval rows, e.g. 'loss'",
    ),
  ],
)
def test_invalid_values_fail_with_the_key(key, value, message):
  config = tiny_config()
  if key.startswith("classification."):  # a task's section is checked when that task runs
    config.task, config.classification.num_classes = "classification", 3
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = value
  with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
    validate(config)


def test_unknown_model_key_is_refused():
  config = tiny_config()
  config.model.unlock()
  config.model.num_experts = 8
  with pytest.raises(ConfigError, match="model.num_experts: unknown model option"):
    validate(config)


@pytest.mark.parametrize(
  "mesh, devices, expected",
  [
    (dict(data=-1, fsdp=1, tensor=1), 8, (8, 1, 1)),
    (dict(data=2, fsdp=-1, tensor=2), 8, (2, 2, 2)),
    (dict(data=1, fsdp=1, tensor=-1), 4, (1, 1, 4)),
  ],
)
def test_mesh_shape(mesh, devices, expected):
  assert sharding.mesh_shape(mesh, devices) == expected


@pytest.mark.parametrize(
  "mesh, message",
  [
    (dict(data=-1, fsdp=-1, tensor=1), "at most one"),
    (dict(data=3, fsdp=-1, tensor=1), "do not divide"),
    (dict(data=2, fsdp=2, tensor=1), "set one of"),
    (dict(data=0, fsdp=1, tensor=-1), "mesh.data"),
  ],
)
def test_bad_mesh_is_a_clear_error(mesh, message):
  with pytest.raises(ConfigError, match=message):
    sharding.mesh_shape(mesh, 8)


def test_mesh_num_devices_takes_the_first_devices_of_one_process():
  import jax

  assert sharding.mesh_devices(dict(data=-1, fsdp=1, tensor=1)) == jax.devices()  # no num_devices: all of them
  mesh = sharding.create_mesh(dict(data=-1, fsdp=1, tensor=1, num_devices=2))
  assert list(mesh.devices.flat) == jax.devices()[:2] and mesh.shape["data"] == 2
  for bad in (0, -2, len(jax.devices()) + 1):
    with pytest.raises(ConfigError, match="mesh.num_devices"):
      sharding.mesh_devices(dict(data=-1, fsdp=1, tensor=1, num_devices=bad))
