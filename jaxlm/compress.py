"""Compresses a trained run into a new workdir: one-shot pruning and / or post-training weight quantization
(what `scripts/compress.py` runs).

The new workdir is a workdir like any other (config.json, tokenizer.model, checkpoints/<step>): a quantized one
holds the integer kernels and their scales (its config says `model.quantize`), so its checkpoint is smaller and
every mode builds the quantized model from it (`--mode=eval --step=latest`, `--mode=generate`). Pruning zeroes
weights (`jaxlm.compression.pruning`: magnitude, N:M, or whole attention heads by their gradient importance on
`head_batches` batches of the validation split; the per-layer sparsity goes to OUT/eval/sparsity.json); pruned, then
quantized, zeros stay exactly zero. OUT/compression.json records the source, the recipe, the checkpoint bytes on
disk of both and the parameters kept.

`compression_report(run, baseline)` (written by `compress` for the run it makes, and callable on any run, e.g. a
gradually pruned or quantization-aware fine-tune, against the original) writes RUN/compression_report.json and
.md: the parameters' bytes on disk saved alone (a training checkpoint also holds the optimizer state) and the
checkpoint's, the parameters kept (non-zero / total, per parameter and per layer of a stack), greedy decode
tokens/s of a decoder (`inference.timing.time_decode`, one device, a fixed batch), and the task's metrics with
bootstrap confidence intervals (`evaluation.report`) next to the baseline's on the same examples: for a
classifier accuracy, macro-F1, NLL, Brier, ECE and MCE on `data.test_split` with paired differences, for a
language model loss (perplexity = exp), token accuracy and token-level ECE on `data.eval_split`.
"""

import json
import math
import os
import shutil
import tempfile

import jax
import numpy as np

from jaxlm import sharding
from jaxlm.compression import pruning
from jaxlm.errors import ConfigError
from jaxlm.evaluation import report as report_lib
from jaxlm.experiment import Experiment
from jaxlm.inference import timing
from jaxlm.inference.decode import CachedDecoder
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
      scores = jax.device_get(scores_fn(params, steps.to_global(batch, experiment.mesh)))
      total = scores if total is None else jax.tree.map(np.add, total, scores)  # on the host: see steps.evaluate
  return total


def compress(
  workdir: str,
  out: str,
  step="latest",
  prune: str = "",
  scope: str = "layer",
  targets: str = r"kernel$",
  quantize_scheme: str = "",
  head_batches: int = 8,
  report: bool = True,
) -> dict:
  """Writes the compressed run of `workdir` to `out` (see the module docstring) and, with `report`, its
  compression report against `workdir`; returns compression.json."""
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
    record["params_kept"] = params_kept(params)["total"][0]
  config = source.config.copy_and_resolve_references()
  config.model.fake_quantize = ""
  if quantize_scheme:
    config.model.quantize = quantize_scheme
  record["source_checkpoint_bytes"] = directory_bytes(os.path.join(workdir, "checkpoints", str(ref.step)))
  # Written to OUT.incomplete and renamed into place once whole: a failure (a scheme the kernels do not fit, a
  # full disk) leaves no half-written OUT that would refuse the corrected rerun.
  staging = os.path.normpath(out) + ".incomplete"
  shutil.rmtree(staging, ignore_errors=True)  # what a failed earlier attempt left
  try:
    _write_compressed(staging, source, config, params, ref.step, quantize_scheme, record)
  except BaseException:
    shutil.rmtree(staging, ignore_errors=True)
    raise
  os.replace(staging, out)
  if report:
    compression_report(out, workdir, step=ref.step)
  return record


def _write_compressed(out: str, source, config, params, step: int, quantize_scheme: str, record: dict) -> None:
  """Writes the compressed workdir (tokenizer, config.json, the parameters at `step`, compression.json) to `out`,
  adding its sizes to `record`."""
  os.makedirs(out)
  shutil.copy(source.tokenizer.path, os.path.join(out, "tokenizer.model"))
  target = Experiment.from_config(config, out)
  if quantize_scheme:
    params = quantize.convert_params(params, target.abstract_params(), quantize_scheme)
  workdir_lib.write_config(out, config)
  checkpoint.save_params(out, params, step)
  record.update(
    total_params=params_lib.count(params),
    weight_bytes=quantize.kernel_bytes(params),
    checkpoint_bytes=directory_bytes(os.path.join(out, "checkpoints")),
  )
  os.makedirs(os.path.join(out, "eval"), exist_ok=True)
  if "sparsity" in record:
    with open(os.path.join(out, "eval", "sparsity.json"), "w") as f:
      json.dump(record["sparsity"], f, indent=2)
  with open(os.path.join(out, "compression.json"), "w") as f:
    json.dump(record, f, indent=2)


def params_kept(params) -> dict:
  """{name: [non-zero, total]} of every parameter (`name[i]` for layer i of a stacked one), and "total"."""
  kept, nonzero, size = {}, 0, 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name, leaf = params_lib.path_name(path), np.asarray(jax.device_get(leaf))
    if "layers" in name.split("/"):
      kept.update({f"{name}[{i}]": [int(np.count_nonzero(x)), int(x.size)] for i, x in enumerate(leaf)})
    else:
      kept[name] = [int(np.count_nonzero(leaf)), int(leaf.size)]
    nonzero, size = nonzero + int(np.count_nonzero(leaf)), size + leaf.size
  kept["total"] = [nonzero, size]
  return kept


