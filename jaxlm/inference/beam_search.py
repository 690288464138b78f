"""Beam search over the `StepModel` interface, inside one `lax.while_loop`.

Each prompt keeps W alive hypotheses (rows of the cache, reordered with
`cache.take` as beams are chosen) and W finished ones. At every step the 2W
best extensions of the alive beams are ranked by their sum of log-probs: those
that end in EOS (or reach max_new_tokens) compete for the finished slots by
score = sum / length ** length_penalty, the best W others stay alive. A prompt
is done when its worst finished score beats the best score any alive beam can
still reach (sums only decrease; with length_penalty >= 0 the bound is the
alive sum over max_new_tokens ** length_penalty). The best finished
hypothesis is returned.

Shape legend: B batch (prompts), W beams, N new tokens, V vocabulary.
"""

import jax
import jax.numpy as jnp

from jaxlm.inference.decode import DecodeOutput, DecodeSettings, StepModel


def _gather(values: jax.Array, indices: jax.Array) -> jax.Array:
  """values [B, M, ...], indices [B, M'] -> [B, M', ...]."""
  return jax.vmap(lambda row, index: row[index])(values, indices)


def beam_search(
  step_model: StepModel, params, logits: jax.Array, cache, settings: DecodeSettings, eos_id, pad_id: int
) -> DecodeOutput:
  """Beam search after a prefill that gave next-token `logits` [B, V] and a cache of B rows."""
  batch, vocab = logits.shape
  beams, max_new_tokens = settings.beam_size, settings.max_new_tokens
  if 2 * beams > vocab:
    raise ValueError(f"decode.beam_size={beams} needs a vocabulary of at least {2 * beams} tokens, got {vocab}.")
  cache = cache.take(jnp.repeat(jnp.arange(batch), beams))  # row b * W + w is beam w of prompt b
  log_probs = jnp.repeat(jax.nn.log_softmax(logits)[:, None], beams, axis=1)  # [B, W, V]

  def normalized(sums, length):
    return sums / jnp.asarray(length, jnp.float32) ** settings.length_penalty

  def pick(t, log_probs, alive, finished):
    """Chooses token t: extends the alive beams, updates the finished ones."""
    alive_tokens, alive_log_probs, alive_sums = alive
    finished_tokens, finished_log_probs, finished_lengths, finished_scores = finished
    candidate_sums, flat = jax.lax.top_k((alive_sums[..., None] + log_probs).reshape(batch, -1), 2 * beams)
    source, token = flat // vocab, (flat % vocab).astype(jnp.int32)  # [B, 2W]
    tokens = _gather(alive_tokens, source).at[:, :, t].set(token)  # [B, 2W, N]
    token_log_probs = _gather(alive_log_probs, source).at[:, :, t].set(candidate_sums - _gather(alive_sums, source))
    ends = (token == eos_id) | (t == max_new_tokens - 1)

    scores = jnp.where(ends, normalized(candidate_sums, t + 1), -jnp.inf)
    scores = jnp.concatenate([finished_scores, scores], axis=1)  # [B, 3W]
    finished_scores, best = jax.lax.top_k(scores, beams)
    finished = (
      _gather(jnp.concatenate([finished_tokens, tokens], axis=1), best),
      _gather(jnp.concatenate([finished_log_probs, token_log_probs], axis=1), best),
      _gather(jnp.concatenate([finished_lengths, jnp.full((batch, 2 * beams), t + 1)], axis=1), best),
      finished_scores,
    )

    alive_sums, best = jax.lax.top_k(jnp.where(ends, -jnp.inf, candidate_sums), beams)
    alive = (_gather(tokens, best), _gather(token_log_probs, best), alive_sums)
    rows = (jnp.arange(batch)[:, None] * beams + _gather(source, best)).reshape(-1)
    return alive, finished, rows

  def body(state):
    t, log_probs, cache, alive, finished, _ = state
    alive, finished, rows = pick(t, log_probs, alive, finished)
    logits, cache = step_model.step(params, alive[0][:, :, t].reshape(-1), cache.take(rows))
    log_probs = jax.nn.log_softmax(logits).reshape(batch, beams, vocab)
    best_reachable = normalized(jnp.max(alive[2], axis=1), max_new_tokens)
    done = jnp.min(finished[3], axis=1) >= best_reachable
    return t + 1, log_probs, cache, alive, finished, done

  def keep_going(state):
    t, done = state[0], state[-1]
    return (t < max_new_tokens - 1) & ~jnp.all(done)

  shape = (batch, beams, max_new_tokens)
  first_sums = jnp.where(jnp.arange(beams) == 0, 0.0, -jnp.inf)  # the W beams start as one: expand beam 0 only
  alive = (jnp.full(shape, pad_id, jnp.int32), jnp.zeros(shape), jnp.broadcast_to(first_sums, (batch, beams)))
  finished = (
    jnp.full(shape, pad_id, jnp.int32),
    jnp.zeros(shape),
    jnp.zeros((batch, beams), jnp.int32),
    jnp.full((batch, beams), -jnp.inf),
  )
  state = (jnp.zeros((), jnp.int32), log_probs, cache, alive, finished, jnp.zeros((batch,), bool))
  t, log_probs, _, alive, finished, _ = jax.lax.while_loop(keep_going, body, state)
  _, (tokens, token_log_probs, lengths, scores), _ = pick(t, log_probs, alive, finished)
  return DecodeOutput(tokens=tokens[:, 0], log_probs=token_log_probs[:, 0], lengths=lengths[:, 0], scores=scores[:, 0])
