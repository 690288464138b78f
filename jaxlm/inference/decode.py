"""Greedy decoding for a decoder model.

Each step re-runs the model on the whole fixed-size buffer and reads the
logits at the last filled position, so one compiled program serves every
step (`lax.fori_loop` inside `jit`). Quadratic in length: fine for the short
samples printed after training.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np


@functools.partial(jax.jit, static_argnames=("model", "max_new_tokens"))
def _greedy(model, params, buffer, prompt_length, max_new_tokens: int):
  def step(i, buffer):
    position = prompt_length + i  # index to fill
    logits = model.apply({"params": params}, buffer)  # [1, L, V]
    next_token = jnp.argmax(logits[0, position - 1], axis=-1).astype(buffer.dtype)
    return buffer.at[0, position].set(next_token)

  return jax.lax.fori_loop(0, max_new_tokens, step, buffer)


def greedy_decode(model, params, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
  """Token ids generated greedily after `prompt_ids` (cut after the first `eos_id`)."""
  length = len(prompt_ids) + max_new_tokens
  if length > model.config.max_len:
    raise ValueError(f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
                     f"model.max_len={model.config.max_len}; shorten the prompt or sample.max_new_tokens.")
  buffer = np.zeros((1, length), np.int32)
  buffer[0, :len(prompt_ids)] = prompt_ids
  out = np.asarray(_greedy(model, params, jnp.asarray(buffer), len(prompt_ids), max_new_tokens))
  generated = out[0, len(prompt_ids):].tolist()
  if eos_id is not None and eos_id in generated:
    generated = generated[:generated.index(eos_id)]
  return generated
