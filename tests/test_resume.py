"""Preemption and resumption of the real CLI: SIGTERM and kill -9, then the same command again.

A resumed run must continue with the same batches and produce exactly the
same losses as an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, cpu_env

pytestmark = pytest.mark.e2e

STEPS = 60


def command(workdir, data_dir):
  return [
    sys.executable,
    "-m",
    "jaxlm.main",
    "--config=experiments/quickstart.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    f"--config.train.steps={STEPS}",
    "--config.train.checkpoint_every=10",
    "--config.train.eval_every=20",
    "--config.sample.max_new_tokens=0",
  ]


def start(workdir, data_dir):
  env = cpu_env(2)
  return subprocess.Popen(
    command(workdir, data_dir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def finish(process, timeout=300):
  out, err = process.communicate(timeout=timeout)
  assert process.returncode == 0, err[-3000:]
  return err


def train_losses(workdir) -> dict[int, float]:
  """Step -> train loss; a step logged twice (re-run after a kill) keeps its last value."""
  losses = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    for line in open(path):
      row = json.loads(line)
      if row["split"] == "train":
        losses[row["step"]] = row["loss"]
  return losses


def wait_for(condition, process, timeout=300):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, "the run ended before it could be interrupted: " + process.stderr.read()[-2000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(data_dir, tokenizer, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("uninterrupted"))
  finish(start(workdir, data_dir))
  losses = train_losses(workdir)
  assert sorted(losses) == list(range(1, STEPS + 1))
  return losses


def finalized_checkpoints(workdir):
  directory = os.path.join(workdir, "checkpoints")
  return [int(d) for d in os.listdir(directory) if d.isdigit()] if os.path.isdir(directory) else []


def test_sigterm_saves_and_the_same_command_resumes_exactly(reference, data_dir, tmp_path):
  workdir = str(tmp_path)
  process = start(workdir, data_dir)
  wait_for(lambda: len(train_losses(workdir)) >= 3, process)
  process.send_signal(signal.SIGTERM)
  err = finish(process)
  assert "SIGTERM: saved the checkpoint at step" in err
  stopped_at = max(train_losses(workdir))
  assert stopped_at < STEPS and stopped_at in finalized_checkpoints(workdir)

  err = finish(start(workdir, data_dir))
  assert f"Resuming from the checkpoint at step {stopped_at}" in err
  assert train_losses(workdir) == reference  # every step, bit for bit


def test_kill_9_after_a_checkpoint_resumes_from_it_exactly(reference, data_dir, tmp_path):
  workdir = str(tmp_path)
  process = start(workdir, data_dir)
  wait_for(lambda: 10 in finalized_checkpoints(workdir), process)
  process.kill()
  process.communicate()
  latest = max(finalized_checkpoints(workdir))
  assert latest < STEPS

  err = finish(start(workdir, data_dir))
  assert f"Resuming from the checkpoint at step {latest}" in err
  assert train_losses(workdir) == reference
