"""The speed paths against their plain references: the chunked cross-entropy (loss, gradient, eval metrics),
the Pallas flash-attention kernel with segment ids (values, gradients; CPU interpret mode), and int8
weight-only decoding (logits within a stated tolerance of float32; greedy output of a trained tiny model)."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.errors import ConfigError
from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models import flash_attention, layers, quantize, transformer
from jaxlm.models import params as params_lib
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
    task, dataclasses.replace(config, loss_chunk_size=chunk), params, batch
  )

  # Independent reference of the loss: NumPy cross-entropy of the full logits.
  logits = np.asarray(
    Decoder(config).apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64
  )
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


# ------------------------------------------------------------------------------------ flash attention, segment ids


def packed_segments(rows: int, length: int) -> np.ndarray:
  """Rows of 1-3 documents of random lengths, some ending in padding (segment 0)."""
  rng = np.random.default_rng(7)
  segment_ids = np.zeros((rows, length), np.int32)
  for row in range(rows):
    cuts = np.sort(rng.choice(np.arange(1, length), size=rng.integers(1, 3), replace=False))
    segment_ids[row] = np.searchsorted(cuts, np.arange(length), side="right") + 1
    if row % 2:
      segment_ids[row, length - 5 :] = 0
  return segment_ids


def test_flash_attention_with_segment_ids_equals_the_xla_reference():
  """Values and gradients of the Pallas kernel (interpret mode on CPU) against the dense-mask XLA attention,
  with grouped-query heads (N = 4, K = 2) and packed rows with padding."""
  batch, length, heads, kv_heads, head_dim = 2, 32, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 4)
  query = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  key, value = (jax.random.normal(k, (batch, length, kv_heads, head_dim)) for k in keys[1:3])
  probe = jax.random.normal(keys[3], (batch, length, heads, head_dim))  # a fixed random cotangent
  segment_ids = jnp.asarray(packed_segments(batch, length))
  mask = layers.attention_mask(segment_ids, segment_ids, causal=True)

  def flash(q, k, v):
    return flash_attention.segment_attention(q, k, v, segment_ids, causal=True)

  def reference(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="xla")

  np.testing.assert_allclose(jax.jit(flash)(query, key, value), reference(query, key, value), atol=2e-6)
  flash_grads = jax.jit(jax.grad(lambda *x: jnp.sum(flash(*x) * probe), argnums=(0, 1, 2)))(query, key, value)
  reference_grads = jax.grad(lambda *x: jnp.sum(reference(*x) * probe), argnums=(0, 1, 2))(query, key, value)
  for name, actual, expected in zip("qkv", flash_grads, reference_grads):
    np.testing.assert_allclose(actual, expected, atol=5e-6, err_msg=name)


def test_decoder_with_pallas_attention_equals_xla_on_a_sharded_batch():
  """The whole model, its batch sharded over 4 data x 2 tensor devices (the kernel runs per shard)."""
  config = tiny(**LLAMA_LIKE, num_layers=1)
  params = init_params(config)
  batch = {key: jnp.asarray(value) for key, value in lm_batch(seed=1, rows=4, vocab=VOCAB).items()}
  task = CausalLm(seq_len=16)
  mesh = sharding.create_mesh(dict(data=4, fsdp=1, tensor=2), jax.devices()[:8])

  def loss(config):
    model = Decoder(config)
    with sharding.mesh_context(mesh):
      params_on_mesh = jax.device_put(params, sharding.replicated(mesh))
      batch_on_mesh = jax.device_put(batch, sharding.batch_sharding(mesh))
      step = jax.jit(jax.value_and_grad(lambda p: task.loss_and_metrics(model, p, batch_on_mesh, train=False)[0]))
      return step(params_on_mesh)

  (flash_loss, flash_grads), (xla_loss, xla_grads) = loss(dataclasses.replace(config, attention="pallas")), loss(config)
  np.testing.assert_allclose(flash_loss, xla_loss, rtol=1e-6)
  for (path, expected), actual in zip(jax.tree.leaves_with_path(xla_grads), jax.tree.leaves(flash_grads)):
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("with_bias", [False, True])
def test_causal_query_blocks_equal_dense_attention_values_and_gradients(with_bias):
  """`model.attention = "blocks"` (the CPU default): 4 query blocks, each over the keys up to its end, against
  one dense attention under the same packed causal mask, with grouped-query heads and (T5) a logit bias."""
  batch, length, heads, kv_heads, head_dim = 2, 32, 4, 2, 16
  keys = jax.random.split(jax.random.key(0), 5)
  query = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  key, value = (jax.random.normal(k, (batch, length, kv_heads, head_dim)) for k in keys[1:3])
  probe = jax.random.normal(keys[3], (batch, length, heads, head_dim))
  bias = jax.random.normal(keys[4], (batch, heads, length, length)) if with_bias else None
  segment_ids = jnp.asarray(packed_segments(batch, length))
  mask = layers.attention_mask(segment_ids, segment_ids, causal=True)

  def attention(blocks):
    def fn(q, k, v):
      return jnp.sum(layers.causal_block_attention(q, k, v, bias, mask, None, blocks, "xla") * probe)

    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))

  (blocked, blocked_grads), (dense, dense_grads) = attention(4)(query, key, value), attention(1)(query, key, value)
  np.testing.assert_allclose(blocked, dense, rtol=1e-5)
  for name, actual, expected in zip("qkv", blocked_grads, dense_grads):
    np.testing.assert_allclose(actual, expected, atol=2e-5, err_msg=name)


def test_a_pallas_decoder_initialises_from_the_default_sample_input():
  """The train state's shapes come from `model.init` on the default sample row, which the kernel must tile (a
  [1, 1] sample made every Pallas run fail before its first step; the tests above init on longer rows)."""
  abstract = params_lib.abstract_params(Decoder(tiny(**LLAMA_LIKE, attention="pallas")))
  assert jax.tree.structure(abstract) == jax.tree.structure(params_lib.abstract_params(Decoder(tiny(**LLAMA_LIKE))))


def test_flash_attention_needs_whole_tiles():
  with pytest.raises(ConfigError, match="model.attention"):
    flash_attention.block_size(24)
  assert flash_attention.block_size(1024) == 128 and flash_attention.block_size(48) == 16


# ------------------------------------------------------------------------------------------ int8 weight-only decoding

# Stated tolerance of int8 logits: per-channel rounding moves each weight by at most scale / 2 = max|w| / 254,
# so logits move by well under 1% of their range on the tiny models; checked as 2% of the largest |logit|.
INT8_LOGIT_TOLERANCE = 0.02


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_int8_logits_are_the_dequantized_model_and_close_to_float32(variant):
  config = tiny(**(GPT2_LIKE if variant == "gpt2" else LLAMA_LIKE), num_layers=1)
  params = init_params(config, seed=4)
  int8_model = Decoder(dataclasses.replace(config, quantize="int8"))
  int8_params = quantize.convert_params(params, params_lib.abstract_params(int8_model), "int8")
  kernel = int8_params["layers"]["mlp"]["up"]["kernel"]
  assert kernel.dtype == jnp.int8 and int8_params["layers"]["mlp"]["up"]["kernel_scale"].shape == (1, 1, 128)
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (2, 12)), jnp.int32)

  # Independent reference: the float model with every kernel replaced by its NumPy-dequantized int8 version.
  def dequantized(tree):
    if not isinstance(tree, dict):
      return tree
    out = {key: dequantized(value) for key, value in tree.items() if key != "kernel_scale"}
    if "kernel_scale" in tree:
      out["kernel"] = np.asarray(tree["kernel"], np.float32) * np.asarray(tree["kernel_scale"])
    return out

  float_logits = Decoder(config).apply({"params": params}, tokens)
  int8_logits = int8_model.apply({"params": int8_params}, tokens)
  np.testing.assert_allclose(
    int8_logits, Decoder(config).apply({"params": dequantized(int8_params)}, tokens), rtol=1e-5, atol=1e-6
  )
  error = float(jnp.abs(int8_logits - float_logits).max())
  assert 0 < error <= INT8_LOGIT_TOLERANCE * float(jnp.abs(float_logits).max())
  assert quantize.kernel_bytes(int8_params) < 0.6 * quantize.kernel_bytes(params)


def test_int8_greedy_decoding_of_a_trained_tiny_model(tiny_workdir):
  """Reported: the greedy continuations of float32 and int8 weights (in the test log, -s)."""
  from jaxlm import Experiment

  experiment = Experiment.from_workdir(tiny_workdir)
  params = experiment.load_params()
  prompts = ["def ", "import "]
  float_out = experiment.generate(params, prompts, max_new_tokens=16)
  int8_out = experiment.generate(params, prompts, max_new_tokens=16, quantize="int8")
  for prompt, f, q in zip(prompts, float_out, int8_out):
    agree = sum(a == b for a, b in zip(f.tokens, q.tokens))
    print(
      f"\n{prompt!r}: float32 {f.text!r}\n{' ' * len(repr(prompt))}  int8    {q.text!r} ({agree}/{len(f.tokens)} "
      f"tokens equal; scores {f.score:.3f} vs {q.score:.3f})"
    )
    assert len(q.tokens) == len(f.tokens) == 16
    assert q.tokens[0] == f.tokens[0]
    assert abs(q.score - f.score) < 0.05 * abs(f.score) + 0.5


def test_quantize_config_is_checked():
  with pytest.raises(ConfigError, match="model.quantize"):
    tiny(quantize="int3")
  with pytest.raises(ConfigError, match="model.quantize"):
    tiny(quantize="int8", lora_rank=2)