def params_bytes(params) -> int:
  """Bytes on disk of `params` saved alone as a checkpoint (`checkpoint.save_params`): the size of a model, where a
  training checkpoint also holds the optimizer state."""
  with tempfile.TemporaryDirectory() as directory:
    checkpoint.save_params(directory, params)
    return directory_bytes(directory)


def _token_arrays(experiment: Experiment, params, split: str, num_batches: int) -> dict:
  """`report.token_arrays` of a language model on `split`, batch by batch (the logits [N, T, V] never all held)."""
  task, model = experiment.task, experiment.model
  predict = jax.jit(lambda p, batch: task.predictions(task.logits(model, p, batch, train=False), batch))
  arrays = []
  with sharding.mesh_context(experiment.mesh):
    for batch in experiment.eval_batches(split, num_batches):
      output = jax.device_get(predict(params, steps.to_global(batch, experiment.mesh)))
      arrays.append(report_lib.token_arrays(output["logits"], output["labels"], output["weights"]))
  return {key: np.concatenate([a[key] for a in arrays]) for key in arrays[0]}


def _decode_speed(experiment: Experiment, params, batch: int, prompt_len: int, new_tokens: int, repeats: int):
  params = jax.device_put(params, jax.devices()[0])  # one device, as scripts/benchmark.py --decode
  vocab = experiment.model_config.vocab_size
  return timing.time_decode(CachedDecoder(experiment.model), params, batch, prompt_len, new_tokens, repeats, vocab)


def compression_report(
  workdir: str,
  baseline: str,
  step="latest",
  baseline_step=None,
  decode_batch: int = 4,
  prompt_len: int = 32,
  new_tokens: int = 32,
  repeats: int = 3,
  num_resamples: int = 1000,
) -> dict:
  """Writes WORKDIR/compression_report.{json,md} (see the module docstring) against the run `baseline`."""
  runs = {}
  for system, path, at in (("original", baseline, baseline_step or step), ("compressed", workdir, step)):
    experiment = Experiment.from_workdir(path)
    ref = checkpoint.find_checkpoint(path, at, experiment.config.train.best_metric, experiment.config.train.best_mode)
    runs[system] = (experiment, experiment.load_params(ref.step), ref.step, path)
  experiment = runs["compressed"][0]
  config = experiment.config
  result = {"workdir": os.path.abspath(workdir), "baseline": os.path.abspath(baseline), "systems": {}}
  classifier = not experiment.task.generates_text
  split = config.data.test_split if classifier and config.data.test_split else config.data.eval_split
  outputs = {}
  for system, (member, params, at, path) in runs.items():
    entry = {
      "step": at,
      "checkpoint_bytes": directory_bytes(os.path.join(path, "checkpoints", str(at))),
      "params_bytes": params_bytes(params),
      "params_kept": params_kept(params),
    }
    if classifier:
      outputs[system] = member.predict(params, split)
    else:
      outputs[system] = _token_arrays(member, params, split, config.eval.num_batches)
      if member.model_config.family == "decoder":
        entry["decode"] = _decode_speed(member, params, decode_batch, prompt_len, new_tokens, repeats)
    result["systems"][system] = entry
  if classifier:
    probs = {system: predictions.probabilities() for system, predictions in outputs.items()}
    labels = outputs["original"].labels
    if not np.array_equal(labels, outputs["compressed"].labels):
      raise ConfigError(f"{workdir} and {baseline} read other examples of {split!r}: compare runs of one task.")
    metrics = {
      system: report_lib.classification_intervals(p, labels, num_resamples=num_resamples) for system, p in probs.items()
    }
    comparisons = {
      "compressed": report_lib.classification_comparisons(
        probs["compressed"], probs["original"], labels, num_resamples=num_resamples
      )
    }
  else:
    metrics = {
      system: report_lib.token_intervals(**arrays, num_resamples=num_resamples) for system, arrays in outputs.items()
    }
    for intervals in metrics.values():
      intervals["perplexity"] = {key: math.exp(intervals["loss"][key]) for key in ("value", "low", "high")}
    comparisons = None
  result.update(split=split, metrics=metrics, comparisons=comparisons)
  lines = [f"# Compression report: {workdir} against {baseline} ({split} split)", "", "| system | parameter bytes on "
           "disk | checkpoint bytes | parameters kept | decode tokens/s |", "|---|---|---|---|---|"]  # fmt: skip
  for system, entry in result["systems"].items():
    nonzero, total = entry["params_kept"]["total"]
    speed = entry.get("decode", {}).get("tokens_per_sec")
    speed = f"{speed:.1f} (batch {decode_batch})" if speed else "n/a"
    sizes = f"{entry['params_bytes']:,} | {entry['checkpoint_bytes']:,}"
    lines.append(f"| {system} | {sizes} | {nonzero:,} / {total:,} ({nonzero / total:.1%}) | {speed} |")
  lines += ["", report_lib.markdown_table(metrics, comparisons=comparisons)]
  for suffix, text in (("json", json.dumps(result, indent=2)), ("md", "\n".join(lines) + "\n")):
    with open(os.path.join(workdir, f"compression_report.{suffix}"), "w") as f:
      f.write(text)
  return result
