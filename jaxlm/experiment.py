"""`Experiment`: the one setup seam. A config (or a workdir) in; task, model, tokenizer, mesh, data and
parameters out, and the things a researcher does with them.

    experiment = Experiment.from_config(config, workdir)   # or Experiment.from_workdir("runs/quickstart")
    experiment.train()                                      # the one loop (jaxlm.training.loop)
    params = experiment.load_params("best")                 # parameters alone, in their shardings
    experiment.evaluate(params, "test")                     # {"loss": ..., "accuracy": ...}
    experiment.predict(params, "validation")                # per-example logits, labels, weights
    experiment.generate(params, ["def "])                   # texts in, texts out
    experiment.plan()                                       # memory per device, nothing compiled

The CLI (`jaxlm.main`), the scripts, the notebooks and the tests all build their setup here, so there is
one answer to "which tokenizer, which model, which mesh". Everything is built lazily: generating from a
workdir never touches its dataset, planning never touches a device.

A workdir is self-contained: `config.json` (the resolved config), `tokenizer.model` (a copy of the run's
tokenizer: a SentencePiece model, or a Hugging Face tokenizer.json with its special tokens inside), `checkpoints/`,
`metrics.jsonl`, `eval/`. Copied elsewhere it loses nothing.
"""

import dataclasses
import functools
import itertools
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from jaxlm import configs, plan, sharding, tasks
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.errors import ConfigError, check
from jaxlm.evaluation import calibrators, prompting
from jaxlm.inference import decode
from jaxlm.inference import generate as generate_lib
from jaxlm.interop import hf
from jaxlm.models import lora, quantize
from jaxlm.models import params as params_lib
from jaxlm.models.config import ModelConfig
from jaxlm.tasks import distillation
from jaxlm.training import checkpoint, loop, optim, steps

TOKENIZER_FILE = "tokenizer.model"  # the workdir's copy of its tokenizer
EVAL_ORDER_SEED = 0  # fixed, so every run and seed evaluates on the same documents
SECTIONS = (
  "model",
  "data",
  "train",
  "eval",
  "sample",
  "decode",
  "mesh",
  "classification",
  "distill",
  "calibration",
  "prompt",
  "corruption",
)


def validate(config: ml_collections.ConfigDict) -> ModelConfig:
  """Checks the whole config before anything is built; returns the frozen ModelConfig.

  Each section is checked by the module that owns it; how the sections fit together is checked here.
  Raises ConfigError naming the key and the fix. (Unknown keys and wrong types are already refused by the
  locked ConfigDict when overrides apply.)
  """
  for section in SECTIONS:
    check(section in config, section, "missing section; start the config from jaxlm.configs.base_config().")
  task_class = tasks.task_class(config.task)
  model_config = ModelConfig.from_config(config.model)
  pipeline.check_config(config.data)
  optim.check_config(config.train)
  loop.check_config(config)
  decode.check_config(config.decode)
  task_class.check_config(config)
  distillation.check_config(config.distill)
  calibrators.check_config(config.calibration)
  prompting.check_config(config.prompt)

  data, train = config.data, config.train
  check(
    data.seq_len <= model_config.max_len,
    "data.seq_len",
    f"{data.seq_len} exceeds model.max_len={model_config.max_len}; raise model.max_len or lower data.seq_len.",
  )
  check(
    bool(data.tokenizer) or data.vocab_size <= model_config.vocab_size,
    "data.vocab_size",
    f"{data.vocab_size} exceeds model.vocab_size={model_config.vocab_size}; the embedding table needs a row per token.",
  )
  check(
    train.trainable != "head" or task_class.new_params is not None,
    "train.trainable",
    f"'head' trains only a task's new head, and task {config.task!r} adds none; use 'all', 'lora' or train.frozen.",
  )
  check(
    train.trainable != "lora" or model_config.lora_rank > 0,
    "train.trainable",
    "'lora' needs adapters: set model.lora_rank > 0 (and model.lora_targets).",
  )
  check(config.eval.batch_size > 0, "eval.batch_size", f"must be positive, got {config.eval.batch_size}.")
  check(
    config.eval.num_batches == -1 or config.eval.num_batches > 0,
    "eval.num_batches",
    f"must be positive or -1 (whole split), got {config.eval.num_batches}.",
  )
  check(config.eval.generate_examples >= 0, "eval.generate_examples", "must be >= 0.")
  check(config.eval.max_new_tokens > 0, "eval.max_new_tokens", "must be positive.")
  return model_config


