"""Weight pruning as masks over a parameter tree: magnitude (per layer or global) and N:M structured sparsity.

One-shot: `masks = magnitude_masks(params, 0.5)` (or `nm_masks(params, 2, 4)`), then `apply_masks(params, masks)`.
Gradual, while fine-tuning (`train.prune.*`): `gradual(...)` is an optax transformation chained last in the
optimizer (`optim.optimizer_for`). It keeps the masks in the optimizer state (checkpointed and resumed with it),
recomputes them on the schedule of Zhu & Gupta 2017 (sparsity s_t = s (1 - (1 - (t - t0) / (t1 - t0))^3) between
`start_step` t0 and `end_step` t1, every `every` steps; an N:M mask from t0 on), and rewrites every update so that
the new parameters are masked: a pruned weight is exactly zero after every step, whatever its gradient, and the
train loop knows nothing of it.

Which parameters: those whose path (`params.path_name`) matches `targets`, by default every `kernel` (attention,
MLP, heads), never norms, biases or embeddings. Stacked layers (a `layers` path of the scanned stack, leading
axis L) are pruned per layer along that axis when `scope="layer"`; `scope="global"` ranks all targets together.
N:M groups are M consecutive weights along the first axis after the layer axis (the input axis of every kernel
but the attention output projection, where it is the heads axis); each group keeps its N largest.

Attention heads (`head_masks`): a pruned head's rows of the attention output projection (kernel [L, N, H, D]) are
zero, so its output adds exactly nothing; the masks are the same bool trees, so heads go through `apply_masks`
like any pruning. The heads pruned are those of lowest importance (Michel et al. 2019): |dL/dxi_h| of a gate xi_h
on head h's output, averaged over batches. Gating head h scales its rows of the output projection, so at xi = 1
dL/dxi_h = sum(W_h * dL/dW_h), read from the ordinary gradient of the loss (`head_scores`): a first-order estimate
of what removing the head costs the loss, where a weight norm says nothing about how the head is used.
"""

import re
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from jaxlm.errors import check
from jaxlm.models.params import path_name

TARGETS = r"kernel$"
SCOPES = ("layer", "global")


def _stacked(name: str) -> bool:
  return "layers" in name.split("/")


def _targeted(params, targets: str) -> dict:
  """{path name: leaf} of the parameters pruned."""
  names = {path_name(path): leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]}
  return {name: leaf for name, leaf in names.items() if re.search(targets, name)}


def _masks_tree(params, masks_by_name: dict):
  """The masks as a tree shaped like `params`: a bool array where pruned, None elsewhere."""
  return jax.tree_util.tree_map_with_path(lambda path, _: masks_by_name.get(path_name(path)), params)


def _keep_largest(scores: jax.Array, sparsity) -> jax.Array:
  """Mask keeping all but the round(sparsity * size) smallest `scores` (ties broken by position): exact counts."""
  flat = scores.reshape(-1)
  ranks = jnp.argsort(jnp.argsort(flat, stable=True), stable=True)
  pruned = jnp.round(sparsity * flat.size).astype(jnp.int32)
  return (ranks >= pruned).reshape(scores.shape)


def magnitude_masks(params, sparsity, targets: str = TARGETS, scope: str = "layer"):
  """Masks pruning the fraction `sparsity` of smallest-|w| weights of every targeted parameter (and layer of a
  stack) with `scope="layer"`, or of all targeted weights together with `scope="global"`. Traceable."""
  check(scope in SCOPES, "train.prune.scope", f"{scope!r} is not one of {SCOPES}.")
  leaves = _targeted(params, targets)
  if scope == "global":
    flat = jnp.concatenate([jnp.abs(leaf.astype(jnp.float32)).reshape(-1) for leaf in leaves.values()])
    keep, masks, start = _keep_largest(flat, sparsity), {}, 0
    for name, leaf in leaves.items():
      masks[name] = keep[start : start + leaf.size].reshape(leaf.shape)
      start += leaf.size
    return _masks_tree(params, masks)
  masks = {}
  for name, leaf in leaves.items():
    scores = jnp.abs(leaf.astype(jnp.float32))
    masks[name] = (jax.vmap(_keep_largest, (0, None)) if _stacked(name) else _keep_largest)(scores, sparsity)
  return _masks_tree(params, masks)


