"""Starting from an earlier run: restore a backbone's parameters (and find its tokenizer) for fine-tuning.

`init_from` is a run's WORKDIR (its latest checkpoint is used) or one checkpoint
directory `WORKDIR/checkpoints/<step>`. Only parameters are read (never the
optimizer state), straight into the target shardings, and only those the
target model has. Parameter paths are matched as they are, or with the target's
`backbone/` prefix (a language model's parameters are a classifier's backbone).
Target parameters that the checkpoint lacks are initialised only when the task
declares them new (a classification head) or they are LoRA adapters; every other
difference (a missing or unused parameter, a shape mismatch) is an error that
lists all offending parameters.
"""

import json
import os
import re

import jax
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from jaxlm.data import pipeline
from jaxlm.models import lora
from jaxlm.training.optim import param_path

BACKBONE_PREFIX = "backbone/"


class InitFromError(ValueError):
  """The pretrained checkpoint does not fit the model being fine-tuned."""


def resolve(path: str) -> tuple[str, dict]:
  """(directory of the checkpoint's `state` item, the run's config.json as a dict) for `init_from`."""
  path = os.path.abspath(os.path.expanduser(path))
  if os.path.isdir(os.path.join(path, "checkpoints")):
    steps = [int(d) for d in os.listdir(os.path.join(path, "checkpoints")) if d.isdigit()]
    if not steps:
      raise FileNotFoundError(f"init_from: {path} has no finished checkpoint in checkpoints/; train it first.")
    workdir, step_dir = path, os.path.join(path, "checkpoints", str(max(steps)))
  else:
    workdir, step_dir = os.path.dirname(os.path.dirname(path)), path
  state_dir = os.path.join(step_dir, "state")
  config_path = os.path.join(workdir, "config.json")
  if not os.path.isdir(state_dir) or not os.path.exists(config_path):
    raise FileNotFoundError(f"init_from: {path!r} is neither a jaxlm WORKDIR (config.json + checkpoints/) nor a "
                            "checkpoint directory WORKDIR/checkpoints/<step>.")
  with open(config_path) as f:
    return state_dir, json.load(f)


def tokenizer_path(run_config: dict) -> str:
  """The SentencePiece model the run trained with: its `data.tokenizer`, or the one it trained and cached."""
  data = run_config["data"]
  path = data["tokenizer"] or pipeline.cached_tokenizer_path(ml_collections.ConfigDict(data))
  if not os.path.exists(path):
    raise FileNotFoundError(f"init_from: the pretrained run's tokenizer {path} is gone; set data.tokenizer to a "
                            "copy of it (the model's embeddings only fit the tokenizer it was trained with).")
  return path


def _flat(tree) -> dict:
  return {param_path(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def restore_params(state_dir: str, target_params, new_params: str | None = None, allow_adapters: bool = True):
  """`target_params` (a tree of arrays) with every parameter found in the checkpoint replaced by its value there.

  Returns (params, names of the parameters kept from `target_params`, i.e. newly initialised).
  Raises InitFromError listing every mismatch (see the module docstring).
  """
  source = _flat(ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata["params"])
  target = _flat(target_params)
  prefix = max(("", BACKBONE_PREFIX), key=lambda p: sum(p + name in target for name in source))
  problems, to_restore = [], {}
  for name, meta in sorted(source.items()):
    leaf = target.get(prefix + name)
    if leaf is None:
      problems.append(f"  {name} {tuple(meta.shape)}: in the checkpoint, not in the model")
    elif tuple(leaf.shape) != tuple(meta.shape):
      problems.append(f"  {prefix + name}: shape {tuple(meta.shape)} in the checkpoint, {tuple(leaf.shape)} in the "
                      "model")
    else:
      to_restore[name] = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  new = sorted(set(target) - {prefix + name for name in source})
  for name in new:
    allowed = (new_params and re.search(new_params, name)) or (allow_adapters and
                                                               name.rsplit("/", 1)[-1] in lora.ADAPTER_NAMES)
    if not allowed:
      problems.append(f"  {name} {tuple(target[name].shape)}: in the model, not in the checkpoint")
  if problems:
    raise InitFromError(
        f"init_from: the checkpoint {state_dir} does not fit the model ({len(problems)} parameters):\n"
        + "\n".join(problems) + "\nUse the same model.* settings as the pretrained run (its config.json).")

  def nest(flat: dict) -> dict:
    tree = {}
    for name, value in flat.items():
      *parents, leaf = name.split("/")
      node = tree
      for key in parents:
        node = node.setdefault(key, {})
      node[leaf] = value
    return tree

  abstract = {"params": nest(to_restore)}
  restored = ocp.PyTreeCheckpointer().restore(state_dir, args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True))
  values = _flat(restored["params"])
  merged = jax.tree_util.tree_map_with_path(
      lambda path, leaf: values.get(param_path(path)[len(prefix):] if param_path(path).startswith(prefix) else None,
                                    leaf), target_params)
  logging.info("init_from %s: restored %d parameters; initialised %d new: %s", state_dir, len(values), len(new),
               new)
  return merged, new
