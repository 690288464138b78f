"""Flash attention over packed rows: documents kept apart by segment ids, without a dense [B, T, T] mask.

`model.attention = "pallas"` runs JAX's Pallas attention kernel (`jax.experimental.pallas.ops.gpu.attention.mha`,
Triton on NVIDIA GPUs): blocks of queries stream over blocks of keys with an online softmax, the mask of a
block is computed in the kernel from the segment ids of its rows and columns (same segment and, causal, not
later), and the backward pass is a kernel too. Nothing of size T x T is stored, so packed rows keep flash
attention (the cuDNN path of `jax.nn.dot_product_attention` turns a segment mask into a dense bias).

On CPU the same kernel runs in Pallas interpret mode (slow; for tests, which compare it with the XLA
reference). Under a mesh the kernel runs per shard (`jax.shard_map`): rows split over the batch axes, heads
over the tensor axis, whole sequences on each device (a custom kernel is not partitioned by XLA itself).

Shape legend: B batch, T length, N query heads, K key/value heads, H head dim.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from jaxlm.errors import ConfigError
from jaxlm.sharding import BATCH, HEADS

MAX_BLOCK = 128  # the kernel's default forward tile (queries and keys)
MIN_BLOCK = 16  # the smallest tile Triton's matmuls take


def block_size(length: int) -> int:
  """The largest power of two <= MAX_BLOCK dividing `length` (the kernel needs whole tiles)."""
  block = MAX_BLOCK
  while length % block:
    block //= 2
  if block < MIN_BLOCK:
    raise ConfigError(
      f"model.attention: the Pallas flash kernel needs a sequence length divisible by {MIN_BLOCK}, "
      f"got {length}; change data.seq_len or use model.attention='xla'."
    )
  return block


def _attention(query, key, value, segment_ids, causal: bool):
  """The kernel on one shard: query [B, T, N, H], key/value [B, T, K, H], segment_ids [B, T] -> [B, T, N, H]."""
  if jax.default_backend() == "tpu":
    raise ConfigError("model.attention: 'pallas' is the Triton GPU kernel; use 'xla' on TPU.")
  groups = query.shape[2] // key.shape[2]  # grouped-query attention: each key/value head serves `groups` heads
  key, value = (jnp.repeat(x, groups, axis=2) for x in (key, value))
  length = query.shape[1]
  block = block_size(length)
  backward_block = min(block, 32)  # the kernel's default backward tiles
  sizes = pallas_attention.BlockSizes(
    block_q=block,
    block_k=block,
    block_q_dkv=backward_block,
    block_kv_dkv=backward_block,
    block_q_dq=backward_block,
    block_kv_dq=backward_block,
  )
  return pallas_attention.mha(
    query,
    key,
    value,
    segment_ids,
    sm_scale=query.shape[-1] ** -0.5,
    causal=causal,
    block_sizes=sizes,
    interpret=jax.default_backend() == "cpu",
  )


def segment_attention(query, key, value, segment_ids, causal: bool = True):
  """Softmax attention of query [B, T, N, H] over key, value [B, T, K, H] within the segments of segment_ids
  [B, T] (and, causal, to the same or earlier positions): equal to `jax.nn.dot_product_attention` with the mask
  `layers.attention_mask(segment_ids, segment_ids, causal)`. Runs per shard of the current mesh, if any."""
  attention = functools.partial(_attention, causal=causal)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attention(query, key, value, segment_ids)
  batch, heads = nn.logical_to_mesh_axes((BATCH, HEADS))
  heads_spec = jax.P(batch, None, heads, None)
  return jax.shard_map(
    attention,
    mesh=mesh,
    in_specs=(heads_spec, heads_spec, heads_spec, jax.P(batch, None)),
    out_specs=heads_spec,
    check_vma=False,
  )(query, key, value, segment_ids)
