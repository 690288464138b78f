"""Hyperparameter sweeps: one training run per point of a grid or of a random search, the best point by a metric
(what `scripts/sweep.py` runs).

    points = grid_points(config, ["train.learning_rate=1e-4,3e-4", "train.warmup_steps=50,100"])   # 4 points
    points = random_points(config, ["train.learning_rate=loguniform:1e-4:1e-2"], budget=8, seed=0)
    results = run_sweep("experiments/finetune_packages.py", "runs/sweep", points, metric="eval/accuracy")

Values are parsed with the type of the config field they set (an int field takes "50", a float field "1e-4", a
bool field "true"); random floats are rounded to 3 significant digits, so a point's name holds its exact values.
Every point is a workdir SWEEPDIR/NAME, its name made of the overrides (`learning_rate=0.0003,warmup_steps=50`),
trained by `python -m jaxlm.main --config=CONFIG --workdir=SWEEPDIR/NAME` plus the sweep's own `--config.*`
overrides and the point's, `parallel` processes at once; its output goes to SWEEPDIR/logs/NAME.log.

The metric is `SPLIT/NAME`: a split of the run's metrics.jsonl (`eval/accuracy`, `eval/loss`, `train/loss`) gives
the best value the run logged by `mode` (its best checkpoint's when `train.best_metric` is that metric), `test/NAME`
the run's final test report (WORKDIR/eval/report.json). SWEEPDIR/results.json and results.md (one row per point:
overrides, metric, steps, status) are rewritten as each point ends, and a plot of the metric over the first swept
key (a line per value of the second) goes to SWEEPDIR/results.png. Resuming: rerunning the same sweep skips the
points results.json records as done; a point that was interrupted or failed runs again and resumes from its own
checkpoints (the train loop resumes a workdir). A failed point is recorded with the end of its log and the sweep
goes on.
"""

import itertools
import json
import math
import os
import subprocess
import sys
import time

import numpy as np

from jaxlm.errors import ConfigError, check
from jaxlm.training.writer import read_rows

MODES = ("max", "min")
DISTRIBUTIONS = ("uniform", "loguniform", "choice")
LOG_TAIL_LINES = 20


# ------------------------------------------------------------------------------------------------ points


def _field(config, key: str):
  """The current value of `key` (dotted) in `config`; a ConfigError naming it if it does not exist."""
  value = config
  for part in key.split("."):
    check(part in value, key, "is not a config field; sweep an existing key, e.g. train.learning_rate.")
    value = value[part]
  return value


def parse_value(config, key: str, text: str):
  """`text` parsed with the type of the config field `key` (bool, int, float or str)."""
  current = _field(config, key)
  kind = type(current)
  try:
    if kind is bool:
      check(text.lower() in ("true", "false", "1", "0"), key, f"takes true or false, not {text!r}.")
      return text.lower() in ("true", "1")
    if kind in (int, float, str):
      return kind(text)
  except ValueError:
    raise ConfigError(f"{key}: {text!r} is not a {kind.__name__} (the type of the config field).") from None
  raise ConfigError(f"{key}: a {kind.__name__} field cannot be swept; sweep bool, int, float or str fields.")


def _split_spec(spec: str) -> tuple[str, str]:
  key, sep, values = spec.partition("=")
  if not sep or not key or not values:
    raise ConfigError(f"{spec!r} is not KEY=VALUES, e.g. 'train.learning_rate=1e-4,3e-4'.")
  return key.strip(), values.strip()


def grid_points(config, grids: list[str]) -> list[dict]:
  """Every combination of the `KEY=V1,V2,...` specs, the first key varying slowest: [{key: value}]."""
  axes = []
  for spec in grids:
    key, values = _split_spec(spec)
    check(key not in dict(axes), key, "is swept twice; give all its values in one --grid.")
    axes.append((key, [parse_value(config, key, text) for text in values.split(",")]))
  keys = [key for key, _ in axes]
  return [dict(zip(keys, combination)) for combination in itertools.product(*(values for _, values in axes))]


def _round(value: float) -> float:
  return float(f"{value:.3g}")