@dataclasses.dataclass
class Predictions:
  """Per-example outputs of a split (`Experiment.predict`), host NumPy arrays; padding rows removed.

  Row-level tasks (classification): logits [N, C], labels [N], weights [N]. Token-level tasks (language
  models): logits [N, T, V], labels [N, T] (the next token), weights [N, T] (0 = not a target).
  """

  logits: np.ndarray
  labels: np.ndarray
  weights: np.ndarray

  def probabilities(self) -> np.ndarray:
    """softmax(logits) in float64."""
    logits = self.logits.astype(np.float64)
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


class Experiment:
  """A validated config and what it builds (see the module docstring). Use `from_config` or `from_workdir`."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str | None = None):
    config = config.copy_and_resolve_references()
    hf_dir = _hf_dir(config.init_from)
    if hf_dir and os.path.exists(hf_dir):  # (gone later, the model section resolved here stays in config.json)
      config.model.update(hf.run_model_section(hf_dir, config.model))
    tasks.task_class(config.task).resolve_config(config)
    self.model_config = validate(config)
    self.config = config
    self.workdir = os.path.abspath(os.path.expanduser(workdir)) if workdir else None

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict, workdir: str | None = None) -> "Experiment":
    """An experiment of `config`; `workdir` is where `train` writes (and where checkpoints are read from)."""
    return cls(config, workdir)

  @classmethod
  def from_workdir(cls, workdir: str) -> "Experiment":
    """The experiment of the run in `workdir`, from its config.json (and its tokenizer copy)."""
    return cls(configs.from_workdir(workdir), workdir)

  # ---------------------------------------------------------------------------------------- what it builds

  @functools.cached_property
  def task(self) -> tasks.Task:
    """The task of `config.task` (without a distillation teacher: see `training_task`)."""
    return tasks.create(self.config)

  @functools.cached_property
  def model(self):
    """The flax module of the task (e.g. a Decoder, or a SequenceClassifier around one)."""
    return self.task.build_model(self.model_config)

  @functools.cached_property
  def mesh(self) -> jax.sharding.Mesh:
    """The device mesh of `config.mesh` over this machine's (or cluster's) devices, or the first `mesh.num_devices`."""
    mesh = sharding.create_mesh(self.config.mesh)
    sharding.check_model_fits_mesh(self.model_config, mesh.shape)
    return mesh

  @functools.cached_property
  def tokenizer(self) -> Tokenizer:
    """The run's tokenizer: the one resolver (see `tokenizer_path`)."""
    tokenizer = Tokenizer(self.tokenizer_path())
    if tokenizer.vocab_size > self.model_config.vocab_size:
      fix = (
        "use the model.* settings of the init_from run (its config.json): its model and tokenizer go together"
        if self.config.init_from and not self.config.data.tokenizer
        else "raise model.vocab_size"
      )
      raise ConfigError(
        f"model.vocab_size: {self.model_config.vocab_size} rows cannot embed the tokenizer's "
        f"{tokenizer.vocab_size} pieces ({tokenizer.path}); {fix}."
      )
    return tokenizer

  def tokenizer_path(self) -> str:
    """In this order: the workdir's copy (`WORKDIR/tokenizer.model`, written by `train`), `data.tokenizer`, the
    `init_from` run's tokenizer (or `hf:PATH`'s tokenizer.json / tokenizer.model), else one trained on the train
    split (cached in the data directory)."""
    if self.workdir and os.path.exists(os.path.join(self.workdir, TOKENIZER_FILE)):
      return os.path.join(self.workdir, TOKENIZER_FILE)
    if self.config.data.tokenizer:
      return os.path.abspath(os.path.expanduser(self.config.data.tokenizer))
    if _hf_dir(self.config.init_from):
      path = hf.tokenizer_path(_hf_dir(self.config.init_from))
      if path is None:
        raise ConfigError(
          f"init_from: {self.config.init_from} holds no tokenizer.json or tokenizer.model; set "
          "data.tokenizer to the checkpoint's tokenizer."
        )
      return path
    if self.config.init_from:
      return _run_tokenizer_path(checkpoint.split_checkpoint_path(self.config.init_from)[0])
    return pipeline.tokenizer_for(
      self.config.data, self.source(self.config.data.train_split), self.task.reserved_pieces
    ).path

  def save_tokenizer(self) -> None:
    """Copies the tokenizer into the workdir (process 0), so the workdir holds everything needed to use it."""
    target = os.path.join(self.workdir, TOKENIZER_FILE)
    if jax.process_index() == 0 and self.tokenizer.path != target:
      self.tokenizer.save(target)

  def source(self, split: str):
    """Random-access records of `split` of `data.name`."""
    return sources.get_source(self.config.data.name, split, self.config.data.data_dir or None)

  def training_task(self) -> tasks.Task:
    """The task that trains: the task itself, or wrapped in `Distillation` with `distill.teacher` restored."""
    if not self.config.distill.teacher:
      return self.task
    teacher = Experiment.from_workdir(checkpoint.split_checkpoint_path(self.config.distill.teacher)[0])
    if teacher.config.task != self.config.task:
      raise ConfigError(
        f"distill.teacher: the teacher was trained for task {teacher.config.task!r}, the student "
        f"for {self.config.task!r}; distillation needs the same task."
      )
    teacher_params = teacher.load_params(path=self.config.distill.teacher, mesh=self.mesh)
    return distillation.Distillation(
      self.task, teacher.model, teacher_params, self.config.distill.weight, self.config.distill.temperature
    )

  # ---------------------------------------------------------------------------------------------- data

  def _streams(self) -> tuple[int, list[int]]:
    """(number of data streams, the streams this process feeds): see `pipeline.process_streams`."""
    num_streams = self.config.data.num_streams or jax.process_count()
    return num_streams, pipeline.process_streams(num_streams, jax.process_index(), jax.process_count())

  def check_batch_sizes(self) -> None:
    """Batches must split evenly over the data-parallel shards, the processes and the data streams."""
    config = self.config
    parallel, processes = sharding.data_parallel_size(self.mesh), jax.process_count()
    streams = config.data.num_streams or processes
    if streams % processes:
      raise ConfigError(f"data.num_streams={streams} must be a multiple of the {processes} processes.")
    for key, size in (
      ("train.batch_size", config.train.batch_size // config.train.grad_accum_steps),
      ("eval.batch_size", config.eval.batch_size),
    ):
      per = "per micro-batch " if key.startswith("train") and config.train.grad_accum_steps > 1 else ""
      if size % parallel or size % streams:
        raise ConfigError(
          f"{key}: the batch {per}({size} rows) must divide over the {parallel} data-parallel "
          f"shards (mesh.data x mesh.fsdp) and the {streams} data streams (data.num_streams, "
          f"one per process by default)."
        )

  def train_batches(self):
    """This process's rows of every training batch, endless and checkpointable: one batch of each of its streams,
    side by side."""
    config = self.config
    self.check_batch_sizes()
    num_streams, streams = self._streams()
    source = self.source(config.data.train_split)
    return pipeline.zip_streams(
      [
        self.task.batches(
          source,
          self.tokenizer,
          batch_size=config.train.batch_size // num_streams,
          shuffle_seed=config.seed,
          repeat=True,
          stream_index=index,
          stream_count=num_streams,
        )
        for index in streams
      ]
    )

  def eval_batches(self, split: str | None = None, num_batches: int | None = None) -> list[dict]:
    """This process's rows of the first `num_batches` eval batches of `split` (defaults: `data.eval_split`,
    `eval.num_batches`; -1 = the whole split).

    Evaluation reads the split once in a fixed shuffled order, so that the first batches are a representative
    sample, and the same one at every evaluation. Every process gets the same number of batches (shorter
    streams are padded with empty batches, which count for nothing).
    """
    config = self.config
    self.check_batch_sizes()
    split = split or config.data.eval_split
    num_batches = config.eval.num_batches if num_batches is None else num_batches
    limit = None if num_batches == -1 else num_batches
    source = self.source(split)
    num_streams, streams = self._streams()
    rows = config.eval.batch_size // num_streams
    eval_streams = [
      list(
        itertools.islice(
          self.task.batches(
            source,
            self.tokenizer,
            batch_size=rows,
            shuffle_seed=EVAL_ORDER_SEED,
            repeat=False,
            stream_index=index,
            stream_count=num_streams,
          ),
          limit,
        )
      )
      for index in streams
    ]
    num_eval = max(len(batches) for batches in eval_streams)
    if jax.process_count() > 1:
      num_eval = int(np.max(multihost_utils.process_allgather(np.int32(num_eval))))
    if not num_eval:
      raise ValueError(f"The {split!r} split of {config.data.name!r} gave no eval batch.")
    empty = pipeline.padding_batch(self.task.batch_shapes(rows))
    return [
      pipeline.concat_rows(batches)
      for batches in zip(*[batches + [empty] * (num_eval - len(batches)) for batches in eval_streams])
    ]

  # ---------------------------------------------------------------------------------------- parameters

  def abstract_params(self, mesh: jax.sharding.Mesh | None = None, model=None):
    """ShapeDtypeStructs of the parameters of `model` (default: the experiment's) with their shardings on `mesh`
    (default: the experiment's)."""
    return params_lib.abstract_params(model or self.model, mesh or self.mesh)

  def init_params(self):
    """The parameters training starts from: initialised from `config.seed`, then, with `init_from`, every
    parameter of that run restored (new ones, like a classification head or LoRA adapters, stay initialised);
    `init_from = "hf:PATH"` imports a Hugging Face checkpoint in memory (`jaxlm.interop.hf`) instead."""
    init_rng = jax.random.split(jax.random.key(self.config.seed))[0]
    if not self.config.init_from:
      return params_lib.init_params(self.model, init_rng, self.mesh)
    # Restored into the abstract tree; only the parameters the source lacks (a new head, LoRA adapters) are then
    # initialised, with the values a full init from the seed gives them.
    abstract = self.abstract_params()
    if _hf_dir(self.config.init_from):
      logging.info(
        "Starting from the Hugging Face checkpoint %s; new parameters from seed %d",
        self.config.init_from,
        self.config.seed,
      )
      _, imported, _, _ = hf.load_pretrained(_hf_dir(self.config.init_from), self.mesh, self.model_config.param_dtype)
      params, new = checkpoint.place_params(
        params_lib.flatten(imported), abstract, self.task.new_params, allow_adapters=True, origin=self.config.init_from
      )
    else:
      ref = checkpoint.find_checkpoint(self.config.init_from)
      logging.info("Starting from %s (step %d); new parameters from seed %d", ref.workdir, ref.step, self.config.seed)
      params, new = checkpoint.restore_params(ref.state_dir, abstract, self.task.new_params, allow_adapters=True)
    fresh = params_lib.init_some_params(self.model, init_rng, new, self.mesh)
    return jax.tree_util.tree_map_with_path(lambda path, leaf: fresh.get(params_lib.path_name(path), leaf), params)

  def load_params(self, step: str | int = "latest", path: str | None = None, mesh: jax.sharding.Mesh | None = None):
    """Parameters alone of checkpoint `step` ("latest", "best" by `train.best_metric`, or a number) of the run
    at `path` (a workdir or WORKDIR/checkpoints/<step>; default this experiment's workdir), restored straight
    into their shardings on `mesh` (default: the experiment's). No optimizer, no data iterator."""
    path = path or self.workdir
    if not path:
      raise ValueError("load_params needs a path, or an Experiment with a workdir.")
    ref = checkpoint.find_checkpoint(path, step, self.config.train.best_metric, self.config.train.best_mode)
    params, _ = checkpoint.restore_params(ref.state_dir, self.abstract_params(mesh))
    logging.info("Loaded the parameters of step %d from %s", ref.step, ref.workdir)
    return params

  # ------------------------------------------------------------------------------------- what it does

  def train(self) -> dict:
    """Trains and evaluates in `workdir` (resuming it if it holds checkpoints); returns the last eval metrics."""
    if not self.workdir:
      raise ValueError("train needs a workdir: Experiment.from_config(config, workdir).")
    return loop.train_and_evaluate(self)

  @functools.cached_property
  def param_shardings(self):
    """NamedShardings of the model's parameters on the experiment's mesh."""
    return jax.tree.map(lambda x: x.sharding, self.abstract_params())

  @functools.cached_property
  def _eval_step(self):
    return steps.jit_eval_step(model=self.model, task=self.task, param_sharding=self.param_shardings, mesh=self.mesh)

  def evaluate(self, params, split: str | None = None, num_batches: int | None = None) -> dict:
    """The task's metrics (`task.summarize`) of `params` on `split` (defaults as `eval_batches`)."""
    batches = self.eval_batches(split, num_batches)
    return self.task.summarize(steps.evaluate(self._eval_step, params, batches, self.mesh))

  @functools.cached_property
  def _predict_step(self):
    task, model = self.task, self.model
    return jax.jit(
      lambda params, batch: task.predictions(task.logits(model, params, batch, train=False), batch),
      in_shardings=(self.param_shardings, sharding.batch_sharding(self.mesh)),
      out_shardings=sharding.replicated(self.mesh),
    )

  def predict(self, params, split: str | None = None, num_batches: int | None = -1) -> Predictions:
    """Per-example logits, labels and weights of `params` on `split` (default: the whole eval split), on the host:
    what calibrators (`evaluation.calibrators`) and conformal sets (`evaluation.conformal`) consume."""
    outputs, predict_step = [], self._predict_step  # built outside the mesh context (eval_shape of the init)
    with sharding.mesh_context(self.mesh):
      for batch in self.eval_batches(split, num_batches):
        output = jax.device_get(predict_step(params, steps.to_global(batch, self.mesh)))
        real = output["weights"].reshape(output["weights"].shape[0], -1).any(axis=1)
        outputs.append({key: value[real] for key, value in output.items()})
    return Predictions(**{key: np.concatenate([o[key] for o in outputs]) for key in ("logits", "labels", "weights")})

  def generate(self, params, prompts: list[str], **overrides) -> list[generate_lib.Generation]:
    """Continues each prompt with the `decode` settings of the config, `overrides` replacing any of them
    (`strategy="sample"`, `top_p=0.9`, `seed=1`, `dtype="bfloat16"`, `quantize="int8"`, ...)."""
    if not self.task.generates_text:
      raise ValueError(f"task {self.config.task!r} does not generate text.")
    decode_config = self.config.decode.copy_and_resolve_references()
    decode_config.update(overrides)
    decode.check_config(decode_config)
    _, model, params = self.decoding_model(params, decode_config.dtype, decode_config.quantize)
    settings = decode.DecodeSettings.from_config(decode_config)
    return generate_lib.generate(
      model, params, self.tokenizer, prompts, settings, rng=jax.random.key(decode_config.seed), mesh=self.mesh
    )

  def decoding_model(self, params, dtype: str = "", quantize_scheme: str = ""):
    """(ModelConfig, model, parameters) to decode with: the run's own; with `dtype`, weights and activations in
    it; with `quantize_scheme` ("int8", "int4"), the kernels quantized once here (LoRA adapters merged into them
    first, fake quantization off) and the other weights (embeddings, norms) stored in the compute dtype they are
    used in: the same numbers, where float32 master copies would be read at every generated token. The parameters
    come back in the decoding model's tree and shardings. `generate` and `scripts/benchmark.py --decode` use it."""
    model_config, changes = self.model_config, {}
    if dtype:
      changes.update(dtype=dtype, param_dtype=dtype)
    if quantize_scheme:
      changes.update(quantize=quantize_scheme, fake_quantize="", lora_rank=0)
      changes.setdefault("param_dtype", model_config.dtype)
      if model_config.lora_rank:
        params = lora.merge_lora(params, model_config.lora_alpha)
    if not changes:
      return model_config, self.model, params
    model_config = dataclasses.replace(model_config, **changes)
    model = self.task.build_model(model_config)
    return model_config, model, quantize.convert_params(params, self.abstract_params(model=model), quantize_scheme)

  def plan(self, num_devices: int | None = None) -> plan.MemoryPlan:
    """Per-device memory of training this experiment on `num_devices` (default: this machine's), with no
    compilation and no allocation (`jaxlm.plan`)."""
    return plan.memory_plan(self.config, self.model_config, self.model, self.task.new_params, num_devices)


def _hf_dir(init_from: str) -> str | None:
  """The Hugging Face directory of `init_from = "hf:PATH"`, else None."""
  if not init_from.startswith(hf.INIT_FROM_PREFIX):
    return None
  return os.path.abspath(os.path.expanduser(init_from[len(hf.INIT_FROM_PREFIX) :]))


def _run_tokenizer_path(workdir: str) -> str:
  """The tokenizer of the run in `workdir`: its copy, else (runs from before workdirs held one) what its config
  names or the cache it trained into."""
  if os.path.exists(os.path.join(workdir, TOKENIZER_FILE)):
    return os.path.join(workdir, TOKENIZER_FILE)
  run_config = configs.from_workdir(workdir)
  reserved = tasks.task_class(run_config.task).from_config(run_config).reserved_pieces
  path = run_config.data.tokenizer or pipeline.cached_tokenizer_path(run_config.data, reserved)
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"The tokenizer of the run in {workdir} ({path}) is gone; set data.tokenizer to a copy "
      "of it (the model's embeddings only fit the tokenizer it was trained with)."
    )
  return path


def load_params(path: str, step: str | int = "latest", mesh: jax.sharding.Mesh | None = None):
  """Parameters of the run at `path` (a workdir or WORKDIR/checkpoints/<step>), restored alone into their
  shardings on `mesh` (default: the mesh of the run's config on this machine's devices)."""
  workdir, _ = checkpoint.split_checkpoint_path(path)
  return Experiment.from_workdir(workdir).load_params(step, path=path, mesh=mesh)
