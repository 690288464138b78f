"""Wall-clock timing of KV-cached decoding: what `scripts/benchmark.py --decode` and the compression report
(`jaxlm.compress`) measure, one definition for both.

`time_decode` times, for a batch of random prompts (fixed by the batch size), the prefill alone, greedy decoding
of 1 token and of `new_tokens` tokens (no EOS, so every row generates all of them), each the median of `repeats`
calls after one warm-up (compilation) call; per-token time is the difference over the extra tokens, so the
prefill and the first step do not count in it.
"""

import statistics
import time

import jax
import numpy as np

from jaxlm.inference import generate
from jaxlm.inference.decode import DecodeSettings


def median_seconds(run, repeats: int) -> float:
  """Median wall time of `run()` (which must block until done) over `repeats` calls after one warm-up call."""
  run()
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    timings.append(time.perf_counter() - start)
  return statistics.median(timings)


def decode_row(batch: int, new_tokens: int, prefill_s: float, one_token_s: float, total_s: float) -> dict:
  """{batch, prefill_ms, per_token_ms, tokens_per_sec} of the three timings of `time_decode`."""
  return {
    "batch": batch,
    "prefill_ms": 1e3 * prefill_s,
    "per_token_ms": 1e3 * (total_s - one_token_s) / max(new_tokens - 1, 1),
    "tokens_per_sec": batch * new_tokens / total_s,
  }


def time_decode(step_model, params, batch: int, prompt_len: int, new_tokens: int, repeats: int, vocab_size: int):
  """`decode_row` of greedy decoding with `step_model` (a `CachedDecoder`) and `params` (see the module
  docstring)."""
  slots = prompt_len + new_tokens
  prefill = jax.jit(lambda params, tokens, start: step_model.prefill(params, tokens, start, slots))
  tokens = np.random.default_rng(batch).integers(4, vocab_size, (batch, prompt_len), dtype=np.int32)
  start = np.zeros(batch, np.int32)

  def decode(count):
    settings = DecodeSettings(max_new_tokens=count)
    jax.block_until_ready(generate.decode(step_model, params, tokens, start, jax.random.key(0), settings))

  return decode_row(
    batch,
    new_tokens,
    median_seconds(lambda: jax.block_until_ready(prefill(params, tokens, start)), repeats),
    median_seconds(lambda: decode(1), repeats),
    median_seconds(lambda: decode(new_tokens), repeats),
  )