def random_points(config, specs: list[str], budget: int, seed: int = 0) -> list[dict]:
  """`budget` points drawn independently from `KEY=uniform:LO:HI`, `KEY=loguniform:LO:HI` or `KEY=choice:A,B,..`
  specs (an int field draws integers; floats keep 3 significant digits); the same for the same seed."""
  check(budget > 0, "budget", f"a random search needs --budget > 0, got {budget}.")
  rng = np.random.default_rng(seed)
  draws = []
  for spec in specs:
    key, text = _split_spec(spec)
    distribution, _, args = text.partition(":")
    check(distribution in DISTRIBUTIONS, key, f"{distribution!r} is not one of {DISTRIBUTIONS} (KEY=DIST:ARGS).")
    if distribution == "choice":
      choices = [parse_value(config, key, value) for value in args.split(",")]
      draws.append((key, [choices[i] for i in rng.integers(len(choices), size=budget)]))
      continue
    bounds = args.split(":")
    check(len(bounds) == 2, key, f"{distribution} takes LO:HI, e.g. {distribution}:1e-4:1e-2; got {args!r}.")
    is_int = type(_field(config, key)) is int
    check(is_int or type(_field(config, key)) is float, key, f"{distribution} draws numbers; use choice:A,B,...")
    low, high = (float(parse_value(config, key, bound)) for bound in bounds)
    check(low < high and (distribution == "uniform" or low > 0), key, f"needs 0 < LO < HI (log) or LO < HI: {args!r}.")
    if distribution == "loguniform":
      values = np.exp(rng.uniform(math.log(low), math.log(high), size=budget))
    else:
      values = rng.uniform(low, high + (1 if is_int else 0), size=budget)  # an int field: LO..HI inclusive
    draws.append((key, [int(np.floor(v)) if is_int else _round(float(v)) for v in values]))
  return [{key: values[i] for key, values in draws} for i in range(budget)]


def _text(value) -> str:
  return repr(value) if isinstance(value, float) else str(value)


def point_name(point: dict) -> str:
  """A readable, stable directory name of a point: `learning_rate=0.0003,warmup_steps=50` (the last part of each
  key, the full key where two swept keys end alike)."""
  last = [key.rsplit(".", 1)[-1] for key in point]
  labels = [short if last.count(short) == 1 else key for key, short in zip(point, last)]
  return ",".join(f"{label}={_text(value)}".replace("/", "_") for label, value in zip(labels, point.values()))


# ------------------------------------------------------------------------------------------------ metrics


def read_metric(workdir: str, metric: str, mode: str) -> float | None:
  """The point's value of `metric` (see the module docstring), None if the run has not logged it."""
  split, _, name = metric.partition("/")
  if split == "test":
    path = os.path.join(workdir, "eval", "report.json")
    if not os.path.exists(path):
      return None
    with open(path) as f:
      value = json.load(f)["metrics"].get(name)
    return None if value is None else float(value)
  values = [row[name] for row in read_rows(workdir, split) if name in row and math.isfinite(row[name])]
  if not values:
    return None
  return max(values) if mode == "max" else min(values)


# ------------------------------------------------------------------------------------------------ running


def _command(config_path: str, workdir: str, overrides: list[str], point: dict) -> list[str]:
  point_flags = [f"--config.{key}={_text(value)}" for key, value in point.items()]
  return [
    sys.executable,
    "-m",
    "jaxlm.main",
    f"--config={config_path}",
    f"--workdir={workdir}",
    *overrides,
    *point_flags,
  ]


def _tail(path: str, lines: int = LOG_TAIL_LINES) -> str:
  with open(path, errors="replace") as f:
    return "".join(f.readlines()[-lines:])


