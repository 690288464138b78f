"""Command line: `python -m jaxlm.main --config=experiments/quickstart.py --workdir=DIR`.

Overrides: `--config.train.steps=50`, `--config.model.num_layers=2`, ...
(the config is locked: a misspelt key or a wrong type is an error).

Modes: `train` (the default); `plan` prints every parameter's sharding and the memory each device
will need, without compiling the train step; `eval` writes WORKDIR/eval/<split>/report.{json,md} of the
`--step` checkpoint (best by default) on `--split`, through `--calibrator=NAME` if given; `calibrate` fits and
reports every calibrator of a classifier, or runs a language model's prompted classification
(`jaxlm.calibrate`, reports in WORKDIR/calibration/); `generate --prompt="def "` continues each `--prompt`
(repeatable) from the workdir's latest checkpoint with the `decode` settings: only the generated texts
go to stdout, one per prompt, logs go to stderr. Every mode but `train` reads WORKDIR/config.json when
`--config` is omitted; to change some of its keys, load it as a config file:
`--config=experiments/workdir.py:WORKDIR --config.decode.strategy=sample`.
Everything is set up by `jaxlm.Experiment`; this file only parses flags. Multi-host: run the same
command in every process;
TPU pods, SLURM and Open MPI are detected, otherwise pass `--coordinator_address=HOST:PORT
--num_processes=N --process_id=I` (flags, not config: they differ per process).

An expected error (a bad config value or key, a missing file, a checkpoint that does not fit, a locked
workdir, a non-finite update) prints one message with its fix and exits with status 1; `--verbose` (or
JAXLM_VERBOSE=1) shows the traceback too.
"""

import logging as python_logging
import os
import sys
import traceback

from absl import app, flags, logging
from ml_collections import config_flags

from jaxlm.errors import CheckpointError, ConfigError, NonFiniteLossError, WorkdirError

_CONFIG = config_flags.DEFINE_config_file(
  "config",
  None,
  "Experiment config file (experiments/*.py[:arg]); modes other than train default to WORKDIR/config.json.",
  lock_config=True,
)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json.")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "plan", "eval", "calibrate", "generate"], "What to run.")
_PROMPT = flags.DEFINE_multi_string("prompt", None, "--mode=generate: a prompt to continue (repeat for a batch).")
_SPLIT = flags.DEFINE_string(
  "split", "", "--mode=eval: split to evaluate ('' = data.test_split, else data.eval_split)."
)
_STEP = flags.DEFINE_string(
  "step",
  "",
  "--mode=eval/calibrate: checkpoint: best, latest or a step number ('' = best "
  "for classifiers and eval, latest for a language model's prompted calibration).",
)
_CALIBRATOR = flags.DEFINE_string("calibrator", "", "--mode=eval: apply this calibrator saved by --mode=calibrate.")
_PLAN_DEVICES = flags.DEFINE_integer("plan_devices", 0, "--mode=plan: devices to plan for (0 = the mesh's devices).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", "", "host:port of process 0 in a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer(
  "num_processes", 0, "Processes in a multi-process run (with --coordinator_address)."
)
_PROCESS_ID = flags.DEFINE_integer("process_id", -1, "This process's index (with --coordinator_address).")
_VERBOSE = flags.DEFINE_bool("verbose", False, "Show the traceback of an expected error (also JAXLM_VERBOSE=1).")
flags.mark_flags_as_required(["workdir"])
EXPECTED_ERRORS = (ConfigError, CheckpointError, WorkdirError, NonFiniteLossError, FileNotFoundError)


def _quiet_library_logs(record) -> bool:
  """Keeps Orbax's per-save INFO chatter out of the console, and its ERROR logs of a failed background save
  (pages of traceback) whose exception jaxlm reports in one message; its warnings still show."""
  return record.levelno == python_logging.WARNING or "/orbax/" not in record.pathname


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_quiet_library_logs)
  from jaxlm import runtime  # jax is imported only after the XLA flags are set

  added = runtime.set_recommended_xla_flags()
  if added:
    logging.info("Added XLA flags for the GPU: %s", " ".join(added))
  if runtime.keep_freed_host_memory():
    logging.info("CPU run: malloc keeps freed memory for reuse (see jaxlm.runtime.keep_freed_host_memory).")
  runtime.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  from jaxlm.experiment import Experiment  # imported here so that --help stays fast

  mode, workdir = _MODE.value, _WORKDIR.value
  if mode == "generate" and not _PROMPT.value:
    raise app.UsageError("--mode=generate needs at least one --prompt=TEXT.")
  if _CONFIG.value is None:
    if mode == "train":
      raise app.UsageError("--mode=train needs --config=experiments/X.py (other modes read WORKDIR/config.json).")
    experiment = Experiment.from_workdir(workdir)
  else:
    experiment = Experiment.from_config(_CONFIG.value, workdir)
  logging.info("jaxlm %s: task %s, workdir %s", mode, experiment.config.task, experiment.workdir)
  if mode == "train":
    experiment.train()
  elif mode == "plan":
    from jaxlm import plan

    print(plan.format_plan(experiment.plan(_PLAN_DEVICES.value or None)), flush=True)
  elif mode in ("eval", "calibrate"):
    from jaxlm import calibrate

    step = int(_STEP.value) if _STEP.value.isdigit() else _STEP.value or None
    if mode == "eval":
      calibrate.evaluate_checkpoint(experiment, _SPLIT.value or None, step or "best", _CALIBRATOR.value)
    else:
      calibrate.calibrate(experiment, step)
  elif mode == "generate":
    params = experiment.load_params()
    for result in experiment.generate(params, _PROMPT.value):
      print(result.text, flush=True)


def _expected_message(error: BaseException) -> str | None:
  """The message of an error the user fixes from its message alone (no traceback needed), else None."""
  if isinstance(error, EXPECTED_ERRORS):
    return str(error)
  frames = traceback.extract_tb(error.__traceback__)
  if isinstance(error, (KeyError, AttributeError)) and frames and "/ml_collections/" in frames[-1].filename:
    message = error  # a misspelt --config.* key, refused by the locked config (a KeyError inside AttributeErrors)
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    overrides = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
    return f"unknown config key {message} (overrides: {' '.join(overrides)})"
  return None


def run():
  """Entry point of the `jaxlm` console script."""
  try:
    app.run(main)
  except KeyboardInterrupt:
    sys.exit("jaxlm: aborted by a second Ctrl-C; rerun the same command to resume from the last checkpoint.")
  except Exception as error:  # noqa: BLE001 (re-raised unless expected)
    message = _expected_message(error)
    if message is None or "--verbose" in sys.argv or os.environ.get("JAXLM_VERBOSE") == "1":
      raise
    sys.exit(f"jaxlm: {type(error).__name__}: {message}\n(--verbose or JAXLM_VERBOSE=1 shows the traceback)")


if __name__ == "__main__":
  run()
