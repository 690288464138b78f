"""Attention-head pruning (`pruning.head_scores`/`head_masks`, `compress --prune=heads:F`) on the tiny run: the
score is |dL/dgate| of each head, the lowest-scoring heads are the ones pruned, and a pruned head adds exactly
nothing to the model's output."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlm import Experiment, compress, sharding
from jaxlm.compression import pruning
from jaxlm.training import steps

OUT = "layers/attention/out/kernel"


@pytest.fixture(scope="module")
def run(tiny_workdir):
  experiment = Experiment.from_workdir(tiny_workdir)
  params = experiment.load_params()
  batch = steps.to_global(experiment.eval_batches(None, 1)[0], experiment.mesh)
  return experiment, params, batch


def _loss(experiment, params, batch):
  return experiment.task.loss_and_metrics(experiment.model, params, batch, train=False)[0]


def test_head_score_is_the_gradient_of_a_gate_on_the_head(run):
  experiment, params, batch = run
  kernel = params["layers"]["attention"]["out"]["kernel"]  # [L, N, H, D]

  def gated_loss(gates):  # gate [L, N] scaling each head's output, i.e. its rows of the output projection
    gated = jax.tree.map(lambda x: x, params)
    gated["layers"]["attention"]["out"]["kernel"] = kernel * gates[:, :, None, None]
    return _loss(experiment, gated, batch)

  with sharding.mesh_context(experiment.mesh):
    gate_grad = jax.jit(jax.grad(gated_loss))(jnp.ones(kernel.shape[:2]))
    grads = jax.jit(jax.grad(lambda p: _loss(experiment, p, batch)))(params)
  scores = pruning.head_scores(params, grads)
  np.testing.assert_allclose(scores[OUT], np.abs(gate_grad), rtol=1e-4, atol=1e-6)


def test_the_lowest_scoring_heads_are_pruned_and_add_exactly_nothing(run):
  experiment, params, batch = run
  scores = compress.head_importance(experiment, params, num_batches=2)
  masks = pruning.head_masks(params, scores, 0.25, scope="layer")  # 1 of 4 heads in each of 2 layers
  heads = pruning.pruned_heads(masks)[OUT]
  assert heads == [[layer, int(np.argmin(scores[OUT][layer]))] for layer in range(2)]
  global_heads = pruning.pruned_heads(pruning.head_masks(params, scores, 0.25, scope="global"))[OUT]
  assert sorted(global_heads) == sorted(np.argwhere(scores[OUT] <= np.sort(scores[OUT].ravel())[1]).tolist())

  pruned = pruning.apply_masks(params, masks)
  # By hand: the same heads silenced through their values (softmax(QK) V_h = 0), the output projection untouched.
  value = np.array(params["layers"]["attention"]["value"]["kernel"])  # [L, D, K, H]; here K = N
  for layer, head in heads:
    value[layer, :, head, :] = 0
  silenced = jax.tree.map(lambda x: x, params)
  silenced["layers"]["attention"]["value"]["kernel"] = jax.device_put(
    value, params["layers"]["attention"]["value"]["kernel"].sharding
  )
  logits = lambda p: experiment.task.logits(experiment.model, p, batch, train=False)
  with sharding.mesh_context(experiment.mesh):
    np.testing.assert_allclose(jax.jit(logits)(pruned), jax.jit(logits)(silenced), rtol=1e-5, atol=1e-5)
    assert not np.allclose(jax.jit(logits)(pruned), jax.jit(logits)(params), atol=1e-3)


def test_compress_prunes_heads_one_shot(tiny_workdir, tmp_path):
  record = compress.compress(tiny_workdir, str(tmp_path / "heads"), prune="heads:0.5", head_batches=2, report=False)
  assert len(record["heads_pruned"][OUT]) == 4  # 2 of 4 heads in each of 2 layers
  kernel = np.asarray(
    Experiment.from_workdir(str(tmp_path / "heads")).load_params()["layers"]["attention"]["out"]["kernel"]
  )
  for layer, head in record["heads_pruned"][OUT]:
    assert (kernel[layer, head] == 0).all()
  assert (np.abs(kernel).sum(axis=(2, 3)) > 0).sum() == 4
  assert json.load(open(os.path.join(tmp_path / "heads", "compression.json")))["prune"] == "heads:0.5"
