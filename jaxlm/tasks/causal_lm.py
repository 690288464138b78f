"""Causal language modelling: predict each token from the ones before it in its document.

A task turns a batch and the model into `(loss_sum, metric_sums)`. Sums (not
means) let the train step accumulate micro-batches and the eval loop add
batches exactly; `summarize` turns sums into the reported numbers.

Eval sums also carry token-level top-label calibration bins (confidence = max softmax probability of the
next-token distribution, correct = [argmax == target], weighted by the target weights; 15 equal-width,
right-closed bins), so every eval row reports `ece` (L1) equal to the offline
`calibration.expected_calibration_error` on the same tokens. The train step skips them to stay cheap.
"""

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.evaluation import calibration

ECE_BINS = 15


def target_weights(segment_ids: jax.Array) -> jax.Array:
  """1.0 where token t+1 is a target for token t: same document, not padding, not the row's end."""
  next_segment = jnp.roll(segment_ids, -1, axis=1)
  weights = (segment_ids != 0) & (next_segment == segment_ids)
  return weights.at[:, -1].set(False).astype(jnp.float32)


def loss_and_metrics(model, params, batch, *, train: bool, rng=None):
  """Summed next-token cross-entropy over the batch's targets, and metric sums.

  batch: `tokens`, `segment_ids`, `positions`, int32 [B, T].
  Returns (loss_sum, {"loss_sum", "weight", "correct"}); `weight` counts targets. With `train=False` the
  sums also hold `calibration.calibration_bin_sums` of the tokens ("bin_count", "bin_confidence_sum",
  "bin_correct_sum", each [ECE_BINS]).
  """
  tokens = batch["tokens"]
  logits = model.apply({"params": params}, tokens, batch["positions"], batch["segment_ids"],
                       deterministic=not train, rngs={"dropout": rng} if train else {})
  targets = jnp.roll(tokens, -1, axis=1)
  weights = target_weights(batch["segment_ids"])
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  loss_sum = jnp.sum(nll * weights)
  is_correct = jnp.argmax(logits, axis=-1) == targets
  sums = {"loss_sum": loss_sum, "weight": jnp.sum(weights), "correct": jnp.sum(is_correct * weights)}
  if not train:
    confidence = jnp.exp(jnp.max(log_probs, axis=-1))
    sums.update(calibration.calibration_bin_sums(confidence, is_correct, weights, ECE_BINS))
  return loss_sum, sums


def summarize(sums: dict) -> dict:
  """Mean loss (nats per target token), perplexity, token accuracy and, from eval sums, token-level ECE."""
  weight = max(float(sums["weight"]), 1.0)
  loss = float(sums["loss_sum"]) / weight
  metrics = {"loss": loss, "perplexity": float(np.exp(min(loss, 80.0))),
             "token_accuracy": float(sums["correct"]) / weight}
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
    weights = np.asarray(target_weights(jnp.asarray(batch["segment_ids"]))) > 0
    targets = np.roll(batch["tokens"], -1, axis=1)[weights]
    ids, n = np.unique(targets, return_counts=True)
    for token, count in zip(ids.tolist(), n.tolist()):
      counts[token] = counts.get(token, 0) + count
  total = np.array(list(counts.values()), dtype=np.float64)
  p = total / total.sum()
  return float(-(p * np.log(p)).sum())
