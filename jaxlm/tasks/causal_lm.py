"""Causal language modelling: predict each token from the ones before it in its document.

A task turns a batch and the model into `(loss_sum, metric_sums)`. Sums (not
means) let the train step accumulate micro-batches and the eval loop add
batches exactly; `summarize` turns sums into the reported numbers. `CausalLm`
is this objective as a `jaxlm.tasks.base.Task` (packed batches of a corpus);
`seq2seq` reuses its loss with a prompt mask.

Eval sums also carry token-level top-label calibration bins (confidence = max softmax probability of the
next-token distribution, correct = [argmax == target], weighted by the target weights; 15 equal-width,
right-closed bins), so every eval row reports `ece` (L1) equal to the offline
`calibration.expected_calibration_error` on the same tokens. The train step skips them to stay cheap.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.data import pipeline
from jaxlm.errors import check
from jaxlm.evaluation import calibration
from jaxlm.models import transformer
from jaxlm.models.transformer import Decoder
from jaxlm.tasks import base

ECE_BINS = 15


@jax.jit  # one program where host-side callers (the baselines) would dispatch and compile six ops
def target_weights(segment_ids: jax.Array) -> jax.Array:
  """1.0 where token t+1 is a target for token t: same document, not padding, not the row's end."""
  next_segment = jnp.roll(segment_ids, -1, axis=1)
  weights = (segment_ids != 0) & (next_segment == segment_ids)
  return weights.at[:, -1].set(False).astype(jnp.float32)


def next_token_sums(logits, tokens, weights, *, train: bool) -> tuple[jax.Array, dict]:
  """Summed cross-entropy of predicting tokens[t + 1] from logits[t], weighted by weights[t] ([B, T]).

  With `train=False` the sums also hold the calibration bins (see the module docstring).
  """
  return _target_sums(logits, jnp.roll(tokens, -1, axis=1), weights, train=train)


