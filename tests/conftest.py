"""Test setup and the helpers the tests share.

8 simulated CPU devices (set before jax is imported); one built corpus and tokenizer per session; one tiny
trained workdir per session for the tests that only read a run; and the small helpers that build a tiny
model, a batch, a train step, or run the CLI. Test modules import the helpers with `from conftest import ...`
(pytest puts this directory on `sys.path`, for `pytest` and `python -m pytest` alike).
"""

import os
import shutil
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# XLA:CPU flags of every test process (this one, the xdist workers, and each CLI, notebook and benchmark
# subprocess through `cpu_env`): the tests run tiny programs a few steps each, so compiling dominates their time.
# LLVM's optimisation level 0 and XLA's older (elemental) fusion emitters compile the quickstart:tiny train and
# eval steps in 1.4 s instead of 4.3 s, for code that runs half as fast, which the tests barely run. The numbers
# are the same IEEE float32 arithmetic (XLA:CPU uses no fast-math), and every test that compares two runs compiles
# both with the same flags.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"


def xla_flags(devices: int) -> str:
  """XLA_FLAGS of a test process with `devices` simulated CPU devices."""
  return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}"


def cpu_env(devices: int = 2, **extra: str) -> dict:
  """The environment of a test subprocess: this one's, with `devices` CPU devices, this checkout's jaxlm first
  on PYTHONPATH (whatever its working directory or installed copy), and `extra` on top."""
  return {
    **os.environ,
    "XLA_FLAGS": xla_flags(devices),
    "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
    **extra,
  }


os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + xla_flags(8)).strip()


def pin_xdist_worker():
  """Runs this xdist worker (and every CLI, notebook and benchmark process it starts: they inherit it) on its own
  share of the cores: worker i of n on cores i, i + n, ... (one core each on this 2-core machine). Unpinned, both
  workers' XLA thread pools spread over both cores and oversubscribe them: 4 test files took 106 s pinned and
  109-118 s unpinned, with 5% less CPU time. Needs `os.sched_setaffinity` (Linux); elsewhere nothing changes."""
  worker, count = os.environ.get("PYTEST_XDIST_WORKER"), os.environ.get("PYTEST_XDIST_WORKER_COUNT")
  if worker and count and hasattr(os, "sched_setaffinity"):
    cores, index = sorted(os.sched_getaffinity(0)), int(worker.removeprefix("gw"))
    os.sched_setaffinity(0, cores[index :: int(count)] or [cores[index % len(cores)]])


pin_xdist_worker()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent XLA compilation cache for the whole test run, set before jax is imported: the xdist workers and
# every CLI and notebook subprocess inherit this environment, and they compile the same tiny programs over and over
# (a tiny CLI run spends about half its time compiling). The pytest process that starts first creates it (the
# workers inherit its environment) and removes it at the end.
_OWN_COMPILATION_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_COMPILATION_CACHE:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxlm-tests-xla-cache-")
  os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

import numpy as np  # noqa: E402
import pytest  # noqa: E402


def pytest_collection_modifyitems(items):
  """The end-to-end runs (`e2e`: up to a minute each) start first. xdist's `worksteal` (pyproject.toml) gives each
  worker half of this order and lets an idle worker take half of the other's queue, so the long runs start early
  and both workers end on short tests (the default `load` sent the first 46 tests, every e2e run among them, to
  one worker)."""
  items.sort(key=lambda item: item.get_closest_marker("e2e") is None)


def pytest_unconfigure(config):
  if _OWN_COMPILATION_CACHE:
    shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)


TINY_VOCAB = 512  # the vocabulary of the quickstart:tiny tokenizer
# A model of a few thousand parameters for unit tests of training pieces (batches of lm_batch fit it).
TINY_MODEL = dict(vocab_size=64, embed_dim=32, num_layers=2, num_heads=4, mlp_dim=64, max_len=16)


def tiny_model_config(**overrides):
  from jaxlm.models import ModelConfig

  return ModelConfig(**{**TINY_MODEL, **overrides})


def train_config(**overrides):
  """The default `train` section with `overrides`."""
  from jaxlm import configs

  config = configs.base_config().train
  config.update(overrides)
  return config


def experiment_config(name: str, arg: str | None = None):
  """`get_config(arg)` of experiments/NAME.py, as `--config=experiments/NAME.py:ARG` loads it (locked), on the
  first of the 8 simulated devices (`mesh.num_devices=1`): a tiny model runs ~20% faster on one device than split
  8 ways over 2 cores. A test of a multi-device mesh sets `config.mesh.num_devices = -1` with its mesh."""
  from jaxlm import configs

  config = configs.experiment_config(name, arg)
  config.mesh.num_devices = 1
  return config


