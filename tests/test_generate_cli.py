"""`--mode=generate` end to end: the CLI prints exactly what `Experiment.generate` returns, from a workdir alone
(relative paths, no --config, moved to another place with a fresh data directory)."""

import json
import os
import shutil

import pytest

from conftest import run_cli
from jaxlm import Experiment

pytestmark = pytest.mark.e2e

PROMPTS = ["def ", "import os\n"]


@pytest.fixture(scope="module")
def in_process(tiny_workdir):
  experiment = Experiment.from_workdir(tiny_workdir)
  return experiment, experiment.load_params()


@pytest.mark.parametrize(
  "overrides",
  [
    {"max_new_tokens": 12},
    {"strategy": "sample", "top_p": 0.9, "dtype": "bfloat16", "max_new_tokens": 12, "seed": 3},
    {"strategy": "beam", "beam_size": 3, "max_new_tokens": 6},
  ],
  ids=["greedy", "sample_top_p_bf16", "beam"],
)
def test_cli_prints_the_texts_of_experiment_generate(tiny_workdir, in_process, overrides):
  experiment, params = in_process
  expected = [result.text for result in experiment.generate(params, PROMPTS, **overrides)]
  # Same device count as this process (8): the same mesh, so the same numbers.
  flags = [f"--config.decode.{key}={value}" for key, value in overrides.items()]
  cli = run_cli(
    f"--config=experiments/workdir.py:{tiny_workdir}",
    f"--workdir={tiny_workdir}",
    "--mode=generate",
    *[f"--prompt={p}" for p in PROMPTS],
    *flags,
    devices=8,
  )
  assert cli.stdout == "".join(text + "\n" for text in expected)
  assert "Loaded the parameters of step 4" in cli.stderr


def test_a_moved_workdir_generates_from_a_relative_path_without_config(tiny_workdir, tmp_path):
  """Copy the run elsewhere, point its data directory at an empty one, and generate with a relative --workdir
  and no --config: config.json and tokenizer.model in the workdir are all it needs."""
  shutil.copytree(tiny_workdir, tmp_path / "moved")
  config_path = tmp_path / "moved" / "config.json"
  config = json.loads(config_path.read_text())
  config["data"]["data_dir"] = str(tmp_path / "empty_data_dir")
  config_path.write_text(json.dumps(config))
  original = run_cli(f"--workdir={tiny_workdir}", "--mode=generate", "--prompt=def ")
  moved = run_cli(
    "--workdir=moved",
    "--mode=generate",
    "--prompt=def ",
    cwd=str(tmp_path),
    env={"TFDS_DATA_DIR": str(tmp_path / "empty_data_dir")},
  )
  assert moved.stdout == original.stdout and moved.stdout.endswith("\n")
  assert not os.path.exists(tmp_path / "empty_data_dir")  # nothing was built or read there


def test_generate_without_a_checkpoint_names_the_fix(data_dir, tmp_path):
  process = run_cli(
    "--config=experiments/quickstart.py:tiny",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    "--mode=generate",
    "--prompt=x",
    check=False,
  )
  assert process.returncode != 0
  assert "train first (--mode=train with this --workdir)" in process.stderr
  assert process.stdout == ""


def test_a_mode_other_than_train_needs_a_workdir_with_config_json(tmp_path):
  process = run_cli(f"--workdir={tmp_path}", "--mode=generate", "--prompt=x", check=False)
  assert process.returncode != 0 and "is not a jaxlm workdir" in process.stderr