def chunked_next_token_sums(
  project, hidden, tokens, weights, chunk_size: int, *, train: bool
) -> tuple[jax.Array, dict]:
  """`next_token_sums` of the logits `project(hidden)`, computed `chunk_size` positions at a time.

  hidden: [B, T, D] final hidden states; project: [B, C, D] -> [B, C, V] (the model's output projection).
  At most [B, C, V] logits exist at once, in the forward and (each chunk rematerialised) in the backward
  pass: at V = 50k and T = 1024 the full float32 logits, their log-softmax and gradient are what fills
  the memory. The sums are the same numbers added in another order (equal to float32 rounding).
  """
  batch, length = tokens.shape
  chunks = -(-length // chunk_size)

  def split(x):  # [B, T, ...] -> [chunks, B, C, ...]; the padding at the end has weight 0 and counts for nothing
    x = jnp.pad(x, [(0, 0), (0, chunks * chunk_size - length)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(batch, chunks, chunk_size, *x.shape[2:]), 1, 0)

  @jax.checkpoint  # the backward pass recomputes a chunk's logits rather than keeping every chunk's
  def chunk_sums(hidden, targets, weights):
    return _target_sums(project(hidden), targets, weights, train=train)[1]

  xs = (split(hidden), split(jnp.roll(tokens, -1, axis=1)), split(weights))
  zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(chunk_sums, *(x[0] for x in xs)))
  sums, _ = jax.lax.scan(lambda total, x: (jax.tree.map(jnp.add, total, chunk_sums(*x)), None), zeros, xs)
  return sums["loss_sum"], sums


def _target_sums(logits, targets, weights, *, train: bool) -> tuple[jax.Array, dict]:
  """The sums of `next_token_sums` for logits [B, T, V] and their targets [B, T].

  Written so that every [B, T, V] pass is elementwise or a plain reduction, which XLA fuses (on CPU these passes
  are the step's largest memory traffic at V = 4k): the loss as logsumexp minus the target's logit, picked with a
  one-hot comparison (its gradient softmax - one-hot is one fusion, where `take_along_axis` scatters into a zero
  [B, T, V] array), and the argmax as the first index that reaches the row's maximum (`jnp.argmax`'s ties, one
  reduction of an integer, where `argmax` is a slow two-value reduction on CPU). Equal to
  `-take_along_axis(log_softmax(logits), targets)` and `argmax(logits) == targets` up to float32 rounding.
  """
  logits = logits.astype(jnp.float32)
  vocab = jnp.arange(logits.shape[-1], dtype=jnp.int32)
  max_logit = jnp.max(logits, axis=-1, keepdims=True)  # [B, T, 1]
  shifted = logits - jax.lax.stop_gradient(max_logit)  # the loss does not depend on the shift
  log_normalizer = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1))  # [B, T]
  is_target = vocab == targets[..., None]  # [B, T, V]
  nll = log_normalizer - jnp.sum(jnp.where(is_target, shifted, 0.0), axis=-1)
  loss_sum = jnp.sum(nll * weights)
  first_max = jnp.min(jnp.where(logits == max_logit, vocab, logits.shape[-1]), axis=-1)  # jnp.argmax's index
  is_correct = first_max == targets
  sums = {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": jnp.sum(is_correct * weights)}
  if not train:
    confidence = jnp.exp(-log_normalizer)  # the largest probability: exp(max - logsumexp)
    sums.update(calibration.calibration_bin_sums(confidence, is_correct, weights, ECE_BINS))
  return loss_sum, sums


def summarize(sums: dict) -> dict:
  """Mean loss (nats per target token), perplexity, token accuracy and, from eval sums, token-level ECE."""
  weight = max(float(sums["weight"]), 1.0)
  loss = float(sums["loss_sum"]) / weight
  metrics = {
    "loss": loss,
    "perplexity": float(np.exp(min(loss, 80.0))),
    "token_accuracy": float(sums["correct"]) / weight,
  }
  if "bin_count" in sums:
    metrics["ece"] = float(calibration.ece_from_bin_sums(sums, "l1"))
  return metrics


def unigram_entropy(batches) -> float:
  """Entropy (nats) of the empirical unigram distribution of the targets in `batches`.

  The loss of the best context-free predictor of these very tokens: a model
  must go well below it to have learned anything about context.
  """
  counts = {}
  for batch in batches:
    weights = np.asarray(target_weights(batch["segment_ids"])) > 0
    targets = np.roll(batch["tokens"], -1, axis=1)[weights]
    ids, n = np.unique(targets, return_counts=True)
    for token, count in zip(ids.tolist(), n.tolist()):
      counts[token] = counts.get(token, 0) + count
  total = np.array(list(counts.values()), dtype=np.float64)
  p = total / total.sum()
  return float(-(p * np.log(p)).sum())


@base.register("causal_lm")
@dataclasses.dataclass(frozen=True)
class CausalLm(base.BaseTask):
  """Next-token prediction on packed documents (pretraining)."""

  text_field: str = "text"  # record field with the document
  seq_len: int = 256  # T
  dataset_name: str = ""  # for error messages
  shuffle_window: int = 0  # packed training rows shuffled together

  generates_text = True

  @classmethod
  def check_config(cls, config) -> None:
    check(
      config.model.family == "decoder",
      "model.family",
      f"{cls.name} trains a decoder; set model.family='decoder' (got {config.model.family!r}).",
    )

  @classmethod
  def from_config(cls, config):
    data = config.data
    return cls(
      text_field=data.text_field, seq_len=data.seq_len, dataset_name=data.name, shuffle_window=data.shuffle_window
    )

  def build_model(self, model_config):
    return Decoder(model_config)

  def batches(self, source, tokenizer, *, batch_size, shuffle_seed, repeat, stream_index, stream_count):
    return pipeline.lm_batches(
      source,
      tokenizer,
      text_field=self.text_field,
      seq_len=self.seq_len,
      batch_size=batch_size,
      dataset_name=self.dataset_name,
      shuffle_seed=shuffle_seed,
      repeat=repeat,
      shuffle_window=self.shuffle_window if repeat else 0,
      stream_index=stream_index,
      stream_count=stream_count,
    )

  def batch_shapes(self, rows):
    return {key: (rows, self.seq_len) for key in ("tokens", "segment_ids", "positions")}

  def weights(self, batch):
    return target_weights(batch["segment_ids"])

  def loss_sums(self, logits, batch, *, train):
    return next_token_sums(logits, batch["tokens"], self.weights(batch), train=train)

  def loss_and_metrics(self, model, params, batch, *, train, rng=None):
    """`loss_sums` of the logits; with `model.loss_chunk_size` (shorter than the rows) from the hidden states,
    projected a chunk at a time (`chunked_next_token_sums`)."""
    chunk_size = model.config.loss_chunk_size
    if not chunk_size or chunk_size >= batch["tokens"].shape[1]:
      return super().loss_and_metrics(model, params, batch, train=train, rng=rng)
    hidden = self.apply(model, params, batch, train=train, rng=rng, return_hidden=True)
    project = functools.partial(transformer.unembed, model.config, params)
    return chunked_next_token_sums(project, hidden, batch["tokens"], self.weights(batch), chunk_size, train=train)

  def summarize(self, sums):
    return summarize(sums)

  def predictions(self, logits, batch):
    """Per token: logits [B, T, V], the next token as label [B, T], the target weights [B, T]."""
    return {"logits": logits, "labels": jnp.roll(batch["tokens"], -1, axis=1), "weights": self.weights(batch)}

  def baselines(self, batches):
    return {"unigram_entropy": unigram_entropy(batches)}
