"""Sequence classification: backbone -> pooling -> linear head, one label per row.

Loss options (training-time calibration): label smoothing (the target puts
1 - eps on the label and eps / C on every class), focal loss (each example's
cross-entropy times (1 - p_label)^gamma; with `focal_adaptive` gamma is 5 when
p_label < 0.2 and 3 otherwise, FLSD-53 of Mukhoti et al. 2020), and class
weights (each example's loss times the weight of its label; the mean is
weighted too). Metrics: loss, NLL, accuracy and macro-F1, the latter from a
streamed `[C, C]` confusion matrix (rows: true class, columns: predicted), and in
evaluation the top-label ECE (15 equal-width bins), all from `jaxlm.evaluation`.

Shape legend: B batch, T length, C classes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import pipeline, sources
from jaxlm.errors import ConfigError, check
from jaxlm.evaluation import calibration, metrics
from jaxlm.evaluation.metrics import macro_f1
from jaxlm.models.heads import POOLINGS, SequenceClassifier
from jaxlm.models.transformer import backbone
from jaxlm.tasks import base

ADAPTIVE_GAMMA_THRESHOLD, ADAPTIVE_GAMMA_LOW_P, ADAPTIVE_GAMMA_HIGH_P = 0.2, 5.0, 3.0
ECE_BINS = 15


def example_losses(
  logits, labels, *, label_smoothing: float = 0.0, focal_gamma: float = 0.0, focal_adaptive: bool = False
):
  """Per-example training loss [B] from logits [B, C] and labels [B] (see the module docstring)."""
  num_classes = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  targets = jax.nn.one_hot(labels, num_classes) * (1 - label_smoothing) + label_smoothing / num_classes
  loss = -jnp.sum(targets * log_probs, axis=-1)
  if focal_gamma or focal_adaptive:
    p_label = jnp.exp(jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0])
    gamma = focal_gamma
    if focal_adaptive:
      gamma = jax.lax.stop_gradient(
        jnp.where(p_label < ADAPTIVE_GAMMA_THRESHOLD, ADAPTIVE_GAMMA_LOW_P, ADAPTIVE_GAMMA_HIGH_P)
      )
    loss = (1 - p_label) ** gamma * loss
  return loss


def dataset_num_classes(data_config) -> int:
  """Classes of `data.label_field` in the dataset's features."""
  features = sources.get_builder(data_config.name, data_config.data_dir or None).info.features
  feature = features[data_config.label_field] if data_config.label_field in features else None
  if not hasattr(feature, "num_classes"):
    raise ConfigError(
      f"data.label_field: {data_config.label_field!r} is not a class label of {data_config.name!r} "
      f"(features: {sorted(features)})."
    )
  return feature.num_classes


