"""`--mode=generate` end to end: train the tiny quickstart through the CLI, then generate from its checkpoint."""

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.e2e

REPO = os.path.join(os.path.dirname(__file__), "..")


def cli(workdir, data_dir, *flags):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  command = [sys.executable, "-m", "jaxlm.main", "--config=experiments/quickstart.py:tiny", f"--workdir={workdir}",
             f"--config.data.data_dir={data_dir}", *flags]
  process = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert process.returncode == 0, process.stderr[-3000:]
  return process


def test_generate_prints_only_the_texts_to_stdout(data_dir, tokenizer, tmp_path):
  cli(tmp_path, data_dir, "--config.train.steps=4", "--config.sample.max_new_tokens=0")
  greedy = cli(tmp_path, data_dir, "--mode=generate", "--prompt=def ", "--prompt=import os\n",
               "--config.decode.max_new_tokens=12")
  assert "Restored the parameters at step 4" in greedy.stderr
  # Two texts, each printed with a newline (a 4-step model mostly continues with whitespace): nothing but text.
  assert greedy.stdout.endswith("\n") and greedy.stdout.count("\n") >= 2 and len(greedy.stdout) > 2
  assert "INFO" not in greedy.stdout and "step" not in greedy.stdout
  sampled = [cli(tmp_path, data_dir, "--mode=generate", "--prompt=def ", "--config.decode.strategy=sample",
                 "--config.decode.top_p=0.9", "--config.decode.dtype=bfloat16", "--config.decode.max_new_tokens=12")
             for _ in range(2)]
  assert sampled[0].stdout == sampled[1].stdout  # decode.seed fixes the key


def test_generate_without_a_checkpoint_names_the_fix(data_dir, tokenizer, tmp_path):
  env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
  process = subprocess.run([sys.executable, "-m", "jaxlm.main", "--config=experiments/quickstart.py:tiny",
                            f"--workdir={tmp_path}", f"--config.data.data_dir={data_dir}", "--mode=generate",
                            "--prompt=x"], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert process.returncode != 0
  assert "train first with --mode=train" in process.stderr
  assert process.stdout == ""
