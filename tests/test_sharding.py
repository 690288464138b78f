"""Parallelism from config alone: data, FSDP, tensor and mixed meshes train exactly like one device."""

import functools

import jax
import numpy as np
import pytest

from conftest import make_trainer
from jaxlm import sharding
from jaxlm.errors import ConfigError
from jaxlm.models import Decoder, ModelConfig

# Every sharded dimension (heads, kv heads, MLP, vocabulary, width) divides by 8.
MODEL = ModelConfig(vocab_size=128, embed_dim=64, num_layers=2, num_heads=8, num_kv_heads=8, mlp_dim=128, max_len=16)
SEQ_LEN, BATCH, STEPS = 16, 8, 3


def _batches():
  rng = np.random.default_rng(0)
  for _ in range(STEPS):
    tokens = rng.integers(4, MODEL.vocab_size, size=(BATCH, SEQ_LEN)).astype(np.int32)
    segment_ids = np.repeat([[1] * 9 + [2] * 7], BATCH, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(9), np.arange(7)])[None].repeat(BATCH, 0).astype(np.int32)
    yield {"tokens": tokens, "segment_ids": segment_ids, "positions": positions}


@functools.lru_cache(maxsize=None)
def _train(data: int, fsdp: int, tensor: int, num_devices: int = 8):
  """Losses of STEPS train steps on a data x fsdp x tensor mesh, and the final state (cached per mesh)."""
  state, train_step, mesh = make_trainer(
    Decoder(MODEL), mesh=dict(data=data, fsdp=fsdp, tensor=tensor), devices=jax.devices()[:num_devices]
  )
  losses = []
  with sharding.mesh_context(mesh):
    for batch in _batches():
      batch = {k: jax.device_put(v, sharding.batch_sharding(mesh)) for k, v in batch.items()}
      state, metrics = train_step(state, batch)
      losses.append(float(metrics["loss_sum"] / metrics["weight"]))
  return np.array(losses), state


@pytest.mark.parametrize(
  "mesh", [(8, 1, 1), (1, 8, 1), (1, 1, 8), (2, 2, 2)], ids=["data8", "fsdp8", "tensor8", "mixed2x2x2"]
)
def test_sharded_training_matches_one_device(mesh):
  reference_losses, reference_state = _train(1, 1, 1, num_devices=1)
  losses, state = _train(*mesh)
  np.testing.assert_allclose(losses, reference_losses, rtol=2e-5)
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference_state.params)):
    # Adam divides by sqrt(v): where a gradient is near zero, float noise of the reduction order moves a
    # parameter by up to ~lr; 2% of lr (1e-2) bounds it while a real sharding bug moves whole tensors.
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-3, atol=2e-4)


def _bytes_on_device(tree, device) -> int:
  return sum(
    shard.data.nbytes for leaf in jax.tree.leaves(tree) for shard in leaf.addressable_shards if shard.device == device
  )


def test_fsdp_holds_an_eighth_of_the_parameters_per_device():
  _, state = _train(1, 8, 1)
  total = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
  for device in jax.devices():
    assert _bytes_on_device(state.params, device) == total // 8
    assert _bytes_on_device(state.opt_state, device) <= 2 * total // 8 + 1024  # Adam moments (+ scalars)


def test_tensor_parallel_splits_heads_and_mlp():
  _, state = _train(2, 1, 4)
  layers = state.params["layers"]
  query = layers["attention"]["query"]["kernel"]  # [L, D, N, H]
  assert query.sharding.shard_shape(query.shape) == (2, 64, 2, 8)
  down = layers["mlp"]["down"]["kernel"]  # [L, F, D]
  assert down.sharding.shard_shape(down.shape) == (2, 32, 64)


def test_mesh_that_does_not_divide_the_model_is_a_clear_error():
  mesh = sharding.create_mesh(dict(data=1, fsdp=1, tensor=8))
  with pytest.raises(ConfigError, match="model.num_heads"):
    sharding.check_model_fits_mesh(ModelConfig(vocab_size=128, embed_dim=48, num_heads=4, mlp_dim=128), mesh.shape)
  with pytest.raises(ConfigError, match="model.mlp_dim"):
    sharding.check_model_fits_mesh(ModelConfig(vocab_size=128, embed_dim=64, num_heads=8, mlp_dim=100), mesh.shape)
