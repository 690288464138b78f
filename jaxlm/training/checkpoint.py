"""Orbax checkpoints of the train state together with the data iterator's position.

`WORKDIR/checkpoints/<step>/` holds two items: `state` (the TrainState, saved
sharded by every process) and `data` (the grain iterator state). Saving is
asynchronous and atomic: Orbax writes into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest one and never a half-written one. Kept: the `keep` most recent
checkpoints plus the best one by `best_metric` (lowest or highest, `best_mode`).
"""

import json

import grain
import jax
import orbax.checkpoint as ocp
from orbax.checkpoint.checkpoint_managers import preservation_policy


def _lists_to_tuples(value):
  if isinstance(value, dict):
    return {key: _lists_to_tuples(item) for key, item in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(item) for item in value)
  return value


class _IteratorState:
  """What grain's Orbax handler saves and restores in place of the iterator itself.

  - Saving: the state is taken when `save` is called, not when the asynchronous
    write runs, so it belongs to the saved step even if training has moved on.
  - Restoring: JSON turns tuples into lists, and grain's packing iterator
    compares its state against tuples; lists are turned back into tuples.
  The handler writes one file per process, so each process resumes its own shard.
  """

  def __init__(self, iterator: grain.DatasetIterator):
    self._iterator = iterator
    self._state = iterator.get_state()

  def get_state(self) -> bytes:
    return json.dumps(self._state).encode()

  def set_state(self, raw: bytes) -> None:
    self._iterator.set_state(_lists_to_tuples(json.loads(raw)))

  def start_prefetch(self) -> None:
    pass  # the iterator prefetches on its own once read


class Checkpointer:
  """Saves and restores (state, data iterator) pairs in one directory."""

  def __init__(self, directory: str, keep: int, best_metric: str = "eval_loss", best_mode: str = "min"):
    policy = preservation_policy.AnyPreservationPolicy([
        preservation_policy.LatestN(keep),
        preservation_policy.BestN(get_metric_fn=lambda metrics: metrics[best_metric], reverse=best_mode == "min",
                                  n=1, keep_checkpoints_without_metrics=False),
    ])
    # best_fn makes Orbax write each checkpoint's metrics to disk, so the best one is still known after a restart.
    options = ocp.CheckpointManagerOptions(preservation_policy=policy, best_fn=lambda metrics: metrics[best_metric],
                                           best_mode=best_mode, enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(directory, options=options, item_names=("state", "data"))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None if no checkpoint has one)."""
    scored = [step for step in self.all_steps() if self.manager.metrics(step)]
    return self.manager.best_step() if scored else None

  def save(self, step: int, state, data_iterator: grain.DatasetIterator, metrics: dict | None = None) -> None:
    """Starts an asynchronous save; `metrics` (with `best_metric`) ranks it for best-keeping."""
    self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))),
        metrics=metrics, force=True)

  def restore(self, step: int, abstract_state, data_iterator: grain.DatasetIterator):
    """The state at `step` in the shardings of `abstract_state`; `data_iterator` is moved in place."""
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator))))
    return restored["state"]

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.close()


def restore_params(directory: str, abstract_params) -> tuple:
  """(parameters, step) of the latest checkpoint in `directory`, in the shardings of `abstract_params`.

  Reads the parameters alone: no optimizer state, no data iterator (generation, evaluation).
  """
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  try:
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f"No checkpoint in {directory}; train first with --mode=train and the same --workdir.")
    item = {"params": abstract_params}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  finally:
    manager.close()
  return restored["state"]["params"], step


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a pytree of arrays."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
