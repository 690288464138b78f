"""Hyperparameter sweeps: one training run per point of a grid or a random search; the best point by a metric.

    python scripts/sweep.py --config=experiments/finetune_packages.py --workdir=runs/sweep \
        --config.init_from=runs/quickstart \
        --grid='train.learning_rate=3e-4,1e-3,3e-3' --grid='train.warmup_steps=10,50' --metric=eval/accuracy
    python scripts/sweep.py --config=experiments/quickstart.py --workdir=runs/lr_search \
        --random='train.learning_rate=loguniform:3e-4:1e-2' --budget=6 --seed=0 --metric=eval/loss --mode=min

`--config.a.b=v` overrides apply to every point. Rerunning the same command resumes the sweep. What it writes:
`jaxlm.sweep` (the library module this script calls).
"""

import json
import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (experiments/*.py[:arg]).")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep directory: one workdir per point, results.*.", required=True)
_GRID = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: a grid axis (repeat for more axes).")
_RANDOM = flags.DEFINE_multi_string("random", [], "KEY=uniform:LO:HI, loguniform:LO:HI or choice:A,B: random search.")
_BUDGET = flags.DEFINE_integer("budget", 0, "Points of the random search.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the random search.")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "Runs at once (each a `python -m jaxlm.main` process).")
_METRIC = flags.DEFINE_string("metric", "eval/accuracy", "SPLIT/NAME: eval/accuracy, eval/loss, test/macro_f1...")
_MODE = flags.DEFINE_enum("mode", "max", ["max", "min"], "Whether a larger or a smaller metric is better.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  from jaxlm import sweep

  if bool(_GRID.value) == bool(_RANDOM.value):
    raise app.UsageError("Give --grid axes or --random distributions (with --budget), not both or neither.")
  config = _CONFIG.value
  if _GRID.value:
    points = sweep.grid_points(config, _GRID.value)
  else:
    points = sweep.random_points(config, _RANDOM.value, _BUDGET.value, _SEED.value)
  overrides = [arg for arg in sys.argv[1:] if arg.startswith("--config.")]
  results = sweep.run_sweep(
    flags.FLAGS["config"].config_filename, _WORKDIR.value, points, overrides, _METRIC.value, _MODE.value,
    _PARALLEL.value,
  )  # fmt: skip
  print(open(os.path.join(_WORKDIR.value, "results.md")).read(), flush=True)
  print(json.dumps({"best": results["best"], "plot": os.path.join(_WORKDIR.value, "results.png")}), flush=True)
  if any(row["status"] != "done" for row in results["points"]):
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
