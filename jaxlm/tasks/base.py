"""What a task supplies to the one train loop, to evaluation and to prediction: its model, its batches, its
loss and its metrics.

A task is a small frozen object built from the config by its class's `from_config` (found by name in
`jaxlm.tasks.REGISTRY`). The loop, the steps, `Experiment.evaluate`/`predict` and the plan use only the
`Task` protocol below, so pretraining and every fine-tuning recipe share one loop, and a new task touches
no loop, plan or generate code: write its module, decorate the class with `@register("name")`, import the
module in `jaxlm/tasks/__init__.py`.

Losses and metrics are sums, not means: the train step divides once by the summed `weight`, so gradient
accumulation and multi-batch evaluation add exactly.
"""

from typing import Any, Callable, ClassVar, Protocol

import flax.linen as nn
import numpy as np

REGISTRY: dict[str, type] = {}  # config.task -> task class


def register(name: str):
  """Class decorator: makes the task class available as `config.task = name`."""

  def add(cls):
    REGISTRY[name] = cls
    cls.name = name
    return cls

  return add


class Task(Protocol):
  """The interface. Optional hooks have defaults in `BaseTask`."""

  name: ClassVar[str]  # the registry name (config.task)
  # Regex over '/'-joined parameter paths of what the task adds to a pretrained backbone: `init_from`
  # initialises these instead of restoring them; `train.trainable = "head"` trains only these. None: nothing.
  new_params: ClassVar[str | None]
  # Hook: True when the model continues text (the loop then prints a greedy `sample.prompt` at the end).
  generates_text: ClassVar[bool]
  # Hook: pieces the tokenizer must reserve for the objective (e.g. "[MASK]", T5's sentinels); () = none.
  reserved_pieces: tuple[str, ...]

  @classmethod
  def check_config(cls, config) -> None:
    """Validates the task's own config section (ConfigError naming the key)."""

  @classmethod
  def resolve_config(cls, config) -> None:
    """Hook: fills in config values found from the data (e.g. the class count from the dataset's features),
    in place, before validation; `config.json` then records them, so the workdir needs no dataset to rebuild
    the model."""

  @classmethod
  def from_config(cls, config) -> "Task":
    """The task with the options of `config`."""

  def build_model(self, model_config) -> nn.Module:
    """The flax module trained for this task (a backbone from `jaxlm.models`, maybe with a head)."""

  def batches(
    self,
    source,
    tokenizer,
    *,
    batch_size: int,
    shuffle_seed: int | None,
    repeat: bool,
    stream_index: int,
    stream_count: int,
  ):
    """grain dataset of host batches (dicts of int32 numpy arrays) of one stream (`pipeline.process_streams`)."""

  def batch_shapes(self, rows: int) -> dict[str, tuple]:
    """{key: shape} of a batch of `rows` rows: what the steps are compiled for."""

  def random_batch(self, rows: int, vocab_size: int, rng: np.random.Generator) -> dict:
    """Hook: a host batch of `batch_shapes(rows)` with random tokens, each row one full segment: what
    `scripts/benchmark.py` times (the data pipeline is not timed). The default fills the keys every task
    shares (`tokens`, `segment_ids`, `positions`, and their `encoder_` twins); a task with more keys adds them."""

  def logits(self, model, params, batch, *, train: bool, rng=None):
    """[B, C] (one prediction per row) or [B, T, V] (one per token)."""

  def weights(self, batch):
    """Float weight of each prediction in `logits` (0 = not scored)."""

  def loss_sums(self, logits, batch, *, train: bool) -> tuple[Any, dict]:
    """(loss_sum, metric sums with at least `loss_sum` and `weight`; eval sums may add more)."""

  def loss_and_metrics(self, model, params, batch, *, train: bool, rng=None) -> tuple[Any, dict]:
    """`loss_sums` of `logits`."""

  def summarize(self, sums: dict) -> dict:
    """Reported metrics (plain floats, `loss` among them) from summed metric sums."""

  def baselines(self, batches: list[dict]) -> dict:
    """Scores of trivial predictors on these batches (e.g. the majority class)."""

  def predictions(self, logits, batch) -> dict:
    """{"logits", "labels", "weights"}, one entry per prediction (the leading axes of `logits`): what
    `Experiment.predict` returns and calibrators and conformal sets consume."""

  def test_report(self, *, source, tokenizer, generate: Callable, max_examples: int, max_new_tokens: int) -> dict:
    """Hook: extra entries of the final test report (e.g. generation scores); `generate(prompts,
    max_new_tokens) -> list[inference.generate.Generation]` decodes greedily with the evaluated params."""


class BaseTask:
  """Defaults shared by the tasks: the optional hooks, and the model call and loss composition."""

  new_params: ClassVar[str | None] = None
  generates_text: ClassVar[bool] = False
  reserved_pieces: tuple[str, ...] = ()

  @classmethod
  def check_config(cls, config) -> None:
    del config

  @classmethod
  def resolve_config(cls, config) -> None:
    del config

  def random_batch(self, rows: int, vocab_size: int, rng: np.random.Generator) -> dict:
    batch = {}
    for key, shape in self.batch_shapes(rows).items():
      field = key.removeprefix("encoder_")
      if field == "tokens":
        batch[key] = rng.integers(0, vocab_size, shape, dtype=np.int32)
      elif field == "segment_ids":
        batch[key] = np.ones(shape, np.int32)
      elif field == "positions":
        batch[key] = np.broadcast_to(np.arange(shape[-1], dtype=np.int32), shape).copy()
    return batch

  def logits(self, model, params, batch, *, train: bool, rng=None):
    return self.apply(model, params, batch, train=train, rng=rng)

  def apply(self, model, params, batch, *, train: bool, rng=None, **kwargs):
    """The model on a batch's tokens, positions and segment ids (dropout on when training); `kwargs` go to the
    model (e.g. `return_hidden=True`)."""
    return model.apply(
      {"params": params},
      batch["tokens"],
      batch["positions"],
      batch["segment_ids"],
      deterministic=not train,
      rngs={"dropout": rng} if train else {},
      **kwargs,
    )

  def loss_and_metrics(self, model, params, batch, *, train: bool, rng=None):
    return self.loss_sums(self.logits(model, params, batch, train=train, rng=rng), batch, train=train)

  def baselines(self, batches: list[dict]) -> dict:
    del batches
    return {}

  def test_report(self, *, source, tokenizer, generate, max_examples, max_new_tokens) -> dict:
    del source, tokenizer, generate, max_examples, max_new_tokens
    return {}
