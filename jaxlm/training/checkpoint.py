"""Orbax checkpoints: the train state with the data iterator's position, and parameters read alone.

`WORKDIR/checkpoints/<step>/` holds two items: `state` (the TrainState, saved
sharded by every process) and `data` (the grain iterator state). Saving is
asynchronous and atomic: Orbax writes into a temporary directory and renames
it when complete, so a run killed mid-save leaves the previous checkpoint as
the latest one and never a half-written one. Kept: the `keep` most recent
checkpoints plus the best one by `best_metric` (lowest or highest, `best_mode`).
A failed save (a full disk) is a CheckpointError naming the directory and its free
space; a finished checkpoint damaged later (a truncated or deleted file) is moved
aside to `<step>.corrupt` when an older one restores (`restore_latest`).

Reading parameters alone (evaluation, generation, `init_from`, a distillation teacher) is
`find_checkpoint` (which step of which run) then `restore_params` (only `state/params`, straight into the
target shardings, with every mismatch listed in one error).
"""

import contextlib
import dataclasses
import json
import logging as python_logging
import os
import re
import shutil
import sys
import traceback
import warnings

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy

from jaxlm.errors import CheckpointError
from jaxlm.models import lora
from jaxlm.models import params as params_lib

BACKBONE_PREFIX = "backbone/"  # a language model's parameters are a classifier's backbone


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

  def __init__(self, directory: str, keep: int = 1, best_metric: str = "loss", best_mode: str = "min"):
    _quiet_failed_save_noise()
    policy = preservation_policy.AnyPreservationPolicy(
      [
        preservation_policy.LatestN(keep),
        preservation_policy.BestN(
          get_metric_fn=lambda metrics: metrics[best_metric],
          reverse=best_mode == "min",
          n=1,
          keep_checkpoints_without_metrics=False,
        ),
      ]
    )
    # best_fn makes Orbax write each checkpoint's metrics to disk, so the best one is still known after a restart.
    options = ocp.CheckpointManagerOptions(
      preservation_policy=policy,
      best_fn=lambda metrics: metrics[best_metric],
      best_mode=best_mode,
      enable_async_checkpointing=True,
      create=True,
    )
    self.directory = directory
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
    with self._save_errors():
      self.manager.save(
        step,
        args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(_IteratorState(data_iterator))
        ),
        metrics=metrics,
        force=True,
      )

  def check_for_errors(self) -> None:
    """Raises CheckpointError if an asynchronous save has failed; cheap, so the loop calls it every step."""
    with self._save_errors():
      self.manager.check_for_errors()

  def restore(self, step: int, abstract_state, data_iterator: grain.DatasetIterator):
    """The state at `step` in the shardings of `abstract_state`; `data_iterator` is moved in place."""
    restored = self.manager.restore(
      step,
      args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(_IteratorState(data_iterator)),
      ),
    )
    return restored["state"]

  def restore_latest(self, abstract_state, data_iterator: grain.DatasetIterator):
    """(step, state) of the newest checkpoint that restores; (None, None) when there is none.

    A checkpoint that fails to restore while an older one restores was damaged after it was written: it is moved
    aside to `<step>.corrupt` with a warning. When none restores, the model or the config no longer fits them:
    CheckpointError, and nothing is moved.
    """
    failed = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state = self.restore(step, abstract_state, data_iterator)
      except Exception as error:  # noqa: BLE001 (Orbax, TensorStore and JSON raise many types for damaged files)
        logging.warning(
          "The checkpoint at step %d in %s does not restore: %s: %s",
          step,
          self.directory,
          type(error).__name__,
          str(error)[:200],
        )
        failed.append((step, error))
        continue
      for bad_step, _ in failed:
        self._move_aside(bad_step)
      if failed:
        self.manager.reload()
      return step, state
    if failed:
      step, error = failed[0]
      raise CheckpointError(
        f"No checkpoint in {self.directory} restores (newest: step {step}, "
        f"{type(error).__name__}: {error}). If the model or config changed, resume with the run's "
        "config.json; otherwise move the damaged checkpoints away."
      ) from error
    return None, None

  def _move_aside(self, step: int) -> None:
    path = os.path.join(self.directory, str(step))
    target, copy = f"{path}.corrupt", 1
    if jax.process_index() == 0:
      while os.path.exists(target):
        copy += 1
        target = f"{path}.corrupt{copy}"
      os.rename(path, target)
      logging.warning("Moved the damaged checkpoint %s aside to %s; resuming from an older one.", path, target)
    multihost_utils.sync_global_devices(f"jaxlm_move_aside_{step}")

  def wait(self) -> None:
    """Blocks until pending saves are on disk."""
    with self._save_errors():
      self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and closes; a failed save is reported by `check_for_errors`/`wait` (once). The
    manager is closed after a failed save too: otherwise Orbax's background threads outlive the event loop and
    print pages of "Event loop is closed" tracebacks under the one error message at exit."""
    with self._save_errors():
      try:
        self.manager.wait_until_finished()
      finally:
        self.manager.close()

  @contextlib.contextmanager
  def _save_errors(self):
    """Turns a failed save into one CheckpointError naming the directory, its free space and the root cause."""
    try:
      yield
    except Exception as error:  # noqa: BLE001 (the failure comes from Orbax's background thread, any type)
      cause = error
      while cause.__cause__ is not None or cause.__context__ is not None:
        cause = cause.__cause__ or cause.__context__
      free = shutil.disk_usage(self.directory).free / 2**20 if os.path.isdir(self.directory) else 0.0
      previous = self.manager.latest_step()
      # Orbax's other writes never ran; when they are collected, Python would warn of each unawaited one.
      warnings.filterwarnings("ignore", message="coroutine .* was never awaited", category=RuntimeWarning)
      raise CheckpointError(
        f"Saving a checkpoint in {self.directory} failed: {type(cause).__name__}: {str(cause)[:300]}. "
        f"{free:.1f} MiB free there. Free some space (or use another --workdir) and rerun the same command: it "
        f"resumes from the last complete checkpoint{f' (step {previous})' if previous is not None else ''}."
      ) from error


def _quiet_failed_save_noise() -> None:
  """When one write of a save fails (a full disk), the other writes fail with the same cause in Orbax's background
  thread, each printing a traceback before the one CheckpointError that names the cause: asyncio logs every failed
  Orbax write task nobody awaited ("Task exception was never retrieved"), and once Orbax's event loop has stopped
  at the first error, TensorStore's still-running writes call back into the closed loop and report that
  RuntimeError ("Event loop is closed") as unraisable. A filter on the asyncio logger drops the first kind (for
  Orbax's tasks only) and a `sys.unraisablehook` exactly the second. Idempotent."""
  asyncio_logger = python_logging.getLogger("asyncio")
  if not any(isinstance(f, _UnretrievedOrbaxTaskFilter) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_UnretrievedOrbaxTaskFilter())
  if getattr(sys.unraisablehook, "jaxlm_closed_loop_filter", False):
    return
  previous = sys.unraisablehook

  def unraisablehook(unraisable):
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
      return
    previous(unraisable)

  unraisablehook.jaxlm_closed_loop_filter = True
  sys.unraisablehook = unraisablehook


class _UnretrievedOrbaxTaskFilter(python_logging.Filter):
  """Drops asyncio's "... exception was never retrieved" (of a task or a gathering future) whose exception was
  raised in Orbax's code: the failed save reports that cause once, as a CheckpointError
  (`Checkpointer._save_errors`)."""

  def filter(self, record: python_logging.LogRecord) -> bool:
    if "exception was never retrieved" not in record.getMessage() or not record.exc_info:
      return True
    frames = traceback.extract_tb(record.exc_info[2])
    return not any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in frames)


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """One finished checkpoint of a run."""

  workdir: str  # the run's directory (config.json, tokenizer.model, checkpoints/)
  step: int
  state_dir: str  # WORKDIR/checkpoints/<step>/state


