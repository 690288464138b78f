"""LoRA: adapters start at zero, only they train under `trainable = "lora"`, and merging keeps the logits."""

import dataclasses

import jax
import numpy as np

from conftest import lm_batch, make_trainer, tiny_model_config, train_config
from jaxlm import sharding
from jaxlm.models import Decoder, lora
from jaxlm.models import params as params_lib

CONFIG = tiny_model_config(lora_rank=4, lora_alpha=8.0, lora_targets="attention/(query|value|out)|mlp/down")


def _init(config):
  return params_lib.init_params(Decoder(config), jax.random.key(0))


def test_adapters_sit_on_the_targets_only_and_start_as_the_base_model():
  params = _init(CONFIG)
  attention, mlp = params["layers"]["attention"], params["layers"]["mlp"]
  assert {name for name in attention if "lora_a" in attention[name]} == {"query", "value", "out"}
  assert {name for name in mlp if "lora_a" in mlp[name]} == {"down"}
  assert attention["query"]["lora_a"].shape == (2, 32, 4) and attention["query"]["lora_b"].shape == (2, 4, 4, 8)
  assert attention["out"]["lora_a"].shape == (2, 4, 8, 4) and attention["out"]["lora_b"].shape == (2, 4, 32)
  base_model = Decoder(dataclasses.replace(CONFIG, lora_rank=0))
  tokens = lm_batch()["tokens"]
  np.testing.assert_allclose(
    Decoder(CONFIG).apply({"params": params}, tokens),
    base_model.apply({"params": lora.merge_lora(params, CONFIG.lora_alpha)}, tokens),
    rtol=1e-6,
    atol=1e-6,
  )  # B = 0 at init: the merge adds nothing


def test_merged_weights_give_the_same_logits_as_base_plus_adapters():
  params = _init(CONFIG)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(0)
  # Non-zero adapters, as after training.
  params = jax.tree_util.tree_unflatten(
    treedef,
    [
      rng.normal(0, 0.3, x.shape).astype(np.float32) if params_lib.path_name(p).endswith("lora_b") else x
      for p, x in leaves
    ],
  )
  merged = lora.merge_lora(params, CONFIG.lora_alpha)
  assert not any("lora" in params_lib.path_name(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
  batch = lm_batch(3)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  with_adapters = np.asarray(Decoder(CONFIG).apply({"params": params}, *args))
  base = Decoder(dataclasses.replace(CONFIG, lora_rank=0))
  np.testing.assert_allclose(base.apply({"params": merged}, *args), with_adapters, rtol=1e-4, atol=1e-5)
  unmerged = lora.merge_lora(jax.tree.map(np.zeros_like, params), CONFIG.lora_alpha)
  assert np.abs(with_adapters - np.asarray(base.apply({"params": unmerged}, *args))).max() > 0  # adapters matter


def test_only_adapters_change_during_training():
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2, trainable="lora")
  state, train_step, mesh = make_trainer(Decoder(CONFIG), train=train)
  before = jax.device_get(state.params)
  with sharding.mesh_context(mesh):
    for seed in range(3):
      state, _ = train_step(state, lm_batch(seed))
  after = jax.device_get(state.params)
  changed = {
    params_lib.path_name(p)
    for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0], jax.tree.leaves(after))
    if not np.array_equal(a, b)
  }
  adapters = {
    params_lib.path_name(p)
    for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]
    if params_lib.path_name(p).rsplit("/", 1)[-1] in lora.ADAPTER_NAMES
  }
  assert changed == adapters  # every adapter moved, nothing else did (bit for bit)
