"""KV-cached decoding: greedy, sampling (temperature, top-k, top-p) and beam search, all inside one `jax.jit`.

The strategies see a model only through a small step interface (`StepModel`):
`prefill` runs the left-padded prompts in one call and returns the cache and the
logits of the next token, `step` feeds one token per row and advances the cache;
the cache itself only needs `take(rows)` (beam search reorders rows). A
decoder-only model is `CachedDecoder`; an encoder-decoder is `CachedEncoderDecoder`, whose
`prefill` runs the encoder once on the prompts and caches every decoder layer's cross-attention keys and
values. `step_model(model, start_id)` picks the interface of a module (STEP_MODELS).

`jaxlm.inference.generate` runs prefill + a strategy as one jitted program
and turns text into prompts and back. Greedy and sampling share one `lax.while_loop` that stops when every row has
produced `eos_id` or after `max_new_tokens`. Per-token log-probabilities are
those of the model (log-softmax of the raw logits, whatever the temperature or
filters); a sequence's score is their sum (beam search: divided by
length ** length_penalty).

Shape legend: B batch (prompts), W beams, P padded prompt length, N new tokens, V vocabulary.
"""

import dataclasses
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp

from jaxlm.errors import check
from jaxlm.models import quantize
from jaxlm.models.config import DTYPES
from jaxlm.models.layers import KVCache
from jaxlm.models.transformer import Decoder, EncoderDecoder

STRATEGIES = ("greedy", "sample", "beam")


@dataclasses.dataclass(frozen=True)
class DecodeSettings:
  """How to choose tokens; mirrors the `decode` config section (static under jit: a change recompiles)."""

  strategy: str = "greedy"  # greedy, sample or beam
  max_new_tokens: int = 64  # tokens generated per prompt (fewer if EOS comes first)
  temperature: float = 1.0  # sample: logits are divided by it
  top_k: int = 0  # sample: keep the k most likely tokens; 0 = all
  top_p: float = 1.0  # sample: keep the smallest set of tokens with this much probability; 1 = all
  beam_size: int = 4  # beam: hypotheses kept per prompt
  length_penalty: float = 0.0  # beam: score = sum of log-probs / length ** length_penalty; 0 = plain sum

  @classmethod
  def from_config(cls, decode_config: Any) -> "DecodeSettings":
    """From the `decode` config section (whose `seed`, `dtype` and `quantize` are for the caller)."""
    return cls(**{field.name: decode_config[field.name] for field in dataclasses.fields(cls)})

  def __post_init__(self):
    check(self.strategy in STRATEGIES, "decode.strategy", f"{self.strategy!r} is not one of {STRATEGIES}.")
    check(self.max_new_tokens > 0, "decode.max_new_tokens", f"must be positive, got {self.max_new_tokens}.")
    check(
      self.temperature > 0,
      "decode.temperature",
      f"must be positive, got {self.temperature}; use decode.strategy='greedy' for temperature 0.",
    )
    check(self.top_k >= 0, "decode.top_k", f"must be >= 0 (0 keeps every token), got {self.top_k}.")
    check(0 < self.top_p <= 1, "decode.top_p", f"must be in (0, 1], got {self.top_p}.")
    check(self.beam_size > 0, "decode.beam_size", f"must be positive, got {self.beam_size}.")
    check(self.length_penalty >= 0, "decode.length_penalty", f"must be >= 0, got {self.length_penalty}.")


def check_config(decode_config: Any) -> None:
  """Validates the `decode` section: the settings, `dtype` ('' = as trained) and `quantize` ('' = none)."""
  DecodeSettings.from_config(decode_config)
  check(
    decode_config.dtype in ("", *DTYPES),
    "decode.dtype",
    f"{decode_config.dtype!r} is not '' or one of {tuple(DTYPES)}.",
  )
  if decode_config.quantize:
    quantize.scheme(decode_config.quantize, "decode.quantize")


class DecodeOutput(flax.struct.PyTreeNode):
  """What every strategy returns, one row per prompt."""

  tokens: jax.Array  # [B, N] int32, the generated tokens (EOS included), then pad_id
  log_probs: jax.Array  # [B, N] float32, model log-probability of each token, 0 after the end
  lengths: jax.Array  # [B] int32, tokens generated (EOS included)
  scores: jax.Array  # [B] float32, sum of log_probs (beam search: over length ** length_penalty)


class StepModel(Protocol):
  """The model interface the strategies decode with (hashable: it is a static argument of `jit`)."""

  def prefill(self, params: Any, tokens: jax.Array, start: jax.Array, length: int) -> tuple[jax.Array, Any]:
    """Left-padded prompts [B, P] whose tokens begin at `start` [B] -> (next-token logits [B, V] float32,
    a cache with room for `length` slots)."""

  def step(self, params: Any, tokens: jax.Array, cache: Any) -> tuple[jax.Array, Any]:
    """One token per row [B] -> (next-token logits [B, V] float32, the cache advanced by one)."""


