"""Decoder model: shapes, presets, causal masking, document isolation, rotary, GQA."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm.models import layers
from jaxlm.errors import ConfigError
from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models.transformer import Decoder
from jaxlm.models import params as params_lib

GPT2_LIKE = dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True)
LLAMA_LIKE = dict(position="rotary", norm="rmsnorm", mlp="swiglu", num_kv_heads=2, tie_embeddings=False)
VARIANTS = {"gpt2": GPT2_LIKE, "llama": LLAMA_LIKE, "llama_remat": {**LLAMA_LIKE, "remat": "save_dots"}}


def tiny(**overrides) -> ModelConfig:
  return ModelConfig(**{**PRESETS["tiny"], "vocab_size": 97, "max_len": 32, **overrides})


class Jitted:
  """A Decoder whose `apply` is jitted (eager flax is slow on CPU)."""

  def __init__(self, config):
    self.module = Decoder(config)
    self.apply = jax.jit(self.module.apply, static_argnames="deterministic")


def init(config, length=12, batch=2, seed=0):
  model = Jitted(config)
  tokens = jax.random.randint(jax.random.key(seed), (batch, length), 0, config.vocab_size)
  params = nn.meta.unbox(jax.jit(model.module.init)(jax.random.key(seed + 1), tokens))["params"]
  return model, params, tokens


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_shapes_and_parameter_layout(variant):
  config = tiny(**VARIANTS[variant])
  model, params, tokens = init(config)
  logits = model.apply({"params": params}, tokens)
  assert logits.shape == (2, 12, config.vocab_size)
  assert np.all(np.isfinite(logits))
  # Layers are stacked by nn.scan: a leading axis of size num_layers.
  assert params["layers"]["attention"]["query"]["kernel"].shape == (config.num_layers, 64, 4, 16)
  assert params["layers"]["attention"]["key"]["kernel"].shape[2] == config.num_kv_heads
  assert ("lm_head" in params) == (not config.tie_embeddings)
  assert ("position_embed" in params) == (config.position == "learned")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_logits_do_not_depend_on_later_tokens(variant):
  config = tiny(**VARIANTS[variant])
  model, params, tokens = init(config, length=16)
  changed = tokens.at[:, 9:].set((tokens[:, 9:] + 7) % config.vocab_size)
  before = model.apply({"params": params}, tokens)
  after = model.apply({"params": params}, changed)
  np.testing.assert_allclose(before[:, :9], after[:, :9], rtol=1e-5, atol=1e-5)
  assert not np.allclose(before[:, 9:], after[:, 9:])


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_packed_documents_do_not_attend_to_each_other(variant):
  """A document packed after another gives the same logits as the document alone."""
  config = tiny(**VARIANTS[variant])
  model, params, _ = init(config)
  first = jax.random.randint(jax.random.key(5), (1, 7), 0, config.vocab_size)
  second = jax.random.randint(jax.random.key(6), (1, 9), 0, config.vocab_size)
  packed = jnp.concatenate([first, second], axis=1)
  segment_ids = jnp.array([[1] * 7 + [2] * 9])
  positions = jnp.array([list(range(7)) + list(range(9))])
  packed_logits = model.apply({"params": params}, packed, positions, segment_ids)
  alone_first = model.apply({"params": params}, first)
  alone_second = model.apply({"params": params}, second)
  np.testing.assert_allclose(packed_logits[:, :7], alone_first, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(packed_logits[:, 7:], alone_second, rtol=1e-5, atol=1e-5)


def test_rotary_scores_depend_only_on_relative_position():
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(1, 1, 1, 8)), jnp.float32)
  frequency = layers.rotary_inverse_frequency(ModelConfig(embed_dim=32, num_heads=4, rope_theta=10000.0))

  def score(query_position, key_position):
    rq = layers.apply_rotary(q, jnp.array([[query_position]]), frequency)
    rk = layers.apply_rotary(k, jnp.array([[key_position]]), frequency)
    return float(jnp.sum(rq * rk))

  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-5)
  assert score(5, 2) != pytest.approx(score(5, 4), rel=1e-3)
  # Position 0 is the identity; rotation preserves norms.
  np.testing.assert_allclose(layers.apply_rotary(q, jnp.array([[0]]), frequency), q, rtol=1e-6)
  np.testing.assert_allclose(
    jnp.linalg.norm(layers.apply_rotary(q, jnp.array([[7]]), frequency)), jnp.linalg.norm(q), rtol=1e-5
  )


def _numpy_rotary(x, positions, theta):
  """Llama's rotate-half rotary embedding in float64; x [B, T, n, H], positions [B, T]."""
  half = x.shape[-1] // 2
  angles = positions[..., None] * theta ** (-np.arange(half) / half)  # [B, T, H/2]
  sin, cos = np.sin(angles)[:, :, None], np.cos(angles)[:, :, None]
  x1, x2 = x[..., :half], x[..., half:]
  return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