def nm_masks(params, n: int = 2, m: int = 4, targets: str = TARGETS):
  """N:M masks: in every group of `m` consecutive weights along the group axis (see the module docstring) the `n`
  largest |w| are kept. Traceable."""
  masks = {}
  for name, leaf in _targeted(params, targets).items():
    axis = 1 if _stacked(name) else 0
    check(
      leaf.shape[axis] % m == 0,
      "train.prune.structure",
      f"{name} has {leaf.shape[axis]} weights along its group axis, not a multiple of M={m}.",
    )
    scores = jnp.moveaxis(jnp.abs(leaf.astype(jnp.float32)), axis, -1)
    groups = scores.reshape(*scores.shape[:-1], -1, m)  # [..., groups, M]
    ranks = jnp.argsort(jnp.argsort(-groups, axis=-1, stable=True), axis=-1, stable=True)
    masks[name] = jnp.moveaxis((ranks < n).reshape(scores.shape), -1, axis)
  return _masks_tree(params, masks)


HEAD_TARGETS = r"attention/out/kernel$"  # the output projections [L, N, H, D] (or [N, H, D]) of every attention


def head_scores(params, grads, targets: str = HEAD_TARGETS) -> dict:
  """{name: [L, N] (or [N])} |sum over head n's rows of W * dL/dW| of each attention output projection: one
  batch's |dL/dxi| of the head gates (see the module docstring). Traceable."""
  grads = _targeted(grads, targets)
  return {
    name: jnp.abs((leaf.astype(jnp.float32) * grads[name].astype(jnp.float32)).sum(axis=(-2, -1)))
    for name, leaf in _targeted(params, targets).items()
  }


def head_masks(params, scores: dict, fraction: float, scope: str = "layer", targets: str = HEAD_TARGETS):
  """Masks pruning the `fraction` of heads of lowest `scores` ({name: [L, N]} as `head_scores`) in every layer
  (`scope="layer"`) or over all layers together (`"global"`): whole rows [.., n, :, :] of the output projections."""
  check(scope in SCOPES, "prune_scope", f"{scope!r} is not one of {SCOPES}.")
  check(0 < fraction < 1, "prune", f"the fraction of heads pruned must be in (0, 1), got {fraction}.")
  leaves = _targeted(params, targets)
  check(set(scores) == set(leaves), "prune", f"head scores for {sorted(scores)}, but the heads are {sorted(leaves)}.")
  if scope == "global":
    flat = jnp.concatenate([scores[name].reshape(-1) for name in leaves])
    keep, kept, start = _keep_largest(flat, fraction), {}, 0
    for name in leaves:
      kept[name] = keep[start : start + scores[name].size].reshape(scores[name].shape)
      start += scores[name].size
  else:
    per_layer = lambda name: jax.vmap(_keep_largest, (0, None)) if _stacked(name) else _keep_largest
    kept = {name: per_layer(name)(scores[name], fraction) for name in leaves}
  masks = {name: jnp.broadcast_to(kept[name][..., None, None], leaf.shape) for name, leaf in leaves.items()}
  return _masks_tree(params, masks)


def pruned_heads(masks, targets: str = HEAD_TARGETS) -> dict:
  """{name: [[layer, head], ...]} (or [[head], ...] unstacked) of the heads `head_masks` prunes."""
  return {
    name: [[int(i) for i in index] for index in zip(*(~jax.device_get(mask)[..., 0, 0]).nonzero())]
    for name, mask in _targeted(masks, targets).items()
  }


def parse_structure(structure: str) -> tuple[int, int]:
  """'2:4' -> (2, 4)."""
  try:
    n, m = (int(part) for part in structure.split(":"))
  except ValueError:
    n = m = 0
  check(0 < n < m, "train.prune.structure", f"{structure!r} is not N:M with 0 < N < M, e.g. '2:4'.")
  return n, m


def apply_masks(params, masks):
  """`params` with the pruned weights set to exactly zero (leaves without a mask unchanged)."""
  return jax.tree.map(
    lambda p, mask: p if mask is None else jnp.where(mask, p, jnp.zeros_like(p)),
    params,
    masks,
    is_leaf=lambda x: x is None,
  )


