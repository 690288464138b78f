"""LoRA: adapters start at zero, only they train under `trainable = "lora"`, and merging keeps the logits."""

import dataclasses

import flax.linen as nn
import jax
import numpy as np

from jaxlm import sharding
from jaxlm.models import lora
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Decoder
from jaxlm.tasks import causal_lm
from jaxlm.training import optim, steps
from jaxlm.training import state as state_lib
from test_train import _batch, train_config

CONFIG = ModelConfig(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=16,
                     lora_rank=4, lora_alpha=8.0, lora_targets="attention/(query|value|out)|mlp/down")


def _init(config):
  params = Decoder(config).init(jax.random.key(0), np.zeros((1, 16), np.int32))["params"]
  return nn.meta.unbox(params)


def test_adapters_sit_on_the_targets_only_and_start_as_the_base_model():
  params = _init(CONFIG)
  attention, mlp = params["layers"]["attention"], params["layers"]["mlp"]
  assert {name for name in attention if "lora_a" in attention[name]} == {"query", "value", "out"}
  assert {name for name in mlp if "lora_a" in mlp[name]} == {"down"}
  assert attention["query"]["lora_a"].shape == (2, 32, 4) and attention["query"]["lora_b"].shape == (2, 4, 4, 8)
  assert attention["out"]["lora_a"].shape == (2, 4, 8, 4) and attention["out"]["lora_b"].shape == (2, 4, 32)
  base_model = Decoder(dataclasses.replace(CONFIG, lora_rank=0))
  tokens = _batch()["tokens"]
  np.testing.assert_allclose(Decoder(CONFIG).apply({"params": params}, tokens),
                             base_model.apply({"params": lora.merge_lora(params, CONFIG.lora_alpha)}, tokens),
                             rtol=1e-6, atol=1e-6)  # B = 0 at init: the merge adds nothing


def test_merged_weights_give_the_same_logits_as_base_plus_adapters():
  params = _init(CONFIG)
  leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  rng = np.random.default_rng(0)
  # Non-zero adapters, as after training.
  params = jax.tree_util.tree_unflatten(treedef, [
      rng.normal(0, 0.3, x.shape).astype(np.float32) if optim.param_path(p).endswith("lora_b") else x
      for p, x in leaves])
  merged = lora.merge_lora(params, CONFIG.lora_alpha)
  assert not any("lora" in optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(merged)[0])
  batch = _batch(3)
  args = (batch["tokens"], batch["positions"], batch["segment_ids"])
  with_adapters = np.asarray(Decoder(CONFIG).apply({"params": params}, *args))
  base = Decoder(dataclasses.replace(CONFIG, lora_rank=0))
  np.testing.assert_allclose(base.apply({"params": merged}, *args), with_adapters, rtol=1e-4, atol=1e-5)
  unmerged = lora.merge_lora(jax.tree.map(np.zeros_like, params), CONFIG.lora_alpha)
  assert np.abs(with_adapters - np.asarray(base.apply({"params": unmerged}, *args))).max() > 0  # adapters matter


def test_only_adapters_change_during_training():
  model = Decoder(CONFIG)
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2, trainable="lora")
  optimizer, schedule = optim.create_optimizer(train, lambda p: optim.trainable_mask(p, "lora"))
  mesh = sharding.create_mesh(dict(data=-1, fsdp=1, tensor=1))
  _, shardings = state_lib.state_shardings(model, optimizer, 16, mesh)
  state = state_lib.create_train_state(model, optimizer, 16, mesh, shardings, jax.random.key(0))
  before = jax.device_get(state.params)
  train_step, _ = steps.jit_steps(model=model, task=causal_lm, optimizer=optimizer, schedule=schedule,
                                  dropout_rng=jax.random.key(1), grad_accum_steps=1, state_sharding=shardings,
                                  mesh=mesh)
  with sharding.mesh_context(mesh):
    for seed in range(3):
      state, _ = train_step(state, _batch(seed))
  after = jax.device_get(state.params)
  changed = {optim.param_path(p) for (p, a), b in zip(jax.tree_util.tree_flatten_with_path(before)[0],
                                                      jax.tree.leaves(after)) if not np.array_equal(a, b)}
  adapters = {optim.param_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]
              if optim.param_path(p).rsplit("/", 1)[-1] in lora.ADAPTER_NAMES}
  assert changed == adapters  # every adapter moved, nothing else did (bit for bit)
