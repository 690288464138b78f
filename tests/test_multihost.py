"""Multi-host: two processes on this CPU host (localhost coordinator, gloo collectives) train one model
together, and their losses match a single process with as many devices, fed the same global batches."""

import json
import os
import subprocess
import sys

import portpicker
import pytest

from conftest import REPO, cpu_env
from test_resume import train_losses

pytestmark = pytest.mark.e2e

STEPS = 6


def _command(workdir, data_dir, *extra):
  return [
    sys.executable,
    "-m",
    "jaxlm.main",
    "--config=experiments/quickstart.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    f"--config.train.steps={STEPS}",
    "--config.train.eval_every=3",
    "--config.train.checkpoint_every=3",
    "--config.data.num_streams=2",
    "--config.sample.max_new_tokens=4",
    *extra,
  ]


def _run_all(commands, devices_per_process: int):
  env = cpu_env(devices_per_process)
  processes = [
    subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for command in commands
  ]
  outputs = [process.communicate(timeout=400) for process in processes]
  for process, (_, err) in zip(processes, outputs):
    assert process.returncode == 0, err[-3000:]
  return [out for out, _ in outputs]


def test_two_processes_match_one_process(data_dir, tokenizer, tmp_path):
  single = tmp_path / "single"
  _run_all([_command(single, data_dir)], devices_per_process=4)

  multi = tmp_path / "multi"
  address = f"localhost:{portpicker.pick_unused_port()}"
  outputs = _run_all(
    [
      _command(multi, data_dir, f"--coordinator_address={address}", "--num_processes=2", f"--process_id={index}")
      for index in range(2)
    ],
    devices_per_process=2,
  )

  single_losses, multi_losses = train_losses(single), train_losses(multi)
  assert sorted(single_losses) == sorted(multi_losses) == list(range(1, STEPS + 1))
  for step, loss in single_losses.items():
    assert multi_losses[step] == pytest.approx(loss, rel=1e-5), step
  evals = [
    [json.loads(line) for line in open(workdir / "metrics.jsonl") if '"eval"' in line] for workdir in (single, multi)
  ]
  assert [row["loss"] for row in evals[1]] == pytest.approx([row["loss"] for row in evals[0]], rel=1e-5)

  # One checkpoint directory written by both processes together, with each process's data position.
  assert sorted(int(d) for d in os.listdir(multi / "checkpoints") if d.isdigit()) == [3, 6]
  data_files = os.listdir(multi / "checkpoints" / "6" / "data")
  assert len([name for name in data_files if "process" in name]) == 2, data_files
  # Only process 0 prints the sample.
  assert "greedy sample" in outputs[0] and "greedy sample" not in outputs[1]