def split_checkpoint_path(path: str) -> tuple[str, int | None]:
  """(workdir, step) of `WORKDIR` (step None) or of one checkpoint directory `WORKDIR/checkpoints/<step>`."""
  path = os.path.abspath(os.path.expanduser(path))
  parent, name = os.path.split(path)
  if name.isdigit() and os.path.basename(parent) == "checkpoints":
    return os.path.dirname(parent), int(name)
  return path, None


def find_checkpoint(
  path: str, step: str | int = "latest", best_metric: str = "loss", best_mode: str = "min"
) -> CheckpointRef:
  """The checkpoint `step` ("latest", "best" by `best_metric`, or a number) of the run at `path`.

  `path` is a WORKDIR or a checkpoint directory WORKDIR/checkpoints/<step> (which then fixes the step).
  Only finished checkpoints count: Orbax's temporary directories of an interrupted save are never chosen.
  """
  workdir, fixed_step = split_checkpoint_path(path)
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    raise CheckpointError(
      f"{path} has no checkpoints/ directory: it is not a jaxlm workdir, or nothing was saved "
      "yet; train first (--mode=train with this --workdir)."
    )
  checkpointer = Checkpointer(directory, best_metric=best_metric, best_mode=best_mode)
  try:
    steps = checkpointer.all_steps()
    if not steps:
      raise CheckpointError(
        f"{directory} holds no finished checkpoint; train first (--mode=train with this "
        "--workdir), or resume the interrupted run."
      )
    if fixed_step is not None:
      step = fixed_step
    elif step == "latest":
      step = max(steps)
    elif step == "best":
      best = checkpointer.best_step()
      if best is None:
        raise CheckpointError(f"No checkpoint in {directory} was ranked by {best_metric!r}; use step='latest'.")
      step = best
  finally:
    checkpointer.close()
  if not isinstance(step, int) or step not in steps:
    raise CheckpointError(
      f"No finished checkpoint {step!r} in {directory}; it holds steps {sorted(steps)} (or ask for 'latest' or 'best')."
    )
  return CheckpointRef(workdir, step, os.path.join(directory, str(step), "state"))


