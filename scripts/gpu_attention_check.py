"""Attention on packed rows on a GPU: the Pallas flash kernel (`model.attention="pallas"`) against XLA and cuDNN.

  python scripts/gpu_attention_check.py            # one JSON line per shape x dtype x implementation

For each shape (GPT-2 124M-like heads at T = 1024, Llama 1B-like grouped-query heads at T = 2048; rows packed
with several documents and padding) and dtype, every implementation's output and input gradients (of a fixed
random cotangent) are compared with a float32 reference at the highest matmul precision: relative error
||out - ref|| / ||ref||. Forward and forward+backward times are medians of 20 calls after a warm-up.
Implementations: `pallas` (segment ids, no T x T mask), `xla` and `cudnn` (`jax.nn.dot_product_attention`
with the dense [B, 1, T, T] segment mask, which is what `model.attention` xla / cudnn run on packed rows).
The tests check the kernel on CPU (interpret mode); this is the check where the kernel really runs.
"""

import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxlm.models import flash_attention, layers  # noqa: E402

SHAPES = {  # name: (batch, length, query heads, key/value heads, head dim)
  "gpt2_124m": (8, 1024, 12, 12, 64),
  "llama_1b": (2, 2048, 32, 8, 64),
}


def packed_segment_ids(batch: int, length: int, seed: int) -> np.ndarray:
  """Rows of 2-6 documents of random lengths, the last 5% of every other row padding (id 0)."""
  rng = np.random.default_rng(seed)
  ids = np.zeros((batch, length), np.int32)
  for row in range(batch):
    cuts = np.sort(rng.choice(np.arange(1, length), rng.integers(1, 6), replace=False))
    ids[row] = np.searchsorted(cuts, np.arange(length), side="right") + 1
    if row % 2:
      ids[row, length - length // 20 :] = 0
  return ids


def median_ms(fn, *args) -> float:
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(20):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) * 1e3)
  return statistics.median(times)


def relative_error(actual, expected) -> float:
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  return float(np.linalg.norm(actual - expected) / np.linalg.norm(expected))


def check(name: str, dtype) -> list[dict]:
  batch, length, heads, kv_heads, head_dim = SHAPES[name]
  keys = jax.random.split(jax.random.key(0), 4)
  query = jax.random.normal(keys[0], (batch, length, heads, head_dim))
  key, value = (jax.random.normal(k, (batch, length, kv_heads, head_dim)) for k in keys[1:3])
  probe = jax.random.normal(keys[3], (batch, length, heads, head_dim))
  segment_ids = jnp.asarray(packed_segment_ids(batch, length, seed=1))
  mask = layers.attention_mask(segment_ids, segment_ids, causal=True)

  def dense(implementation):
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, implementation=implementation)

  implementations = {
    "pallas": lambda q, k, v: flash_attention.segment_attention(q, k, v, segment_ids, causal=True),
    "xla": dense("xla"),
    "cudnn": dense("cudnn"),
  }

  def value_and_grads(fn):
    def loss(q, k, v):
      return jnp.sum(fn(q, k, v).astype(jnp.float32) * probe)

    return lambda q, k, v: (fn(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v))

  with jax.default_matmul_precision("highest"):
    ref_out, ref_grads = jax.jit(value_and_grads(dense("xla")))(query, key, value)
  inputs = tuple(x.astype(dtype) for x in (query, key, value))
  rows = []
  for implementation, fn in implementations.items():
    row = dict(shape=name, dtype=jnp.dtype(dtype).name, implementation=implementation)
    try:
      out, grads = jax.jit(value_and_grads(fn))(*inputs)
      row["out_rel_error"] = relative_error(out, ref_out)
      row.update({f"d{n}_rel_error": relative_error(g, r) for n, g, r in zip("qkv", grads, ref_grads)})
      row["forward_ms"] = median_ms(jax.jit(fn), *inputs)
      row["forward_backward_ms"] = median_ms(jax.jit(value_and_grads(fn)), *inputs)
    except Exception as error:  # noqa: BLE001  (an implementation this jax/GPU lacks is reported, not fatal)
      row["error"] = f"{type(error).__name__}: {str(error)[:300]}"
    print(json.dumps(row), flush=True)
    rows.append(row)
  return rows


def main():
  print(json.dumps(dict(jax=jax.__version__, device=jax.devices()[0].device_kind)), flush=True)
  for name in SHAPES:
    for dtype in (jnp.bfloat16, jnp.float32):
      check(name, dtype)


if __name__ == "__main__":
  main()
