"""scripts/benchmark.py: the FLOP count, one CI-sized run against the PyTorch peer, sweep points and one CI-sized
sweep with its plot, and the decode variants."""

import importlib.util
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import pytest

from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models.transformer import Decoder
from conftest import REPO, cpu_env, experiment_config

spec = importlib.util.spec_from_file_location("benchmark", os.path.join(REPO, "scripts", "benchmark.py"))
benchmark = importlib.util.module_from_spec(spec)
spec.loader.exec_module(benchmark)


def test_flops_per_token_of_gpt2_124m():
  model_config = ModelConfig(**PRESETS["gpt2_124m"])
  params = jax.eval_shape(lambda: Decoder(model_config).init(jax.random.key(0), jax.numpy.zeros((1, 8), int)))
  params = nn.meta.unbox(params)
  # 12 layers x (4 D^2 attention + 2 D F MLP) + V D output projection; no position table, norms or biases.
  n = 12 * (4 * 768**2 + 2 * 768 * 3072) + 50304 * 768
  assert benchmark.matmul_params(params["params"]) == n == 123_568_128
  causal = benchmark.token_flops(model_config, params["params"], {"tokens": 1024})
  palm = benchmark.token_flops(model_config, params["params"], {"tokens": 1024}, causal_fraction=1)
  assert causal == {"tokens": 6 * n + 6 * 12 * 1024 * 768}
  assert palm == {"tokens": 6 * n + 12 * 12 * 1024 * 768}


def test_datasheet_peaks():
  assert benchmark.datasheet_peak("NVIDIA H100 80GB HBM3") == 989e12
  assert benchmark.datasheet_peak("NVIDIA H200") == 989e12
  assert benchmark.datasheet_peak("cpu") is None