def restore_params(state_dir: str, target, new_params: str | None = None, allow_adapters: bool = False):
  """Parameters of the checkpoint item `state_dir`, restored into the shapes and shardings of `target`.

  `target` is a parameter tree of arrays or ShapeDtypeStructs (`models.params.abstract_params`). Checkpoint
  names match target names as they are, or under the target's `backbone/` prefix. Target parameters the
  checkpoint lacks are kept from `target` (arrays, or ShapeDtypeStructs for the caller to initialise) only when
  they match the regex `new_params` (a task's new head) or, with `allow_adapters`, are LoRA adapters. Any other
  difference (a missing or unused parameter, a shape mismatch) raises CheckpointError listing every offender.
  Returns (params, names of the parameters kept from `target`). No optimizer state is read.
  """
  source = params_lib.flatten(ocp.PyTreeCheckpointer().metadata(state_dir).item_metadata["params"])
  wanted = params_lib.flatten(target)
  prefix, new = _match_names(source, wanted, new_params, allow_adapters, state_dir)
  to_restore = {
    name: jax.ShapeDtypeStruct(
      wanted[prefix + name].shape,
      wanted[prefix + name].dtype,
      sharding=getattr(wanted[prefix + name], "sharding", None),
    )
    for name in source
  }
  abstract = {"params": _nest(to_restore)}
  restored = ocp.PyTreeCheckpointer().restore(
    state_dir,
    args=ocp.args.PyTreeRestore(
      item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract), partial_restore=True
    ),
  )
  values = params_lib.flatten(restored["params"])
  logging.info(
    "Restored %d parameters from %s%s", len(values), state_dir, f"; kept {len(new)} new ones: {new}" if new else ""
  )
  return _place(values, prefix, target), new


def place_params(
  source: dict, target, new_params: str | None = None, allow_adapters: bool = False, origin: str = "the source"
):
  """`source` ({name: array} already in place, e.g. an imported Hugging Face model's) put into the tree of
  `target` by the rules of `restore_params`. Returns (params, names of the parameters kept from `target`)."""
  prefix, new = _match_names(source, params_lib.flatten(target), new_params, allow_adapters, origin)
  return _place(source, prefix, target), new


def _match_names(
  source: dict, wanted: dict, new_params: str | None, allow_adapters: bool, origin: str
) -> tuple[str, list[str]]:
  """(the prefix under which `source` names match `wanted` ones: '' or 'backbone/', the wanted names that
  `source` lacks); CheckpointError listing every misfit (see `restore_params`)."""
  prefix = max(("", BACKBONE_PREFIX), key=lambda p: sum(p + name in wanted for name in source))
  problems = []
  for name, meta in sorted(source.items()):
    leaf = wanted.get(prefix + name)
    if leaf is None:
      problems.append(f"  {name} {tuple(meta.shape)}: in the checkpoint, not in the model")
    elif tuple(leaf.shape) != tuple(meta.shape):
      problems.append(
        f"  {prefix + name}: shape {tuple(meta.shape)} in the checkpoint, {tuple(leaf.shape)} in the model"
      )
  new = sorted(set(wanted) - {prefix + name for name in source})
  for name in new:
    allowed = (new_params and re.search(new_params, name)) or (
      allow_adapters and name.rsplit("/", 1)[-1] in lora.ADAPTER_NAMES
    )
    if not allowed:
      problems.append(f"  {name} {tuple(wanted[name].shape)}: in the model, not in the checkpoint")
  if problems:
    raise CheckpointError(
      f"The checkpoint {origin} does not fit the model ({len(problems)} parameters):\n"
      + "\n".join(problems)
      + "\nUse the model.* settings of the run that wrote it (its config.json)."
    )
  return prefix, new


def _place(values: dict, prefix: str, target):
  def pick(path, leaf):
    name = params_lib.path_name(path)
    return values.get(name[len(prefix) :] if name.startswith(prefix) else None, leaf)

  return jax.tree_util.tree_map_with_path(pick, target)


def save_params(workdir: str, params, step: int = 0) -> str:
  """Writes `params` alone as checkpoint `step` of `workdir` (`WORKDIR/checkpoints/<step>/state` holding
  `{"params": ...}`, each process its shards): what `find_checkpoint` and `restore_params` read, e.g. an imported
  Hugging Face model. There is no optimizer state or data position in it, so training does not resume from it:
  start a new run with `init_from` instead. Returns the state directory."""
  directory = os.path.join(os.path.abspath(workdir), "checkpoints")
  options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
  with ocp.CheckpointManager(directory, options=options, item_names=("state",)) as manager:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave({"params": params})), force=True)
    manager.wait_until_finished()
  return os.path.join(directory, str(step), "state")


def _nest(flat: dict) -> dict:
  """{"a/b/c": leaf} -> {"a": {"b": {"c": leaf}}}."""
  tree = {}
  for name, value in flat.items():
    *parents, leaf = name.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = value
  return tree