def lm_batch(seed: int = 0, rows: int = 8, length: int = 16, vocab: int = 64) -> dict:
  """A packed language-model batch: two documents per row (10 + 6 tokens), row 3 ends in padding."""
  rng = np.random.default_rng(seed)
  split = length * 5 // 8
  segment_ids = np.repeat([[1] * split + [2] * (length - split)], rows, axis=0).astype(np.int32)
  segment_ids[3, length - 4 :] = 0
  positions = np.concatenate([np.arange(split), np.arange(length - split)])[None].repeat(rows, 0).astype(np.int32)
  return {
    "tokens": rng.integers(4, vocab, size=(rows, length)).astype(np.int32),
    "segment_ids": segment_ids,
    "positions": positions,
  }


def make_trainer(model, *, task=None, mesh=None, train=None, seed: int = 0, devices=None):
  """(state, jitted train step, mesh) of `model` for `task` (default: causal LM) with the real optimizer recipe
  of the `train` section (default: 10 steps at 1e-2, no warmup) on `mesh` over `devices` (default: the first
  device alone, as `experiment_config`; a given mesh without `devices` spans all of them)."""
  import jax
  from jaxlm import sharding
  from jaxlm.models import params as params_lib
  from jaxlm.tasks.causal_lm import CausalLm
  from jaxlm.training import optim, steps
  from jaxlm.training import state as state_lib

  task = task or CausalLm()
  train = train or train_config(steps=10, warmup_steps=0, learning_rate=1e-2)
  mesh = sharding.create_mesh(mesh or dict(data=-1, fsdp=1, tensor=1, num_devices=1), devices)
  optimizer, schedule, _ = optim.optimizer_for(train, task.new_params)
  _, shardings = state_lib.state_shardings(model, optimizer, mesh)
  state = state_lib.create_train_state(
    params_lib.init_params(model, jax.random.key(seed), mesh), optimizer, shardings, mesh
  )
  train_step = steps.jit_train_step(
    model=model,
    task=task,
    optimizer=optimizer,
    schedule=schedule,
    dropout_rng=jax.random.key(1),
    grad_accum_steps=train.grad_accum_steps,
    state_sharding=shardings,
    mesh=mesh,
  )
  return state, train_step, mesh


def run_cli(
  *args: str, devices: int = 2, check: bool = True, cwd: str = REPO, env: dict | None = None, timeout: int = 300
) -> subprocess.CompletedProcess:
  """`python -m jaxlm.main ARGS` in a subprocess with `devices` CPU devices (cwd: the repository), importing this
  checkout's jaxlm from any `cwd` (not an installed copy)."""
  process = subprocess.run(
    [sys.executable, "-m", "jaxlm.main", *args],
    cwd=cwd,
    env=cpu_env(devices, **(env or {})),
    capture_output=True,
    text=True,
    timeout=timeout,
  )
  if check:
    assert process.returncode == 0, process.stderr[-3000:]
  return process


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data directory holding the built `pystdlib_lm` corpus (built once per session)."""
  from jaxlm.data import sources

  directory = str(tmp_path_factory.mktemp("tfds"))
  sources.get_builder("pystdlib_lm", directory)
  return directory


@pytest.fixture(scope="session")
def tokenizer(data_dir):
  """The tiny tokenizer the `tiny` configs train, cached in `data_dir`."""
  import ml_collections
  from jaxlm.data import pipeline, sources

  data_config = ml_collections.ConfigDict(
    dict(tokenizer="", data_dir=data_dir, name="pystdlib_lm", text_field="text", vocab_size=TINY_VOCAB)
  )
  return pipeline.tokenizer_for(data_config, sources.get_source("pystdlib_lm", "train", data_dir))


@pytest.fixture(scope="session")
def tiny_workdir(data_dir, tokenizer, tmp_path_factory):
  """A finished quickstart:tiny run (4 steps; checkpoints at 2 and 4), for tests that only read a workdir."""
  from jaxlm import Experiment

  workdir = str(tmp_path_factory.mktemp("tiny_run"))
  config = experiment_config("quickstart", "tiny")
  config.data.data_dir = data_dir
  config.train.update(dict(steps=4, eval_every=2, checkpoint_every=2, keep_checkpoints=2))
  config.sample.max_new_tokens = 0
  Experiment.from_config(config, workdir).train()
  return workdir


@pytest.fixture(scope="session")
def tiny_classifier_workdir(data_dir, tiny_workdir, tmp_path_factory):
  """A finished finetune_packages:tiny run (3 steps from `tiny_workdir`, its test report written), for tests that
  read a fine-tuned classifier or copy it to calibrate or compress it."""
  from jaxlm import Experiment

  workdir = str(tmp_path_factory.mktemp("tiny_classifier"))
  config = experiment_config("finetune_packages", "tiny")
  config.data.data_dir, config.init_from = data_dir, tiny_workdir
  config.train.steps = 3
  Experiment.from_config(config, workdir).train()
  return workdir
