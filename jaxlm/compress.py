"""Compresses a trained run into a new workdir: one-shot pruning and / or post-training weight quantization
(what `scripts/compress.py` runs).

The new workdir is a workdir like any other (config.json, tokenizer.model, checkpoints/<step>): a quantized one
holds the integer kernels and their scales (its config says `model.quantize`), so its checkpoint is smaller and
every mode builds the quantized model from it (`--mode=eval --step=latest`, `--mode=generate`). Pruning zeroes
weights (`jaxlm.compression.pruning`: magnitude, N:M, or whole attention heads by their gradient importance on
`head_batches` batches of the validation split; the per-layer sparsity goes to OUT/eval/sparsity.json); pruned, then
quantized, zeros stay exactly zero. OUT/compression.json records the source, the recipe, the checkpoint bytes on
disk of both and the parameters kept.
"""

import json
import os
import shutil

import jax

from jaxlm import sharding
from jaxlm.compression import pruning
from jaxlm.errors import ConfigError
from jaxlm.experiment import Experiment
from jaxlm.models import params as params_lib
from jaxlm.models import quantize
from jaxlm.training import checkpoint, steps
from jaxlm.training import workdir as workdir_lib


def directory_bytes(path: str) -> int:
  """Bytes of every file under `path`."""
  return sum(os.path.getsize(os.path.join(root, name)) for root, _, names in os.walk(path) for name in names)


def head_importance(experiment: Experiment, params, num_batches: int = 8) -> dict:
  """{name: [L, N]} importance of every attention head (`pruning.head_scores`), summed over `num_batches` batches
  of the validation split (never the test split the compressed model is then evaluated on)."""
  task, model = experiment.task, experiment.model
  loss = lambda p, batch: task.loss_and_metrics(model, p, batch, train=False)[0]
  scores_fn = jax.jit(lambda p, batch: pruning.head_scores(p, jax.grad(loss)(p, batch)))
  total = None
  with sharding.mesh_context(experiment.mesh):
    for batch in experiment.eval_batches(None, num_batches):
      scores = scores_fn(params, steps.to_global(batch, experiment.mesh))
      total = scores if total is None else jax.tree.map(lambda a, b: a + b, total, scores)
  return jax.device_get(total)


def compress(
  workdir: str,
  out: str,
  step="latest",
  prune: str = "",
  scope: str = "layer",
  targets: str = r"kernel$",
  quantize_scheme: str = "",
  head_batches: int = 8,
) -> dict:
  """Writes the compressed run of `workdir` to `out` (see the module docstring); returns compression.json."""
  if os.path.exists(out):
    raise FileExistsError(f"--out={out} exists; choose a new directory.")
  source = Experiment.from_workdir(workdir)
  ref = checkpoint.find_checkpoint(workdir, step, source.config.train.best_metric, source.config.train.best_mode)
  params = source.load_params(ref.step)
  record = {"source": os.path.abspath(workdir), "step": ref.step, "prune": prune, "quantize": quantize_scheme}
  if prune:
    if prune.startswith("heads:"):
      scores = head_importance(source, params, head_batches)
      masks = pruning.head_masks(params, scores, float(prune.split(":")[1]), scope)
      record["heads_pruned"] = pruning.pruned_heads(masks)
    elif ":" in prune:
      masks = pruning.nm_masks(params, *pruning.parse_structure(prune), targets=targets)
    else:
      if not 0 < float(prune) < 1:
        raise ConfigError(f"--prune={prune}: a sparsity in (0, 1), an N:M structure like 2:4 or heads:FRACTION.")
      masks = pruning.magnitude_masks(params, float(prune), targets, scope)
    params = jax.jit(pruning.apply_masks)(params, masks)
    record["sparsity"] = pruning.sparsity(params, targets)
    record["params_kept"] = sum(int((jax.device_get(leaf) != 0).sum()) for leaf in jax.tree.leaves(params))
  config = source.config.copy_and_resolve_references()
  config.model.fake_quantize = ""
  if quantize_scheme:
    config.model.quantize = quantize_scheme
  os.makedirs(out)
  shutil.copy(source.tokenizer.path, os.path.join(out, "tokenizer.model"))
  target = Experiment.from_config(config, out)
  if quantize_scheme:
    params = quantize.convert_params(params, target.abstract_params(), quantize_scheme)
  workdir_lib.write_config(out, config)
  checkpoint.save_params(out, params, ref.step)
  record.update(
    total_params=params_lib.count(params),
    weight_bytes=quantize.kernel_bytes(params),
    checkpoint_bytes=directory_bytes(os.path.join(out, "checkpoints")),
    source_checkpoint_bytes=directory_bytes(os.path.join(workdir, "checkpoints", str(ref.step))),
  )
  os.makedirs(os.path.join(out, "eval"), exist_ok=True)
  if prune:
    with open(os.path.join(out, "eval", "sparsity.json"), "w") as f:
      json.dump(record["sparsity"], f, indent=2)
  with open(os.path.join(out, "compression.json"), "w") as f:
    json.dump(record, f, indent=2)
  return record
