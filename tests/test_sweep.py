"""Sweeps (`jaxlm.sweep`, scripts/sweep.py): grid expansion with values typed by their config field, random search
reproducible by its seed, and a sweep interrupted after one point that resumes without retraining it."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, experiment_config, xla_flags
from jaxlm import sweep
from jaxlm.errors import ConfigError


def test_grid_expands_every_combination_with_the_fields_types():
  config = experiment_config("quickstart", "tiny")
  points = sweep.grid_points(config, ["train.learning_rate=1e-4,3e-4,1e-3", "train.warmup_steps=50,100"])
  assert len(points) == 6
  assert points[0] == {"train.learning_rate": 1e-4, "train.warmup_steps": 50}
  assert points[1] == {"train.learning_rate": 1e-4, "train.warmup_steps": 100}  # the first key varies slowest
  assert points[-1] == {"train.learning_rate": 1e-3, "train.warmup_steps": 100}
  assert all(type(p["train.learning_rate"]) is float and type(p["train.warmup_steps"]) is int for p in points)
  assert [sweep.point_name(p) for p in points[:2]] == [
    "learning_rate=0.0001,warmup_steps=50",
    "learning_rate=0.0001,warmup_steps=100",
  ]
  assert sweep.parse_value(config, "model.fake_quantize", "int4") == "int4"
  assert sweep.parse_value(config, "train.skip_nonfinite_updates", "true") is True
  with pytest.raises(ConfigError, match="train.warmup_steps"):
    sweep.grid_points(config, ["train.warmup_steps=1.5"])
  with pytest.raises(ConfigError, match="train.learning_rte"):
    sweep.grid_points(config, ["train.learning_rte=1e-3"])
  with pytest.raises(ConfigError, match="KEY=VALUES"):
    sweep.grid_points(config, ["train.learning_rate"])


def test_random_search_is_reproducible_by_seed_and_within_bounds():
  config = experiment_config("quickstart", "tiny")
  specs = ["train.learning_rate=loguniform:1e-4:1e-2", "train.warmup_steps=uniform:0:20", "seed=choice:1,2,3"]
  points = sweep.random_points(config, specs, budget=8, seed=3)
  assert points == sweep.random_points(config, specs, budget=8, seed=3)
  assert points != sweep.random_points(config, specs, budget=8, seed=4)
  assert len({sweep.point_name(p) for p in points}) == 8
  for point in points:
    assert 1e-4 <= point["train.learning_rate"] <= 1e-2
    assert float(f"{point['train.learning_rate']:.3g}") == point["train.learning_rate"]  # the name is exact
    assert type(point["train.warmup_steps"]) is int and 0 <= point["train.warmup_steps"] <= 20
    assert point["seed"] in (1, 2, 3)
  with pytest.raises(ConfigError, match="train.learning_rate"):
    sweep.random_points(config, ["train.learning_rate=normal:0:1"], budget=2)


@pytest.mark.e2e
def test_an_interrupted_sweep_resumes_without_rerunning_finished_points(data_dir, tokenizer, tmp_path):
  sweepdir = str(tmp_path / "sweep")
  config_path = "experiments/quickstart.py:tiny"
  overrides = [
    f"--config.data.data_dir={data_dir}",
    "--config.train.steps=2",
    "--config.train.eval_every=2",
    "--config.train.checkpoint_every=2",
    "--config.sample.max_new_tokens=0",
  ]
  env = {"XLA_FLAGS": xla_flags(2), "JAX_PLATFORMS": "cpu"}
  first = {"train.learning_rate": 0.001}
  # The sweep stopped after its first point: only that point has run.
  os.chdir(REPO)
  results = sweep.run_sweep(config_path, sweepdir, [first], overrides, "eval/loss", "min", env=env)
  assert results["points"][0]["status"] == "done", results["points"][0]
  done_dir = os.path.join(sweepdir, sweep.point_name(first))
  stamps = {
    name: os.path.getmtime(os.path.join(done_dir, name)) for name in ("metrics.jsonl", "checkpoints", "config.json")
  }

  # The whole sweep: the finished point is not rerun; a failing point is recorded and does not stop the sweep.
  process = subprocess.run(
    [sys.executable, "scripts/sweep.py", f"--config={config_path}", f"--workdir={sweepdir}", *overrides,
     "--grid=train.learning_rate=1e-3,-1.0", "--metric=eval/loss", "--mode=min"],
    cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=300,
  )  # fmt: skip
  assert process.returncode == 1, process.stderr[-3000:]  # one point failed
  assert stamps == {name: os.path.getmtime(os.path.join(done_dir, name)) for name in stamps}
  results = json.load(open(os.path.join(sweepdir, "results.json")))
  done, failed = results["points"]
  assert done["name"] == "learning_rate=0.001" and done["status"] == "done" and done["steps"] == 2
  assert done["metric"] > 0 and results["best"] == done["name"]
  assert failed["status"] == "failed" and "train.learning_rate" in failed["log_tail"]
  table = open(os.path.join(sweepdir, "results.md")).read()
  assert "| 0.001 |" in table and "| -1.0 |" in table and "failed" in table
  assert os.path.getsize(os.path.join(sweepdir, "results.png")) > 0
