"""Pruning masks (jaxlm.compression.pruning) against NumPy, and gradual pruning through real train steps."""

import jax
import numpy as np
import pytest

from conftest import lm_batch, make_trainer, tiny_model_config, train_config
from jaxlm import sharding
from jaxlm.compression import pruning
from jaxlm.models import params as params_lib
from jaxlm.models.transformer import Decoder
from jaxlm.training import steps as steps_lib


@pytest.fixture(scope="module")
def params():
  return jax.device_get(params_lib.init_params(Decoder(tiny_model_config()), jax.random.key(0)))


def _keep_largest_numpy(values: np.ndarray, sparsity: float) -> np.ndarray:
  """Reference: zero the round(sparsity * n) smallest |w| (distinct values, so no ties)."""
  flat = np.abs(values).reshape(-1)
  pruned = int(round(sparsity * flat.size))
  mask = np.ones(flat.size, bool)
  mask[np.argsort(flat)[:pruned]] = False
  return mask.reshape(values.shape)


def test_magnitude_masks_keep_the_largest_weights_per_layer(params):
  masks = params_lib.flatten(pruning.magnitude_masks(params, 0.5))
  flat = params_lib.flatten(params)
  assert set(masks) == {name for name in flat if name.endswith("kernel")}  # norms and embeddings untouched
  for name, mask in masks.items():
    for layer in range(flat[name].shape[0]):  # the stack's layers, each pruned by itself
      np.testing.assert_array_equal(np.asarray(mask[layer]), _keep_largest_numpy(flat[name][layer], 0.5))


def test_global_magnitude_masks_rank_all_kernels_together(params):
  masks = params_lib.flatten(pruning.magnitude_masks(params, 0.7, scope="global"))
  flat = params_lib.flatten(params)
  names = sorted(masks)
  expected = _keep_largest_numpy(np.concatenate([flat[n].reshape(-1) for n in names]), 0.7)
  np.testing.assert_array_equal(np.concatenate([np.asarray(masks[n]).reshape(-1) for n in names]), expected)
  pruned = pruning.apply_masks(params, pruning.magnitude_masks(params, 0.7, scope="global"))
  assert pruning.sparsity(pruned)["total"] == pytest.approx(0.7, abs=1e-4)
  np.testing.assert_array_equal(pruned["token_embed"]["embedding"], params["token_embed"]["embedding"])


def test_two_four_masks_keep_exactly_two_of_every_four(params):
  masks = params_lib.flatten(pruning.nm_masks(params, 2, 4))
  flat = params_lib.flatten(params)
  for name, mask in masks.items():
    groups = np.moveaxis(np.asarray(mask), 1, -1).reshape(-1, 4)  # groups along the axis after the layer axis
    np.testing.assert_array_equal(groups.sum(axis=1), 2)
    weights = np.abs(np.moveaxis(flat[name], 1, -1).reshape(-1, 4))
    kept_min = np.where(groups, weights, np.inf).min(axis=1)
    pruned_max = np.where(groups, -np.inf, weights).max(axis=1)
    assert (kept_min >= pruned_max).all()  # the two largest of each group


def test_gradual_pruning_keeps_pruned_weights_exactly_zero_through_training():
  prune = dict(sparsity=0.5, start_step=0, end_step=4, every=2, scope="layer", structure="", targets=r"kernel$")
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2)
  train.prune.update(prune)
  state, train_step, mesh = make_trainer(Decoder(tiny_model_config()), train=train)
  batch = lm_batch()
  reached = []
  with sharding.mesh_context(mesh):
    for step in range(8):
      state, _ = train_step(state, steps_lib.to_global(batch, mesh))
      reached.append(pruning.sparsity(state.params)["total"])
      if step == 4:
        frozen_zeros = {n: np.asarray(v) == 0 for n, v in params_lib.flatten(state.params).items() if "kernel" in n}
  # The cubic schedule, masks updated at steps 0, 2, 4: 0, 0.5 (1 - 0.5^3), then the target, kept.
  assert reached[0] == reached[1] == 0
  assert reached[2] == reached[3] == pytest.approx(0.5 * (1 - 0.5**3), abs=1e-3)
  assert reached[4] == pytest.approx(0.5, abs=1e-3)
  assert reached[7] == pytest.approx(0.5, abs=1e-3)
  for name, value in params_lib.flatten(state.params).items():  # masks frozen after end_step: same zeros
    if "kernel" in name:
      np.testing.assert_array_equal(np.asarray(value) == 0, frozen_zeros[name])
    else:
      assert (np.asarray(value) != 0).any()


def test_gradual_two_four_pruning_from_the_first_step():
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2)
  train.prune.update(structure="2:4", start_step=0, end_step=0)
  state, train_step, mesh = make_trainer(Decoder(tiny_model_config()), train=train)
  with sharding.mesh_context(mesh):
    for _ in range(3):
      state, _ = train_step(state, steps_lib.to_global(lm_batch(), mesh))
  for name, value in params_lib.flatten(jax.device_get(state.params)).items():
    if name.endswith("kernel"):
      groups = np.moveaxis(value, 1, -1).reshape(-1, 4)
      np.testing.assert_array_equal((groups != 0).sum(axis=1), 2)