def sparsity(params, targets: str = TARGETS) -> dict:
  """{name: fraction of exact zeros} of every targeted parameter (`name[i]` for layer i of a stack), and
  "total" over all of them: what a pruned model reports."""
  report, zeros, size = {}, 0, 0
  for name, leaf in _targeted(params, targets).items():
    leaf = jax.device_get(leaf)
    slices = [(f"{name}[{i}]", leaf[i]) for i in range(leaf.shape[0])] if _stacked(name) else [(name, leaf)]
    for label, values in slices:
      report[label] = float((values == 0).mean())
    zeros, size = zeros + int((leaf == 0).sum()), size + leaf.size
  report["total"] = zeros / max(size, 1)
  return report


# ------------------------------------------------------------------------------------------------ gradual


def check_config(prune) -> None:
  """Validates the `train.prune` section."""
  check(0.0 <= prune.sparsity < 1.0, "train.prune.sparsity", f"must be in [0, 1), got {prune.sparsity}.")
  check(prune.scope in SCOPES, "train.prune.scope", f"{prune.scope!r} is not one of {SCOPES}.")
  if prune.structure:
    parse_structure(prune.structure)
  check(
    0 <= prune.start_step <= prune.end_step,
    "train.prune.end_step",
    f"the schedule needs 0 <= start_step <= end_step, got {prune.start_step} and {prune.end_step}.",
  )
  check(prune.every > 0, "train.prune.every", f"must be positive, got {prune.every}.")
  try:
    re.compile(prune.targets)
  except re.error as error:
    check(False, "train.prune.targets", f"{prune.targets!r} is not a regular expression ({error}).")


def enabled(prune) -> bool:
  return prune.sparsity > 0 or bool(prune.structure)


def schedule_sparsity(prune, step):
  """Target sparsity at `step`: 0 before `start_step`, the cubic ramp, then `sparsity` from `end_step` on."""
  span = max(prune.end_step - prune.start_step, 1)
  progress = jnp.clip((step - prune.start_step) / span, 0.0, 1.0)
  return prune.sparsity * (1.0 - (1.0 - progress) ** 3)


class PruneState(NamedTuple):
  count: jax.Array  # updates seen (= the train step)
  masks: dict  # a bool array per targeted parameter, optax.MaskedNode elsewhere


def gradual(prune) -> optax.GradientTransformation:
  """The optax transformation of `train.prune` (see the module docstring): chain it after the optimizer."""
  structure = parse_structure(prune.structure) if prune.structure else None
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)

  def init(params):
    def mask(path, leaf):  # boxed leaves (abstract init) keep their logical axes, so masks shard like them
      if not re.search(prune.targets, path_name(path)):
        return optax.MaskedNode()
      return jax.tree.map(lambda x: jnp.ones(x.shape, bool), leaf)

    return PruneState(jnp.zeros((), jnp.int32), jax.tree_util.tree_map_with_path(mask, params, is_leaf=is_box))

  def update(updates, state, params):
    is_node = lambda x: isinstance(x, optax.MaskedNode)
    new = optax.apply_updates(params, updates)

    def recompute(masks):
      current = jax.tree.map(lambda p, mask: p if is_node(mask) else jnp.where(mask, p, 0), new, masks, is_leaf=is_node)
      if structure:
        fresh = nm_masks(current, *structure, targets=prune.targets)
      else:
        fresh = magnitude_masks(current, schedule_sparsity(prune, state.count), prune.targets, prune.scope)
      return jax.tree.map(lambda old, f: old if is_node(old) else f, masks, fresh, is_leaf=is_node)

    due = (
      (state.count >= prune.start_step)
      & (state.count <= prune.end_step)
      & (((state.count - prune.start_step) % prune.every == 0) | (state.count == prune.end_step))
    )
    masks = jax.lax.cond(due, recompute, lambda masks: masks, state.masks)
    # The update that lands exactly on the masked parameters: params + (masked - params) is 0 where pruned.
    updates = jax.tree.map(
      lambda mask, u, p, n: u if is_node(mask) else jnp.where(mask, n, 0).astype(p.dtype) - p,
      masks,
      updates,
      params,
      new,
      is_leaf=is_node,
    )
    return updates, PruneState(state.count + 1, masks)

  return optax.GradientTransformation(init, update)
