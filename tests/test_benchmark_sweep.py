"""scripts/benchmark.py: sweep points, one CI-sized sweep with its plot, and the decode variants' rows."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, experiment_config

spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "scripts", "benchmark.py"))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_sweep_points_change_one_thing():
  config = experiment_config("quickstart", "tiny")
  longer = benchmark.sweep_config(config, "seq_len", "4096")
  assert longer.data.seq_len == 4096 and longer.model.max_len == 4096 and config.data.seq_len != 4096
  assert benchmark.sweep_config(config, "batch", "4").train.batch_size == 4
  bigger = benchmark.sweep_config(config, "model", "small")
  assert bigger.model.embed_dim == 192 and bigger.model.dtype == config.model.dtype
  assert bigger.data.seq_len == config.data.seq_len


def test_decode_variants():
  from jaxlm.models.config import ModelConfig
  model_config = ModelConfig(dtype="bfloat16")
  assert benchmark.decode_variant(model_config, "int8").quantize == "int8"
  assert benchmark.decode_variant(model_config, "int8").dtype == "bfloat16"
  assert benchmark.decode_variant(model_config, "float32").param_dtype == "float32"


@pytest.mark.e2e
def test_a_batch_sweep_prints_a_line_per_point_and_writes_the_plot(tmp_path):
  plot = tmp_path / "sweep.png"
  out = subprocess.run([sys.executable, "scripts/benchmark.py", "--config=experiments/quickstart.py:tiny",
                        "--sweep=batch", "--sweep_points=8,16", "--steps=1", "--warmup=0", "--repeats=1",
                        f"--plot={plot}"], cwd=REPO, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "XLA_FLAGS": ""})
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [row["point"] for row in rows[:2]] == ["8", "16"] and rows[1]["batch_size"] == 16
  for row in rows[:2]:
    assert row["tokens_per_sec"] > 0 and row["mfu"] > 0 and row["compiled_memory_gib"] > 0
  assert rows[2]["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
