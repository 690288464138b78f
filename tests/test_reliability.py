"""Faults a real run meets, on the real CLI (tiny config, real subprocesses): NaN, kill -9, Ctrl-C, a second run,
a damaged checkpoint, a full disk, a changed config, relative and `~` workdirs, two processes told to stop, and
expected errors printed in a few lines."""

import glob
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import portpicker
import pytest

from conftest import REPO, cpu_env, run_cli
from test_resume import train_losses

pytestmark = pytest.mark.e2e

LOG_LINE = re.compile(r"^[IWEF]\d{4} ")  # an absl log line


def message_lines(stderr: str) -> list[str]:
  """What a person reads on stderr besides the log: the error message."""
  return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def tiny(workdir, data_dir, *extra) -> list[str]:
  return [
    "--config=experiments/quickstart.py:tiny",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    "--config.sample.max_new_tokens=0",
    *extra,
  ]


def start(*args, devices: int = 2, env: dict | None = None) -> subprocess.Popen:
  env = cpu_env(devices, **(env or {}))
  return subprocess.Popen(
    [sys.executable, "-m", "jaxlm.main", *args],
    cwd=REPO,
    env=env,
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )


def rows(workdir) -> list[dict]:
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.endswith("\n")]


def last_step(workdir) -> int:
  return max([row["step"] for row in rows(workdir)], default=0)


def wait_for(condition, process, timeout=240):
  deadline = time.time() + timeout
  while not condition():
    assert process.poll() is None, "the run ended first: " + process.stderr.read()[-2000:]
    assert time.time() < deadline, "timed out"
    time.sleep(0.01)


def checkpoints(workdir) -> list[int]:
  return sorted(int(name) for name in os.listdir(os.path.join(workdir, "checkpoints")) if name.isdigit())