@pytest.mark.parametrize("position, attention", [("rotary", "xla"), ("learned", "xla"), ("rotary", "blocks")])
def test_attention_module_matches_numpy_reference(position, attention):
  """jaxlm's Attention (projections, rotary, grouped-query heads, packed causal mask, output projection; dense,
  or in causal query blocks that skip the keys after them) against a float64 NumPy computation from its own
  parameters."""
  config = tiny(embed_dim=32, num_heads=4, num_kv_heads=2, position=position, rope_theta=100.0, attention=attention)
  B, T, D, N, K, H = 2, 16, 32, 4, 2, 8
  rng = np.random.default_rng(1)
  x = rng.normal(size=(B, T, D))
  segments = np.array([[1] * 3 + [2] * 7 + [3] * 6, [1] * 13 + [0] * 3])
  positions = np.array([[0, 1, 2, *range(7), *range(6)], list(range(3, 19))])
  mask = layers.attention_mask(jnp.asarray(segments), jnp.asarray(segments), causal=True)
  assert layers.causal_query_blocks(config, T) == (4 if attention == "blocks" else 1)
  module = layers.Attention(config, causal=True)
  args = (jnp.asarray(x, jnp.float32), jnp.asarray(positions), mask)
  params = nn.meta.unbox(module.init(jax.random.key(0), *args)["params"])
  out = module.apply({"params": params}, *args)

  w = {name: np.asarray(params[name]["kernel"], np.float64) for name in ("query", "key", "value", "out")}
  q, k, v = (np.einsum("btd,dnh->btnh", x, w[name]) for name in ("query", "key", "value"))
  if position == "rotary":
    q, k = _numpy_rotary(q, positions, 100.0), _numpy_rotary(k, positions, 100.0)
  heads = np.zeros((B, T, N, H))
  allowed = (segments[:, :, None] == segments[:, None, :]) & np.tril(np.ones((T, T), bool))
  for b in range(B):
    for n in range(N):
      kv = n // (N // K)  # query heads 0, 1 share kv head 0; 2, 3 share kv head 1
      scores = np.where(allowed[b], q[b, :, n] @ k[b, :, kv].T / np.sqrt(H), -np.inf)
      weights = np.exp(scores - scores.max(-1, keepdims=True))
      heads[b, :, n] = (weights / weights.sum(-1, keepdims=True)) @ v[b, :, kv]
  expected = np.einsum("btnh,nhd->btd", heads, w["out"])
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_dropout_is_active_only_in_training():
  config = tiny(dropout_rate=0.5)
  model, params, tokens = init(config)
  eval_a = model.apply({"params": params}, tokens)
  eval_b = model.apply({"params": params}, tokens)
  np.testing.assert_array_equal(eval_a, eval_b)
  train = model.apply({"params": params}, tokens, deterministic=False, rngs={"dropout": jax.random.key(3)})
  assert not np.allclose(train, eval_a)


def test_bfloat16_compute_keeps_float32_parameters():
  config = tiny(dtype="bfloat16")
  model, params, tokens = init(config)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  assert model.apply({"params": params}, tokens).dtype == jnp.bfloat16


def expected_param_count(c: ModelConfig) -> int:
  """Parameter count written out by hand (GPT-2: 124,475,904 with the 50304-row vocabulary)."""
  D, F, L, V, N, K, H = c.embed_dim, c.mlp_dim, c.num_layers, c.vocab_size, c.num_heads, c.num_kv_heads, c.head_dim
  norm = D * (2 if c.norm == "layernorm" and c.use_bias else 1)
  attention = 2 * D * N * H + 2 * D * K * H + (N * H + 2 * K * H + D if c.use_bias else 0)
  mlp = (3 if c.mlp == "swiglu" else 2) * D * F + ((2 if c.mlp == "swiglu" else 1) * F + D if c.use_bias else 0)
  total = V * D + L * (attention + mlp + 2 * norm) + norm
  total += c.max_len * D if c.position == "learned" else 0
  total += 0 if c.tie_embeddings else D * V
  return total


@pytest.mark.parametrize("preset", ["gpt2_124m", "gpt2_350m", "llama_1b"])
def test_full_size_presets_through_eval_shape(preset):
  config = ModelConfig(**PRESETS[preset])
  model = Decoder(config)
  shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  assert params_lib.count(nn.meta.unbox(shapes["params"])) == expected_param_count(config)
  if preset == "gpt2_124m":
    assert expected_param_count(config) == 124_475_904


@pytest.mark.parametrize(
  "overrides, key",
  [
    (dict(num_heads=5), "model.num_heads"),
    (dict(num_kv_heads=3), "model.num_kv_heads"),
    (dict(norm="batchnorm"), "model.norm"),
    (dict(dtype="float8"), "model.dtype"),
    (dict(head_dim=15, position="rotary"), "model.head_dim"),
  ],
)
def test_invalid_model_config_names_the_key(overrides, key):
  with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
    tiny(**overrides)
