"""`jaxlm.compress` (scripts/compress.py) on the tiny run: a quantized (and pruned) workdir is smaller on disk,
loads as such, and evaluates and generates through the library seam and the CLI."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import run_cli
from jaxlm import Experiment, compress
from jaxlm.compression import pruning


@pytest.fixture(scope="module")
def int4_workdir(tiny_workdir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("compressed") / "int4")
  compress.compress(tiny_workdir, out, prune="2:4", quantize_scheme="int4-g8", report=False)
  return out


def test_quantized_pruned_workdir_is_smaller_and_loads_as_such(tiny_workdir, int4_workdir):
  record = json.load(open(os.path.join(int4_workdir, "compression.json")))
  assert record["checkpoint_bytes"] < record["source_checkpoint_bytes"]
  experiment = Experiment.from_workdir(int4_workdir)
  assert experiment.model_config.quantize == "int4-g8"
  params = experiment.load_params()
  kernel = params["layers"]["mlp"]["up"]["kernel"]
  assert kernel.dtype == jax.numpy.int4
  assert json.load(open(os.path.join(int4_workdir, "eval", "sparsity.json")))["total"] == pytest.approx(0.5)
  groups = np.moveaxis(np.asarray(kernel, np.int8), 1, -1).reshape(-1, 4)  # pruned zeros stay zero as integers
  assert ((groups != 0).sum(axis=1) <= 2).all()
  source = Experiment.from_workdir(tiny_workdir)
  original, compressed = (
    source.evaluate(source.load_params(), num_batches=1),
    experiment.evaluate(params, num_batches=1),
  )
  assert np.isfinite(compressed["loss"]) and compressed["loss"] != original["loss"]
  assert experiment.generate(params, ["def "], max_new_tokens=4)[0].text is not None


def test_magnitude_pruning_one_shot_keeps_the_largest(tiny_workdir, tmp_path):
  record = compress.compress(tiny_workdir, str(tmp_path / "p50"), prune="0.5", report=False)
  assert record["sparsity"]["total"] == pytest.approx(0.5, abs=1e-3)
  params = Experiment.from_workdir(str(tmp_path / "p50")).load_params()
  assert pruning.sparsity(params)["layers/mlp/up/kernel[0]"] == pytest.approx(0.5, abs=1e-3)


@pytest.mark.e2e
def test_cli_evaluates_and_generates_a_quantized_workdir(int4_workdir):
  run_cli("--mode=eval", f"--workdir={int4_workdir}", "--step=latest")
  result = run_cli("--mode=generate", f"--workdir={int4_workdir}", "--prompt=def ")
  assert result.returncode == 0


def test_a_failed_compression_leaves_no_output_and_the_corrected_rerun_writes_it(tiny_workdir, tmp_path):
  from jaxlm.errors import ConfigError

  out = str(tmp_path / "q")
  with pytest.raises(ConfigError, match="do not divide"):  # 7-weight groups fit no kernel of the tiny model
    compress.compress(tiny_workdir, out, quantize_scheme="int4-g7", report=False)
  assert os.listdir(tmp_path) == []  # neither OUT nor OUT.incomplete
  record = compress.compress(tiny_workdir, out, quantize_scheme="int8", report=False)
  assert os.listdir(tmp_path) == ["q"] and record == json.load(open(os.path.join(out, "compression.json")))
  assert Experiment.from_workdir(out).model_config.quantize == "int8"