def state_is_finite(state_dir) -> bool:
  """Every float of the saved train state (parameters and optimizer moments) is finite."""
  import jax
  import orbax.checkpoint as ocp

  checkpointer = ocp.PyTreeCheckpointer()
  metadata = checkpointer.metadata(state_dir).item_metadata
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
  state = checkpointer.restore(state_dir, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return all(np.isfinite(x).all() for x in jax.tree.leaves(state) if np.issubdtype(x.dtype, np.floating))


def file_digests(directory) -> dict:
  digests = {}
  for path in glob.glob(os.path.join(directory, "**"), recursive=True):
    if os.path.isfile(path):
      with open(path, "rb") as f:
        digests[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
  return digests


def test_a_nonfinite_update_is_never_saved_and_the_rerun_resumes_from_the_last_finite_checkpoint(
  data_dir, tokenizer, tmp_path
):
  args = tiny(
    tmp_path,
    data_dir,
    "--config.train.steps=6",
    "--config.train.learning_rate=1e9",
    "--config.train.checkpoint_every=1",
  )
  failed = run_cli(*args, check=False)
  assert failed.returncode == 1
  message = message_lines(failed.stderr)
  assert len(message) <= 3 and "were not finite" in message[0] and "skip_nonfinite_updates" in message[0], message
  saved = checkpoints(tmp_path)
  assert saved and max(saved) < 6
  assert all(state_is_finite(tmp_path / "checkpoints" / str(step) / "state") for step in saved)

  # Skipping instead (a resumable key): the same run resumes from the last finite checkpoint and counts the skips.
  resumed = run_cli(*args, "--config.train.skip_nonfinite_updates=True")
  assert f"Resuming from the checkpoint at step {max(saved)}" in resumed.stderr
  train_rows = [row for row in rows(tmp_path) if row["split"] == "train"]
  assert [row["step"] for row in train_rows] == list(range(1, 7))
  assert sum(row["skipped_updates"] for row in train_rows) > 0
  assert all(state_is_finite(tmp_path / "checkpoints" / str(step) / "state") for step in checkpoints(tmp_path))


def test_kill_9_ctrl_c_a_second_run_and_a_damaged_checkpoint_leave_one_consistent_run(data_dir, tokenizer, tmp_path):
  from jaxlm.training import workdir as workdir_lib

  workdir, steps = str(tmp_path), 40
  args = tiny(
    workdir,
    data_dir,
    f"--config.train.steps={steps}",
    "--config.train.checkpoint_every=5",
    "--config.train.eval_every=10",
    "--config.train.keep_checkpoints=2",
  )
  rng = np.random.default_rng(0)
  for _ in range(3):  # kill -9 at random steps, mid-save or not; each rerun resumes
    process = start(*args)
    target = last_step(workdir) + int(rng.integers(2, 9))
    wait_for(lambda: last_step(workdir) >= target, process)
    process.kill()
    process.communicate()

  # A second run on a workdir another process holds is refused, naming the holder (here: this test process).
  with workdir_lib.lock(workdir):
    refused = run_cli(*args, check=False)
  message = message_lines(refused.stderr)
  assert refused.returncode == 1 and len(message) <= 3 and f"pid {os.getpid()}" in message[0], message

  # Ctrl-C saves a checkpoint at once and the run stops cleanly.
  process = start(*args)
  target = last_step(workdir) + 3
  wait_for(lambda: last_step(workdir) >= target, process)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=120)
  assert process.returncode == 0, err[-2000:]
  stopped = int(re.search(r"SIGINT: saved the checkpoint at step (\d+)", err).group(1))
  assert stopped == checkpoints(workdir)[-1] == last_step(workdir) < steps

  # The latest checkpoint is damaged (a file deleted): the run warns, moves it aside and resumes from the one before,
  # with the very losses the damaged one had been reached with.
  latest, previous = checkpoints(workdir)[-1], checkpoints(workdir)[-2]
  before = train_losses(workdir)
  data_files = glob.glob(os.path.join(workdir, "checkpoints", str(latest), "state", "ocdbt.process_0", "d", "*"))
  os.remove(max(data_files, key=os.path.getsize))
  finished = run_cli(*args)
  assert f"The checkpoint at step {latest}" in finished.stderr and "does not restore" in finished.stderr
  assert f"Resuming from the checkpoint at step {previous}" in finished.stderr
  assert os.path.isdir(os.path.join(workdir, "checkpoints", f"{latest}.corrupt"))
  after = train_losses(workdir)
  assert all(after[step] == before[step] for step in range(previous + 1, latest + 1))

  # metrics.jsonl tells one run: every step once, increasing, per split.
  for split in ("train", "eval"):
    logged = [row["step"] for row in rows(workdir) if row["split"] == split]
    assert logged == sorted(set(logged)), (split, logged)
  assert sorted(after) == list(range(1, steps + 1))


def test_a_failed_run_leaves_a_finished_workdir_unchanged_and_says_why_in_a_few_lines(tiny_workdir, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_workdir, workdir)
  before = file_digests(workdir)
  # Train mode, with a relative --workdir (found, and named absolute in the message).
  changed = run_cli(
    f"--config={REPO}/experiments/workdir.py:run",
    "--workdir=run",
    "--config.model.num_layers=1",
    "--config.train.learning_rate=0.1",
    check=False,
    cwd=str(tmp_path),
  )
  message = message_lines(changed.stderr)
  assert changed.returncode == 1 and len(message) <= 8, message
  assert f"{workdir} holds checkpoints of a run with another config" in message[0]
  assert "model.num_layers: 2 in config.json, 1 now" in changed.stderr and "train.learning_rate" in changed.stderr
  after = file_digests(workdir)
  assert {name: after[name] for name in before} == before

  typo = run_cli(
    f"--config=experiments/workdir.py:{workdir}", f"--workdir={workdir}", "--config.train.stpes=3", check=False
  )
  message = message_lines(typo.stderr)
  assert typo.returncode == 1 and len(message) <= 3 and 'Did you mean "steps"' in typo.stderr, message


def test_every_mode_accepts_relative_and_home_workdirs(tiny_workdir, tmp_path):
  home = tmp_path / "home"
  shutil.copytree(tiny_workdir, home / "run")
  env = {"HOME": str(home)}
  generated = run_cli(
    "--mode=generate",
    "--workdir=~/run",
    "--prompt=def ",
    f"--config={REPO}/experiments/workdir.py:~/run",
    "--config.decode.max_new_tokens=4",
    env=env,
    cwd=str(tmp_path),
  )
  assert generated.stdout.count("\n") == 1
  planned = run_cli("--mode=plan", "--workdir=run", env=env, cwd=str(home))
  assert "MiB" in planned.stdout or "GiB" in planned.stdout
  # Train mode with a relative workdir: test_a_failed_run_leaves_a_finished_workdir_unchanged_and_says_why...


def test_a_full_disk_fails_at_the_save_with_a_clear_message_and_keeps_the_previous_checkpoint(tiny_workdir, tmp_path):
  disk = tmp_path / "disk"
  disk.mkdir()
  if (
    os.geteuid() != 0
    or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True).returncode
  ):
    pytest.skip("needs root and permission to mount a tmpfs")
  try:
    workdir = str(disk / "run")
    shutil.copytree(tiny_workdir, workdir)
    with open(disk / "ballast", "wb") as f:  # leaves 100 KiB: room for metrics, not for a checkpoint
      f.write(b"\0" * (shutil.disk_usage(disk).free - 100 * 1024))
    full = run_cli(
      f"--config=experiments/workdir.py:{workdir}", f"--workdir={workdir}", "--config.train.steps=6", check=False
    )
    assert full.returncode == 1, full.stderr[-3000:]
    message = next((line for line in message_lines(full.stderr) if line.startswith("jaxlm: CheckpointError")), None)
    assert message and "Traceback" not in full.stderr, full.stderr[-3000:]  # one message, no background noise
    assert f"Saving a checkpoint in {workdir}/checkpoints failed" in message and "MiB free" in message
    assert "(step 4)" in message
    os.remove(disk / "ballast")
    assert checkpoints(workdir) == [2, 4] and state_is_finite(os.path.join(workdir, "checkpoints", "4", "state"))
  finally:
    subprocess.run(["umount", str(disk)], check=True)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(data_dir, tokenizer, tmp_path):
  address = f"localhost:{portpicker.pick_unused_port()}"
  processes = [
    start(
      *tiny(
        tmp_path,
        data_dir,
        "--config.train.steps=400",
        "--config.train.checkpoint_every=1000",
        "--config.train.eval_every=0",
        "--config.data.num_streams=2",
        f"--coordinator_address={address}",
        "--num_processes=2",
        f"--process_id={index}",
      )
    )
    for index in range(2)
  ]
  try:
    wait_for(lambda: last_step(tmp_path) >= 3, processes[0])
    processes[1].send_signal(signal.SIGTERM)  # only one process is told
    errors = [process.communicate(timeout=120)[1] for process in processes]
  finally:
    for process in processes:
      if process.poll() is None:
        process.kill()
  assert [process.returncode for process in processes] == [0, 0], [err[-2000:] for err in errors]
  saved = [int(re.search(r"saved the checkpoint at step (\d+)", err).group(1)) for err in errors]
  assert saved[0] == saved[1] == checkpoints(tmp_path)[-1] < 400
  assert "SIGTERM: saved" in errors[1] and "another process" in errors[0]
