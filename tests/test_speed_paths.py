"""The speed paths against their plain references: the chunked cross-entropy (loss, gradient, eval metrics),
the Pallas flash-attention kernel with segment ids (values, gradients; CPU interpret mode), and int8
weight-only decoding (logits within a stated tolerance of float32; greedy output of a trained tiny model)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.errors import ConfigError
from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models import transformer
from jaxlm.models.transformer import Decoder
from jaxlm.tasks.causal_lm import CausalLm
from jaxlm.tasks.seq2seq import Seq2Seq
from conftest import lm_batch

GPT2_LIKE = dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True)
LLAMA_LIKE = dict(position="rotary", norm="rmsnorm", mlp="swiglu", num_kv_heads=2, tie_embeddings=False)
VOCAB = 97


def tiny(**overrides) -> ModelConfig:
  return ModelConfig(**{**PRESETS["tiny"], "vocab_size": VOCAB, "max_len": 32, **overrides})


def init_params(config, seed=0):
  tokens = jnp.zeros((1, 8), jnp.int32)
  return nn.meta.unbox(jax.jit(Decoder(config).init)(jax.random.key(seed), tokens))["params"]


def loss_and_grad(task, config, params, batch, train=True):
  """(loss_sum, sums, gradient of loss_sum) of `task` on `batch` with the model of `config`."""
  model = Decoder(config)

  def loss(params):
    return task.loss_and_metrics(model, params, batch, train=train, rng=jax.random.key(0))

  (value, sums), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
  return value, jax.device_get(sums), grads


# ------------------------------------------------------------------------------------------- chunked cross-entropy


@pytest.mark.parametrize("variant,chunk", [("gpt2", 4), ("llama", 5)])
def test_chunked_loss_and_gradient_equal_the_plain_ones(variant, chunk):
  """Chunks of 4 divide the 16 positions; chunks of 5 leave a padded last chunk (weight 0)."""
  config = tiny(**(GPT2_LIKE if variant == "gpt2" else LLAMA_LIKE), num_layers=1)
  params = init_params(config)
  batch = {key: jnp.asarray(value) for key, value in lm_batch(seed=3, rows=4, vocab=VOCAB).items()}
  task = CausalLm(seq_len=16)
  plain_loss, plain_sums, plain_grads = loss_and_grad(task, config, params, batch)
  chunked_loss, chunked_sums, chunked_grads = loss_and_grad(
      task, dataclasses.replace(config, loss_chunk_size=chunk), params, batch)

  # Independent reference of the loss: NumPy cross-entropy of the full logits.
  logits = np.asarray(Decoder(config).apply({"params": params}, batch["tokens"], batch["positions"],
                                            batch["segment_ids"]), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  targets = np.roll(np.asarray(batch["tokens"]), -1, axis=1)
  weights = np.asarray(task.weights(batch))
  nll = -np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
  np.testing.assert_allclose(chunked_loss, (nll * weights).sum(), rtol=1e-5)

  np.testing.assert_allclose(chunked_loss, plain_loss, rtol=1e-6)
  assert chunked_sums["weight"] == plain_sums["weight"] == weights.sum()
  assert chunked_sums["correct"] == plain_sums["correct"]
  assert set(chunked_sums) == set(plain_sums)
  flat_plain, flat_chunked = jax.tree.leaves_with_path(plain_grads), jax.tree.leaves(chunked_grads)
  scale = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(plain_grads))
  for (path, expected), actual in zip(flat_plain, flat_chunked):  # float32 rounding of sums in another order
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6 * scale, err_msg=jax.tree_util.keystr(path))


def test_chunked_eval_metrics_are_exact():
  """Token accuracy and the ECE bins (counts exactly, confidence sums to float32 rounding), on a seq2seq batch."""
  config = tiny(**LLAMA_LIKE)
  params = init_params(config, seed=2)
  batch = lm_batch(seed=5, rows=4, vocab=VOCAB)
  batch["loss_mask"] = (np.arange(16)[None] >= 6).repeat(4, 0).astype(np.int32)
  batch = {key: jnp.asarray(value) for key, value in batch.items()}
  task = Seq2Seq(seq_len=16)
  model = Decoder(config)
  plain = jax.device_get(jax.jit(lambda p: task.loss_and_metrics(model, p, batch, train=False)[1])(params))
  chunked_model = Decoder(dataclasses.replace(config, loss_chunk_size=3))
  chunked = jax.device_get(jax.jit(lambda p: task.loss_and_metrics(chunked_model, p, batch, train=False)[1])(params))
  assert "bin_count" in chunked and set(chunked) == set(plain)
  for key in ("weight", "correct", "bin_count", "bin_correct_sum"):
    np.testing.assert_array_equal(chunked[key], plain[key], err_msg=key)
  for key in ("loss_sum", "bin_confidence_sum"):
    np.testing.assert_allclose(chunked[key], plain[key], rtol=1e-6, err_msg=key)
  assert task.summarize(chunked)["ece"] == pytest.approx(task.summarize(plain)["ece"], rel=1e-5)


def test_chunked_loss_refuses_an_adapted_lm_head():
  config = tiny(**LLAMA_LIKE, num_layers=1, lora_rank=2, lora_targets="lm_head", loss_chunk_size=4)
  with pytest.raises(ConfigError, match="model.loss_chunk_size"):
    transformer.unembed(config, init_params(config), jnp.zeros((1, 4, config.embed_dim)))
