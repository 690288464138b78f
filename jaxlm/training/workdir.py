"""A training run's hold on its workdir: one run at a time (a lock), and one config (config.json, checked on resume).

`WORKDIR/.lock` is held with `flock` for the whole run by process 0 (the other processes of a multi-process run
share its workdir). The kernel releases it when the holder exits, even after `kill -9`, so a lock file left by a
dead process never blocks a new run; the file names the holder for the message of a refused run.
"""

import contextlib
import fcntl
import json
import os
import socket
import time

import jax

from jaxlm.errors import ConfigError, WorkdirError

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
# Keys a resumed run may change: how long it runs and what it logs, evaluates, keeps and decodes, where the data
# lives, and the mesh (Orbax reshards). Anything else would make the resumed run a different experiment.
RESUMABLE_KEYS = (
  "train.steps",
  "train.log_every",
  "train.eval_every",
  "train.checkpoint_every",
  "train.keep_checkpoints",
  "train.early_stopping_patience",
  "train.skip_nonfinite_updates",
  "data.data_dir",
  "data.test_split",
  "eval.",
  "sample.",
  "decode.",
  "mesh.",
)


def make_workdir(workdir: str) -> None:
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirError(f"--workdir {workdir} is a file, not a directory; choose another --workdir.")
  os.makedirs(workdir, exist_ok=True)


@contextlib.contextmanager
def lock(workdir: str):
  """Holds WORKDIR/.lock (process 0); raises WorkdirError naming the holder when another run has it."""
  if jax.process_index() != 0:
    yield
    return
  with open(os.path.join(workdir, LOCK_FILE), "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "a process that has not written its name yet"
      raise WorkdirError(
        f"{workdir} is in use by another run ({holder}). Wait for it to finish or stop it, or choose another --workdir."
      ) from None
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    try:
      yield
    finally:
      f.truncate(0)
      fcntl.flock(f, fcntl.LOCK_UN)


def _flatten(values: dict, prefix: str = "") -> dict:
  flat = {}
  for key, value in values.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f"{prefix}{key}."))
    else:
      flat[f"{prefix}{key}"] = value
  return flat


def _to_json(config) -> str:
  return config.to_json_best_effort(indent=2, sort_keys=True) + "\n"


def check_resumable(workdir: str, config) -> None:
  """Resuming: `config` must be the run's (WORKDIR/config.json) but for RESUMABLE_KEYS; raises ConfigError
  listing every other difference. Keys the saved config lacks (added to jaxlm since) are not compared."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = _flatten(json.load(f))
  current = _flatten(json.loads(_to_json(config)))
  differences = [
    f"  {key}: {saved[key]!r} in {CONFIG_FILE}, {current.get(key)!r} now"
    for key in sorted(saved)
    if saved[key] != current.get(key) and not key.startswith(RESUMABLE_KEYS)
  ]
  if differences:
    raise ConfigError(
      f"{workdir} holds checkpoints of a run with another config ({len(differences)} keys differ):\n"
      + "\n".join(differences)
      + "\nResume with the run's config (--config=experiments/workdir.py:"
      f"{workdir}) or choose a new --workdir. Resumable keys: {', '.join(RESUMABLE_KEYS)}."
    )


def write_config(workdir: str, config) -> None:
  """Writes WORKDIR/config.json atomically (process 0), once the run is set up."""
  if jax.process_index() == 0:
    path = os.path.join(workdir, CONFIG_FILE)
    with open(path + ".tmp", "w") as f:
      f.write(_to_json(config))
    os.replace(path + ".tmp", path)
