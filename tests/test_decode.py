"""Cached decoding: greedy against an uncached reference, sampling, beam search, EOS, padding, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import sharding
from jaxlm.inference import generate
from jaxlm.inference.decode import CachedDecoder, DecodeSettings, sampling_logits
from jaxlm.errors import ConfigError
from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models.layers import KVCache
from jaxlm.models.transformer import Decoder

GPT2_LIKE = dict(position="learned", norm="layernorm", mlp="gelu", use_bias=True, tie_embeddings=True)
LLAMA_LIKE = dict(position="rotary", norm="rmsnorm", mlp="swiglu", num_kv_heads=2, tie_embeddings=False)
PROMPTS = [[2, 11, 12, 13, 14, 15, 16], [2, 40], [2, 7, 8, 9, 10]]
NEW_TOKENS = 10


def make_model(seed=0, **overrides):
  config = ModelConfig(**{**PRESETS["tiny"], "vocab_size": 96, "max_len": 64, **overrides})
  model = Decoder(config)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, 8), jnp.int32)))["params"]
  return model, params


@pytest.fixture(scope="module")
def llama():
  """The model most tests share, so that they share compilations too."""
  return make_model(**LLAMA_LIKE)


def run(model, params, prompts, eos_id=-1, rng=None, **settings):
  """Decodes a batch of token lists; returns the numpy DecodeOutput."""
  tokens, start = generate.left_pad(prompts, pad_id=0)
  settings = DecodeSettings(**{"max_new_tokens": NEW_TOKENS, **settings})
  rng = jax.random.key(0) if rng is None else rng
  return jax.device_get(generate.decode(CachedDecoder(model), params, tokens, start, rng, settings, eos_id=eos_id))


def uncached_greedy(model, params, prompt, steps):
  """Reference: each step runs the whole prefix through the model (no cache) and takes the argmax."""
  apply = jax.jit(model.apply)
  buffer = np.zeros((1, 16 + steps), np.int32)  # one size for every prompt: one compilation
  buffer[0, : len(prompt)] = prompt
  for position in range(len(prompt), len(prompt) + steps):
    logits = apply({"params": params}, buffer)  # causal: the zeros after `position` do not matter
    buffer[0, position] = int(jnp.argmax(logits[0, position - 1]))
  return buffer[0, len(prompt) : len(prompt) + steps].tolist()


@pytest.mark.parametrize("variant", ["gpt2", "llama_gqa"])
def test_cached_greedy_equals_uncached_argmax_for_a_batch_of_different_lengths(variant, llama):
  model, params = make_model(**GPT2_LIKE) if variant == "gpt2" else llama
  output = run(model, params, PROMPTS)
  for row, prompt in enumerate(PROMPTS):
    assert output.tokens[row].tolist() == uncached_greedy(model, params, prompt, NEW_TOKENS)
  assert output.lengths.tolist() == [NEW_TOKENS] * len(PROMPTS)
  assert np.all(output.log_probs < 0)
  np.testing.assert_allclose(output.scores, output.log_probs.sum(-1), rtol=1e-6)


def test_prompts_batched_with_padding_decode_as_each_alone(llama):
  model, params = llama
  batched = run(model, params, PROMPTS, strategy="beam", beam_size=4)
  for row, prompt in enumerate(PROMPTS):
    alone = run(model, params, [prompt, prompt, prompt], strategy="beam", beam_size=4)
    assert batched.tokens[row].tolist() == alone.tokens[0].tolist()
    np.testing.assert_allclose(batched.log_probs[row], alone.log_probs[0], atol=1e-5)


def test_top_k_1_sampling_equals_greedy_and_a_fixed_key_reproduces(llama):
  model, params = llama
  greedy = run(model, params, PROMPTS)
  top_1 = run(model, params, PROMPTS, strategy="sample", top_k=1, temperature=0.7, rng=jax.random.key(5))
  assert top_1.tokens.tolist() == greedy.tokens.tolist()

  first = run(model, params, PROMPTS, strategy="sample", top_p=0.9, rng=jax.random.key(1))
  again = run(model, params, PROMPTS, strategy="sample", top_p=0.9, rng=jax.random.key(1))
  other = run(model, params, PROMPTS, strategy="sample", top_p=0.9, rng=jax.random.key(2))
  assert first.tokens.tolist() == again.tokens.tolist()
  assert first.tokens.tolist() != other.tokens.tolist()
  # A random model is nearly uniform over 97 tokens: samples are not the greedy tokens.
  assert first.tokens.tolist() != greedy.tokens.tolist()


def test_top_k_and_top_p_keep_the_right_tokens():
  logits = jnp.log(jnp.asarray([[0.5, 0.05, 0.3, 0.15]]))
  kept = lambda **kw: np.isfinite(sampling_logits(logits, DecodeSettings(strategy="sample", **kw)))[0].tolist()
  assert kept(top_k=2) == [True, False, True, False]
  assert kept(top_p=0.5) == [True, False, False, False]  # the most likely token alone covers 0.5
  assert kept(top_p=0.7) == [True, False, True, False]
  assert kept(top_p=0.9) == [True, False, True, True]
  assert kept(top_k=2, top_p=0.9) == [True, False, True, False]
  np.testing.assert_allclose(sampling_logits(logits, DecodeSettings(temperature=2.0)), logits / 2)


def test_eos_stops_a_row_while_the_others_continue(llama):
  model, params = llama
  free = run(model, params, PROMPTS)
  eos = int(free.tokens[0, 3])  # row 0 produces it at step 3 (maybe earlier too)
  stop = free.tokens[0].tolist().index(eos)
  stopped = run(model, params, PROMPTS, eos_id=eos)
  assert stopped.lengths[0] == stop + 1
  assert stopped.tokens[0, : stop + 1].tolist() == free.tokens[0, : stop + 1].tolist()
  assert stopped.tokens[0, stop + 1 :].tolist() == [0] * (NEW_TOKENS - stop - 1)  # pad_id after EOS
  assert np.all(stopped.log_probs[0, stop + 1 :] == 0)
  for row in (1, 2):  # the others go on to their own EOS or to max_new_tokens
    row_tokens = free.tokens[row].tolist()
    length = row_tokens.index(eos) + 1 if eos in row_tokens else NEW_TOKENS
    assert stopped.lengths[row] == length
    assert stopped.tokens[row, :length].tolist() == row_tokens[:length]
  assert max(stopped.lengths) > stopped.lengths[0]


def test_beam_search_width_1_is_greedy_and_wider_beams_score_at_least_as_high(llama):
  model, params = llama
  greedy = run(model, params, PROMPTS)
  beam_1 = run(model, params, PROMPTS, strategy="beam", beam_size=1)
  assert beam_1.tokens.tolist() == greedy.tokens.tolist()
  np.testing.assert_allclose(beam_1.scores, greedy.scores, rtol=1e-5)
  beam_4 = run(model, params, PROMPTS, strategy="beam", beam_size=4)
  assert np.all(beam_4.scores >= greedy.scores - 1e-5)
  assert np.any(beam_4.scores > greedy.scores + 1e-3)
  np.testing.assert_allclose(beam_4.scores, beam_4.log_probs.sum(-1), rtol=1e-5)


def test_beam_search_ends_hypotheses_at_eos_and_applies_the_length_penalty(llama):
  model, params = llama
  free = run(model, params, PROMPTS, strategy="beam", beam_size=4)
  eos = int(free.tokens[1, 2])
  for penalty in (0.0, 1.0):
    output = run(model, params, PROMPTS, eos_id=eos, strategy="beam", beam_size=4, length_penalty=penalty)
    for row in range(len(PROMPTS)):
      length = int(output.lengths[row])
      tokens = output.tokens[row].tolist()
      assert eos not in tokens[: length - 1]
      assert length == NEW_TOKENS or tokens[length - 1] == eos
      assert tokens[length:] == [0] * (NEW_TOKENS - length)
      np.testing.assert_allclose(output.scores[row], output.log_probs[row].sum() / length**penalty, rtol=1e-5)
    assert np.any(output.lengths < NEW_TOKENS)


def test_bad_settings_name_the_key():
  with pytest.raises(ConfigError, match="decode.temperature.*greedy"):
    DecodeSettings(strategy="sample", temperature=0.0)
  with pytest.raises(ConfigError, match="decode.strategy"):
    DecodeSettings(strategy="nucleus")
  with pytest.raises(ConfigError, match="decode.top_p"):
    DecodeSettings(top_p=0.0)


def test_sharded_bfloat16_decoding_matches_one_device_and_shards_the_cache():
  """bfloat16 weights on a data x fsdp x tensor mesh with the training rules: the tokens of one device,
  the cache split over batch and kv heads."""
  model, params = make_model(**LLAMA_LIKE, dtype="bfloat16", param_dtype="bfloat16")
  mesh = sharding.create_mesh(dict(data=2, fsdp=2, tensor=2))
  prompts = PROMPTS + [[2, 5, 6]]
  expected = run(model, params, prompts)
  specs = nn.get_partition_spec(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
  sharded_params = jax.device_put(params, sharding.logical_to_sharding(specs, mesh)["params"])
  tokens, start = generate.left_pad(prompts, pad_id=0)
  with sharding.mesh_context(mesh):
    output = jax.device_get(
      generate.decode(
        CachedDecoder(model),
        sharded_params,
        tokens,
        start,
        jax.random.key(0),
        DecodeSettings(max_new_tokens=NEW_TOKENS),
      )
    )
    cache = jax.jit(lambda: KVCache.create(model.config, jnp.zeros(4, jnp.int32), 16))()
  # bfloat16 sums in another order may flip a near-tie: compare the first tokens, which carry no earlier flip.
  assert output.tokens[:, :4].tolist() == expected.tokens[:, :4].tolist()
  assert cache.key.dtype == jnp.bfloat16
  assert cache.key.sharding.spec == jax.sharding.PartitionSpec(None, ("data", "fsdp"), "tensor")  # [L, B, K, S, H]


def _uncached_log_probs(model, params, prefix: list[int]) -> np.ndarray:
  """log-softmax of the raw next-token logits after `prefix`, from a full forward pass (no cache)."""
  logits = np.asarray(jax.jit(model.apply)({"params": params}, np.asarray([prefix], np.int32))[0, -1], np.float64)
  return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


def test_sampled_log_probs_are_the_models_raw_log_probs_and_respect_top_k(llama):
  """Temperature and top-k change which token is drawn, never the reported log-probability: that is the model's
  log-softmax of the raw logits (checked without the cache), and the token is among the raw top k."""
  model, params = llama
  output = run(model, params, PROMPTS[:2], strategy="sample", temperature=0.7, top_k=5, rng=jax.random.key(3))
  for row, prompt in enumerate(PROMPTS[:2]):
    prefix = list(prompt)
    for step in range(NEW_TOKENS):
      token = int(output.tokens[row, step])
      reference = _uncached_log_probs(model, params, prefix)
      assert token in np.argsort(reference)[-5:]
      assert output.log_probs[row, step] == pytest.approx(reference[token], abs=2e-5)
      prefix.append(token)


def test_two_steps_of_beam_search_equal_a_brute_force_search_over_the_kept_beams():
  """Two steps of beam search (no EOS) keep the W best first tokens, then return the best of their W x V
  continuations: checked against all of them, scored by brute force with the uncached model."""
  model, params = make_model(vocab_size=32, **LLAMA_LIKE)
  prompt, beams = [2, 5, 9, 4], 8
  output = run(model, params, [prompt], strategy="beam", beam_size=beams, max_new_tokens=2)
  first = _uncached_log_probs(model, params, prompt)
  kept = np.argsort(first)[-beams:]
  totals = {
    (a, b): first[a] + second[b]
    for a in kept
    for second in [_uncached_log_probs(model, params, prompt + [int(a)])]
    for b in range(32)
  }
  best = max(totals, key=totals.get)
  assert output.tokens[0].tolist() == [int(best[0]), int(best[1])]
  assert output.scores[0] == pytest.approx(totals[best], abs=1e-4)