def run_sweep(
  config_path: str,
  sweepdir: str,
  points: list[dict],
  overrides: list[str] = (),
  metric: str = "eval/accuracy",
  mode: str = "max",
  parallel: int = 1,
  env: dict | None = None,
) -> dict:
  """Trains every point not yet done (see the module docstring); returns results.json's content."""
  check(mode in MODES, "mode", f"{mode!r} is not one of {MODES}.")
  check(parallel > 0, "parallel", f"needs at least one process, got {parallel}.")
  check("/" in metric, "metric", f"{metric!r} is not SPLIT/NAME, e.g. eval/accuracy or test/macro_f1.")
  names = [point_name(point) for point in points]
  check(len(set(names)) == len(names), "grid", f"the sweep has repeated points: {names}.")
  os.makedirs(os.path.join(sweepdir, "logs"), exist_ok=True)
  previous = {}
  if os.path.exists(os.path.join(sweepdir, "results.json")):
    with open(os.path.join(sweepdir, "results.json")) as f:
      previous = {row["name"]: row for row in json.load(f)["points"]}
  rows = []
  for name, point in zip(names, points):
    row = previous.get(name)
    if not (row and row["status"] == "done"):
      row = dict(name=name, workdir=os.path.join(sweepdir, name), overrides=point, status="pending")
    rows.append(row)
  header = dict(config=config_path, overrides=list(overrides), metric=metric, mode=mode, keys=list(points[0]))
  # Children import the jaxlm this sweep runs (a checkout that is not installed included).
  package_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  child_env = {**os.environ, **(env or {})}
  child_env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, child_env.get("PYTHONPATH")]))

  waiting = [row for row in rows if row["status"] != "done"]
  running = []  # (row, process, log file, start time)
  try:
    while waiting or running:
      while waiting and len(running) < parallel:
        row = waiting.pop(0)
        log = open(os.path.join(sweepdir, "logs", f"{row['name']}.log"), "a")
        command = _command(config_path, row["workdir"], list(overrides), row["overrides"])
        log.write(" ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_env)
        row["status"] = "running"
        running.append((row, process, log, time.time()))
        write_results(sweepdir, header, rows)
      time.sleep(0.2)
      for entry in [entry for entry in running if entry[1].poll() is not None]:
        row, process, log, start = entry
        running.remove(entry)
        log.close()
        row.update(
          status="done" if process.returncode == 0 else "failed",
          returncode=process.returncode,
          seconds=round(time.time() - start, 1),
        )
        if process.returncode:
          row["log_tail"] = _tail(log.name)
        write_results(sweepdir, header, rows)
  finally:  # interrupted: the children save a checkpoint on SIGTERM, so the next sweep resumes them
    for _, process, log, _ in running:
      process.terminate()
      process.wait()
      log.close()
  return write_results(sweepdir, header, rows)


# ------------------------------------------------------------------------------------------------ results


def write_results(sweepdir: str, header: dict, rows: list[dict]) -> dict:
  """Reads each point's metric and steps, picks the best done point, and writes results.json, results.md and
  results.png (atomically replaced, so an interrupted sweep leaves a readable table)."""
  for row in rows:
    row["metric"] = read_metric(row["workdir"], header["metric"], header["mode"])
    row["steps"] = max((r["step"] for r in read_rows(row["workdir"], "train")), default=0)
  scored = [row for row in rows if row["status"] == "done" and row["metric"] is not None]
  pick = max if header["mode"] == "max" else min
  best = pick(scored, key=lambda row: row["metric"])["name"] if scored else None
  results = {**header, "best": best, "points": rows}
  _atomic_write(os.path.join(sweepdir, "results.json"), json.dumps(results, indent=2))
  _atomic_write(os.path.join(sweepdir, "results.md"), markdown(results))
  if scored:
    plot(results, os.path.join(sweepdir, "results.png"))
  return results


def _atomic_write(path: str, text: str) -> None:
  with open(path + ".tmp", "w") as f:
    f.write(text)
  os.replace(path + ".tmp", path)


def markdown(results: dict) -> str:
  """The results as a Markdown table, best point marked."""
  keys, metric = results["keys"], results["metric"]
  lines = [
    f"# Sweep of {results['config']} {' '.join(results['overrides'])}".rstrip(),
    "",
    f"Best by {metric} ({results['mode']}): {results['best'] or 'none yet'}",
    "",
    "| " + " | ".join([*keys, metric, "steps", "status"]) + " |",
    "|" + "---|" * (len(keys) + 3),
  ]
  for row in results["points"]:
    value = "" if row["metric"] is None else f"{row['metric']:.4f}"
    if row["name"] == results["best"]:
      value = f"**{value}**"
    status = row["status"] + (f" (exit {row['returncode']})" if row["status"] == "failed" else "")
    cells = [_text(row["overrides"][key]) for key in keys] + [value, str(row["steps"]), status]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> None:
  """The metric of the done points over the first swept key, a line per value of the second (log x for a
  positive numeric key spanning more than 10x)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  keys = results["keys"]
  done = [row for row in results["points"] if row["status"] == "done" and row["metric"] is not None]
  series = {}
  for row in done:
    label = f"{keys[1]}={_text(row['overrides'][keys[1]])}" if len(keys) > 1 else None
    series.setdefault(label, []).append((row["overrides"][keys[0]], row["metric"]))
  figure, axis = plt.subplots(figsize=(6, 4))
  for label, values in series.items():
    values.sort(key=lambda pair: pair[0])
    axis.plot([x for x, _ in values], [y for _, y in values], marker="o", label=label)
  xs = [row["overrides"][keys[0]] for row in done]
  if all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs):
    if min(xs) > 0 and max(xs) > 10 * min(xs):
      axis.set_xscale("log")
    axis.set_xticks(sorted(set(xs)), [_text(x) for x in sorted(set(xs))], minor=False)
    axis.set_xticks([], minor=True)
  axis.set_xlabel(keys[0])
  axis.set_ylabel(results["metric"])
  axis.set_title(f"{os.path.basename(results['config'])}: best {results['best']}", fontsize=9)
  if len(keys) > 1:
    axis.legend()
  axis.grid(alpha=0.3)
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  plt.close(figure)