@base.register("classification")
@dataclasses.dataclass(frozen=True)
class Classification(base.BaseTask):
  """One class per padded row; the head is new on top of a pretrained backbone."""

  num_classes: int  # C
  text_field: str = "text"  # record field with the text
  label_field: str = "label"  # record field with the integer class
  seq_len: int = 256  # T: rows are [bos] text [eos], the text truncated to fit
  truncation: str = "right"  # which end of a too-long text is cut: "right" (keep its start) or "left"
  dataset_name: str = ""  # for error messages
  pooling: str = "last"  # heads.POOLINGS
  label_smoothing: float = 0.0
  focal_gamma: float = 0.0  # 0 = plain cross-entropy
  focal_adaptive: bool = False
  class_weights: tuple[float, ...] = ()  # () = all 1

  new_params = r"^head/"

  @classmethod
  def resolve_config(cls, config) -> None:
    """`classification.num_classes = 0` becomes the class count of the dataset's label feature."""
    if not config.classification.num_classes:
      config.classification.num_classes = dataset_num_classes(config.data)

  @classmethod
  def check_config(cls, config) -> None:
    options = config.classification
    check(
      options.num_classes == 0 or options.num_classes > 1,
      "classification.num_classes",
      f"must be at least 2 (0 = from the dataset's label feature), got {options.num_classes}.",
    )
    check(options.pooling in POOLINGS, "classification.pooling", f"{options.pooling!r} is not one of {POOLINGS}.")
    check(
      config.model.family in ("decoder", "encoder"),
      "model.family",
      f"classification reads a decoder or an encoder, not {config.model.family!r}.",
    )
    check(
      options.pooling != "pooler" or (config.model.family == "encoder" and config.model.pooler),
      "classification.pooling",
      "'pooler' needs an encoder with model.pooler=True; or pool 'first'.",
    )
    check(0.0 <= options.label_smoothing < 1.0, "classification.label_smoothing", "must be in [0, 1).")
    check(options.focal_gamma >= 0, "classification.focal_gamma", "must be >= 0.")
    weights = tuple(options.class_weights)
    check(
      not weights or not options.num_classes or len(weights) == options.num_classes,
      "classification.class_weights",
      f"has {len(weights)} weights for {options.num_classes} classes; give one per class or ().",
    )
    check(all(w >= 0 for w in weights), "classification.class_weights", f"must be >= 0, got {weights}.")

  @classmethod
  def from_config(cls, config):
    data, options = config.data, config.classification
    return cls(
      num_classes=options.num_classes,
      text_field=data.text_field,
      label_field=data.label_field,
      seq_len=data.seq_len,
      truncation=data.truncation,
      dataset_name=data.name,
      pooling=options.pooling,
      label_smoothing=options.label_smoothing,
      focal_gamma=options.focal_gamma,
      focal_adaptive=options.focal_adaptive,
      class_weights=tuple(options.class_weights),
    )

  def build_model(self, model_config):
    return SequenceClassifier(backbone(model_config), model_config, self.num_classes, self.pooling)

  def batches(self, source, tokenizer, *, batch_size, shuffle_seed, repeat, stream_index, stream_count):
    def encode(index, record):
      text = pipeline.record_text(record, self.text_field, index, self.dataset_name)
      label = pipeline.record_label(record, self.label_field, index, self.dataset_name, self.num_classes)
      return pipeline.classification_example(tokenizer, text, label, self.seq_len, self.truncation)

    return pipeline.padded_batches(
      source,
      encode,
      batch_size=batch_size,
      shuffle_seed=shuffle_seed,
      repeat=repeat,
      stream_index=stream_index,
      stream_count=stream_count,
    )

  def batch_shapes(self, rows):
    return {**{key: (rows, self.seq_len) for key in ("tokens", "segment_ids", "positions")}, "label": (rows,)}

  def random_batch(self, rows, vocab_size, rng):
    return {**super().random_batch(rows, vocab_size, rng), "label": rng.integers(0, self.num_classes, rows, np.int32)}

  def weights(self, batch):
    """[B]: 1 for rows that hold an example, 0 for padding rows."""
    return jnp.any(batch["segment_ids"] != 0, axis=1).astype(jnp.float32)

  def predictions(self, logits, batch):
    """Per row: logits [B, C], the label [B], 1 for a real example and 0 for a padding row [B]."""
    return {"logits": logits, "labels": batch["label"], "weights": self.weights(batch)}

  def loss_sums(self, logits, batch, *, train):
    labels = batch["label"]
    rows = self.weights(batch)
    weights = rows * jnp.asarray(self.class_weights, jnp.float32)[labels] if self.class_weights else rows
    losses = example_losses(
      logits,
      labels,
      label_smoothing=self.label_smoothing,
      focal_gamma=self.focal_gamma,
      focal_adaptive=self.focal_adaptive,
    )
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32))
    nll = -jnp.take_along_axis(log_probs, labels[:, None], axis=-1)[:, 0]
    predictions = jnp.argmax(logits, axis=-1)
    loss_sum = jnp.sum(losses * weights)
    sums = {
      "loss_sum": loss_sum,
      "weight": jnp.sum(weights),
      "nll_sum": jnp.sum(nll * rows),
      "examples": jnp.sum(rows),
      "confusion": metrics.confusion_matrix(predictions, labels, self.num_classes, rows),
    }
    if not train:
      confidence = jnp.exp(jnp.max(log_probs, axis=-1))
      sums.update(calibration.calibration_bin_sums(confidence, predictions == labels, rows, ECE_BINS))
    return loss_sum, sums

  def summarize(self, sums):
    examples = max(float(sums["examples"]), 1.0)
    confusion = np.asarray(sums["confusion"])
    reported = {
      "loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9),
      "nll": float(sums["nll_sum"]) / examples,
      "accuracy": float(np.trace(confusion)) / examples,
      "macro_f1": float(macro_f1(confusion)),
    }
    if "bin_count" in sums:
      reported["ece"] = float(calibration.ece_from_bin_sums(sums, "l1"))
    return reported

  def baselines(self, batches):
    """Always predicting the most frequent class of these very batches."""
    counts = np.zeros(self.num_classes)
    for batch in batches:
      rows = np.asarray(batch["segment_ids"]).any(axis=1)
      np.add.at(counts, np.asarray(batch["label"])[rows], 1)
    confusion = np.zeros((self.num_classes, self.num_classes))
    confusion[:, counts.argmax()] = counts
    return {
      "majority_accuracy": float(counts.max() / max(counts.sum(), 1)),
      "majority_macro_f1": float(macro_f1(confusion)),
    }