@dataclasses.dataclass(frozen=True)
class CachedDecoder:
  """The step interface of a decoder-only `Decoder`, over a `KVCache`."""

  model: Decoder

  def prefill(self, params, tokens, start, length):
    cache = KVCache.create(self.model.config, start, length)
    logits, cache = self.model.apply({"params": params}, tokens, cache=cache)
    return logits[:, -1].astype(jnp.float32), cache

  def step(self, params, tokens, cache):
    logits, cache = self.model.apply({"params": params}, tokens[:, None], cache=cache)
    return logits[:, 0].astype(jnp.float32), cache


@dataclasses.dataclass(frozen=True)
class CachedEncoderDecoder:
  """The step interface of an `EncoderDecoder`: the left-padded prompts go to the encoder (once), the
  decoder starts from `start_id` and continues over an `EncoderDecoderCache`."""

  model: EncoderDecoder
  start_id: int  # the decoder's first token, as in training (`pipeline.decoder_start_id`: bos, or T5's pad)

  def prefill(self, params, tokens, start, length):
    slots = jnp.arange(tokens.shape[1])[None, :]
    segment_ids = (slots >= start[:, None]).astype(jnp.int32)  # left padding is segment 0
    positions = jnp.maximum(slots - start[:, None], 0)
    first = jnp.full((tokens.shape[0], 1), self.start_id, jnp.int32)
    logits, cache = self.model.apply(
      {"params": params},
      tokens,
      positions,
      segment_ids,
      first,
      length - tokens.shape[1] + 1,
      method=EncoderDecoder.prefill,
    )
    return logits[:, -1].astype(jnp.float32), cache

  def step(self, params, tokens, cache):
    logits, cache = self.model.apply({"params": params}, tokens[:, None], cache, method=EncoderDecoder.step)
    return logits[:, 0].astype(jnp.float32), cache


STEP_MODELS = {Decoder: lambda model, start_id: CachedDecoder(model), EncoderDecoder: CachedEncoderDecoder}


def step_model(model, start_id: int) -> StepModel:
  """The step interface of `model` (a module of `STEP_MODELS`); `start_id` starts an encoder-decoder's output."""
  if type(model) not in STEP_MODELS:
    raise ValueError(
      f"{type(model).__name__} does not generate text; generation needs one of {[cls.__name__ for cls in STEP_MODELS]}."
    )
  return STEP_MODELS[type(model)](model, start_id)


def sampling_logits(logits: jax.Array, settings: DecodeSettings) -> jax.Array:
  """Logits [B, V] divided by the temperature, with tokens outside top-k / top-p set to -inf."""
  logits = logits / settings.temperature
  if settings.top_k:
    kth_largest = jax.lax.top_k(logits, settings.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
  if settings.top_p < 1:
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    # The most likely token always stays; then every token until top_p of the mass is covered.
    threshold = jnp.min(jnp.where(mass_before < settings.top_p, descending, jnp.inf), axis=-1, keepdims=True)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


def sample_loop(
  step_model: StepModel,
  params,
  logits: jax.Array,
  cache,
  rng: jax.Array,
  settings: DecodeSettings,
  eos_id: jax.Array | int,
  pad_id: int,
) -> DecodeOutput:
  """Greedy (argmax) or sampled tokens after a prefill that gave `logits` [B, V] and `cache`.

  Token t of every row is drawn with `fold_in(rng, t)`, so a fixed key gives the same tokens.
  """
  batch, max_new_tokens = logits.shape[0], settings.max_new_tokens

  def pick(t, logits, tokens, log_probs, lengths, done):
    if settings.strategy == "greedy":
      token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
      token = jax.random.categorical(jax.random.fold_in(rng, t), sampling_logits(logits, settings)).astype(jnp.int32)
    log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
    token = jnp.where(done, pad_id, token)
    tokens = tokens.at[:, t].set(token)
    log_probs = log_probs.at[:, t].set(jnp.where(done, 0.0, log_prob))
    return token, tokens, log_probs, lengths + (~done), done | (token == eos_id)

  def body(state):
    t, logits, cache, *outputs = state
    token, *outputs = pick(t, logits, *outputs)
    logits, cache = step_model.step(params, token, cache)
    return (t + 1, logits, cache, *outputs)

  def keep_going(state):
    t, done = state[0], state[-1]
    return (t < max_new_tokens - 1) & ~jnp.all(done)

  outputs = (
    jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
    jnp.zeros((batch, max_new_tokens), jnp.float32),
    jnp.zeros((batch,), jnp.int32),
    jnp.zeros((batch,), bool),
  )
  t, logits, _, *outputs = jax.lax.while_loop(keep_going, body, (jnp.zeros((), jnp.int32), logits, cache, *outputs))
  _, tokens, log_probs, lengths, _ = pick(t, logits, *outputs)  # the last token needs no step after it
  return DecodeOutput(tokens=tokens, log_probs=log_probs, lengths=lengths, scores=log_probs.sum(axis=-1))