@pytest.mark.e2e
def test_benchmark_runs_against_the_torch_peer():
  pytest.importorskip("transformers")
  out = subprocess.run(
    [
      sys.executable,
      "scripts/benchmark.py",
      "--config=experiments/quickstart.py:tiny",
      "--steps=2",
      "--warmup=1",
      "--repeats=1",
      "--min_repeat_s=0",
      "--peer=torch",
      "--nopeer_compile",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8 and result["mesh"]["data"] == 8  # the simulated devices of the test session
  for key in ("tokens_per_sec", "forward_tokens_per_sec", "measured_matmul_tflops", "compile_s", "peer_tokens_per_sec"):
    assert result[key] > 0, key
  # Every derived number follows from the measured step time and the model, computed here by hand for the
  # tiny config (D=64, L=2, 4 heads of 16, SwiGLU F=128, tied V=512, T=64): N = L (4 D^2 + 3 D F) + V D.
  tokens = result["batch_size"] * result["seq_len"]
  assert (result["batch_size"], result["seq_len"], result["params"]) == (8, 64, 115_008)
  assert result["tokens_per_sec"] == pytest.approx(tokens / result["step_time_s"])
  n, attention = 2 * (4 * 64 * 64 + 3 * 64 * 128) + 512 * 64, 2 * 64 * 4 * 16
  assert result["matmul_params"] == n
  assert result["model_tflops_per_sec"] == pytest.approx((6 * n + 6 * attention) * result["tokens_per_sec"] / 1e12)
  peak = result["peak_tflops_per_device"] * 1e12 * result["devices"]
  assert (
    result["peak_source"] == "measured matmul" and result["peak_tflops_per_device"] == result["measured_matmul_tflops"]
  )
  assert result["mfu"] == pytest.approx(result["model_tflops_per_sec"] * 1e12 / peak)
  assert result["mfu_palm"] == pytest.approx((6 * n + 12 * attention) * result["tokens_per_sec"] / peak)
  assert result["vs_peer"] == pytest.approx(result["tokens_per_sec"] / result["peer_tokens_per_sec"])
  assert "LlamaForCausalLM" in result["peer"]


@pytest.mark.e2e
def test_decode_benchmark_runs_against_the_torch_peer():
  out = subprocess.run(
    [
      sys.executable,
      "scripts/benchmark.py",
      "--config=experiments/quickstart.py:tiny",
      "--decode",
      "--decode_batch_sizes=2",
      "--prompt_len=8",
      "--new_tokens=4",
      "--repeats=1",
      "--peer=torch",
      "--torch_threads=1",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  ((row,), (peer,)) = result["jaxlm"], result["peer_rows"]
  assert row["batch"] == peer["batch"] == 2 and (result["prompt_len"], result["new_tokens"]) == (8, 4)
  assert row["prefill_ms"] > 0 and row["tokens_per_sec"] > 0 and peer["tokens_per_sec"] > 0
  assert result["vs_peer"]["2"] == pytest.approx(row["tokens_per_sec"] / peer["tokens_per_sec"])


def test_short_steps_are_timed_over_at_least_min_seconds():
  import time

  calls = []

  def step():  # about 2 ms
    calls.append(1)
    time.sleep(0.002)

  seconds = benchmark.time_steps(step, steps=2, warmup=1, repeats=3, synchronize=lambda: None, min_seconds=0.05)
  timed = len(calls) - 1 - 2  # less the warm-up step and the 2-step sizing run
  assert timed % 3 == 0 and 3 * 10 <= timed <= 3 * 25  # 3 repeats of ~50 ms / 2 ms steps, not of 2 steps
  assert 0.002 <= seconds < 0.004
  calls.clear()
  benchmark.time_steps(step, steps=2, warmup=0, repeats=3, synchronize=lambda: None)  # no minimum: as asked
  assert len(calls) == 3 * 2


def test_sweep_points_change_one_thing():
  config = experiment_config("quickstart", "tiny")
  longer = benchmark.sweep_config(config, "seq_len", "4096")
  assert longer.data.seq_len == 4096 and longer.model.max_len == 4096 and config.data.seq_len != 4096
  assert benchmark.sweep_config(config, "batch", "4").train.batch_size == 4
  bigger = benchmark.sweep_config(config, "model", "small")
  assert bigger.model.embed_dim == 192 and bigger.model.dtype == config.model.dtype
  assert bigger.data.seq_len == config.data.seq_len


def test_decode_variants_merge_lora_into_int8_kernels_and_keep_the_rest_in_the_compute_dtype():
  import jax
  import jax.numpy as jnp
  import numpy as np

  from jaxlm import Experiment

  config = experiment_config("quickstart", "tiny")
  config.model.update(dtype="bfloat16", lora_rank=4)
  experiment = Experiment.from_config(config)
  rng = np.random.default_rng(0)
  # Trained-looking adapters (B is zero at init), large enough that dropping them would change the logits.
  params = jax.tree_util.tree_map_with_path(
    lambda path, x: x + rng.normal(0, 0.3, x.shape).astype(x.dtype) if "lora_b" in jax.tree_util.keystr(path) else x,
    experiment.init_params(),
  )
  tokens = jnp.asarray(rng.integers(0, config.model.vocab_size, (2, 16)), jnp.int32)
  reference = experiment.model.apply({"params": params}, tokens).astype(jnp.float32)

  model_config, model, int8 = benchmark.decode_variant(experiment, params, "int8")
  assert (model_config.quantize, model_config.lora_rank, model_config.dtype) == ("int8", 0, "bfloat16")
  assert int8["layers"]["attention"]["query"]["kernel"].dtype == jnp.int8
  assert int8["token_embed"]["embedding"].dtype == jnp.bfloat16  # not a float32 master copy
  error = jnp.abs(model.apply({"params": int8}, tokens).astype(jnp.float32) - reference).max()
  assert error < 0.05 * jnp.abs(reference).max()  # int8 and bfloat16 rounding
  # The adapters are in the int8 kernels: without them the logits are much further off.
  no_adapters = jax.tree_util.tree_map_with_path(
    lambda path, x: jnp.zeros_like(x) if "lora_b" in jax.tree_util.keystr(path) else x, params
  )
  assert (
    jnp.abs(experiment.model.apply({"params": no_adapters}, tokens).astype(jnp.float32) - reference).max() > 4 * error
  )

  model_config, _, float32 = benchmark.decode_variant(experiment, params, "float32")
  assert model_config.dtype == model_config.param_dtype == "float32" and model_config.lora_rank == 4
  assert {x.dtype for x in jax.tree.leaves(float32)} == {jnp.dtype("float32")}


@pytest.mark.e2e
def test_a_batch_sweep_prints_a_line_per_point_and_writes_the_plot(tmp_path):
  plot = tmp_path / "sweep.png"
  out = subprocess.run(
    [
      sys.executable,
      "scripts/benchmark.py",
      "--config=experiments/quickstart.py:tiny",
      "--sweep=batch",
      "--sweep_points=8,16",
      "--steps=1",
      "--warmup=0",  # no untimed step: the timing must still wait for the first timed one
      "--repeats=1",
      "--min_repeat_s=0",
      f"--plot={plot}",
    ],
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=600,
    env=cpu_env(1),
  )
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [row["point"] for row in rows[:2]] == ["8", "16"] and rows[1]["batch_size"] == 16
  for row in rows[:2]:
    assert row["tokens_per_sec"] > 0 and row["mfu"] > 0 and row["compiled_memory_gib"] > 0
  assert rows[2]["plot"] == str(plot) and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
