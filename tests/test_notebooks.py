"""The notebooks of colab/: each runs top to bottom in its small setting on CPU (scripts/run_notebooks.py, the
path that also writes their committed outputs), and the library functions they call."""

import importlib.util
import os

import matplotlib
import numpy as np
import pytest

from conftest import REPO, TEST_XLA_FLAGS

spec = importlib.util.spec_from_file_location("run_notebooks", os.path.join(REPO, "scripts", "run_notebooks.py"))
run_notebooks = importlib.util.module_from_spec(spec)
spec.loader.exec_module(run_notebooks)


# Two independent groups, so that two xdist workers run them side by side: the first three share the tiny language
# model quickstart.ipynb trains; the encoder and accelerator notebooks need nothing from them.
NOTEBOOK_GROUPS = {
  "language_model": ("quickstart.ipynb", "finetune_and_calibrate.ipynb", "prompted_calibration.ipynb"),
  "encoder_and_mesh": ("pretrained_encoder.ipynb", "accelerators.ipynb"),
}


def test_the_groups_hold_every_notebook_once():
  assert sorted(sum(NOTEBOOK_GROUPS.values(), ())) == sorted(run_notebooks.NOTEBOOKS)


@pytest.mark.e2e
@pytest.mark.parametrize("group", sorted(NOTEBOOK_GROUPS))
def test_every_notebook_runs_top_to_bottom(group, tmp_path, data_dir, tokenizer):
  names = NOTEBOOK_GROUPS[group]
  # The notebooks' DATA_DIR is the session's built corpus and trained tokenizer (what they would build first).
  os.symlink(data_dir, tmp_path / "tensorflow_datasets")
  seconds = run_notebooks.run(
    names, notebook_dir=str(tmp_path), xla_flags=TEST_XLA_FLAGS
  )  # raises CellExecutionError on any cell error
  assert list(seconds) == list(names)
  if group == "language_model":  # trained once, reused by the two after it
    assert os.path.exists(tmp_path / "quickstart_small" / "config.json")


@pytest.mark.parametrize("name", run_notebooks.NOTEBOOKS)
def test_committed_notebooks_carry_a_small_run_with_its_plots(name):
  import nbformat

  notebook = nbformat.read(os.path.join(run_notebooks.COLAB, name), as_version=4)
  code = [cell for cell in notebook.cells if cell.cell_type == "code"]
  assert 'find_spec("jaxlm") is None' in code[0].source  # the install cell first, a no-op where jaxlm imports
  assert any(line.startswith("SMALL = True") for line in code[1].source.splitlines())
  outputs = [output for cell in code for output in cell.outputs]
  assert all(cell.execution_count for cell in code), "not executed top to bottom by scripts/run_notebooks.py"
  assert not [output for output in outputs if output.output_type == "error"]
  assert any("image/png" in output.get("data", {}) for output in outputs)


def test_notebook_kernels_run_on_cpu_with_this_checkout(tmp_path):
  env = run_notebooks.kernel_environment(str(tmp_path))
  assert env["JAX_PLATFORMS"] == "cpu" and env["JAXLM_NOTEBOOK_DIR"] == str(tmp_path)
  assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count={run_notebooks.DEVICES}"
  assert env["PYTHONPATH"].split(os.pathsep)[0] == REPO


def test_experiment_config_loads_a_file_of_experiments_locked():
  from jaxlm import configs

  config = configs.experiment_config("quickstart", "tiny")
  assert config.train.steps == 8 and config.model.embed_dim == 64
  assert configs.experiment_config("pretrain").model.embed_dim == 768  # get_config's own default (gpt2_124m)
  same = configs.experiment_config(os.path.join(REPO, "experiments", "quickstart.py"), "tiny")
  assert same.to_dict() == config.to_dict()
  with pytest.raises(AttributeError):
    config.train.stpes = 5  # locked: a typo is an error
  with pytest.raises(FileNotFoundError, match="experiments/ folder"):
    configs.experiment_config("no_such_experiment")


def test_class_names_of_a_built_in_corpus(tmp_path):
  from jaxlm.data import sources

  names = sources.class_names("pystdlib_packages", str(tmp_path))
  assert len(names) == 19 and names == sorted(names) and "json" in names
  with pytest.raises(Exception, match="label_field"):
    sources.class_names("pystdlib_packages", str(tmp_path), "text")


def test_reliability_figure_leaves_the_backend_alone():
  from jaxlm.evaluation import calibration, report

  backend = matplotlib.get_backend()
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(4), size=200)
  labels = rng.integers(0, 4, size=200)
  figure = report.reliability_figure({"a": probs, "b": np.full_like(probs, 0.25)}, labels, num_bins=10)
  assert matplotlib.get_backend() == backend
  assert len(figure.axes) == 4
  ece = float(calibration.expected_calibration_error(probs, labels, 10))
  assert figure.axes[0].get_title() == f"a\nECE = {ece:.4f}"


@pytest.mark.parametrize("score", ["lac", "aps"])
def test_split_conformal_against_numpy(score):
  from jaxlm.evaluation import conformal

  rng = np.random.default_rng(1)
  calibration_probs, test_probs = rng.dirichlet(np.ones(5), size=300), rng.dirichlet(np.ones(5), size=400)
  # Labels drawn from the probabilities (a calibrated model): the threshold falls inside, away from ties at 1.
  calibration_labels, test_labels = (
    (rng.random((len(p), 1)) > np.cumsum(p, 1)).sum(1) for p in (calibration_probs, test_probs)
  )
  result = conformal.split_conformal(calibration_probs, calibration_labels, test_probs, test_labels, 0.1, score)

  def scores(probs):  # NumPy reference of the LAC and (non-randomized) APS scores
    if score == "lac":
      return 1 - probs
    order = np.argsort(-probs, axis=1, kind="stable")
    sorted_probs = np.take_along_axis(probs, order, axis=1)
    out = np.empty_like(probs)
    np.put_along_axis(out, order, np.cumsum(sorted_probs, axis=1), axis=1)
    return out

  label_scores = np.sort(scores(calibration_probs)[np.arange(300), calibration_labels])
  threshold = label_scores[int(np.ceil(301 * 0.9)) - 1]
  sets = scores(test_probs) <= threshold
  assert result["threshold"] == pytest.approx(threshold, abs=1e-6)
  assert result["coverage"] == pytest.approx(sets[np.arange(400), test_labels].mean())
  assert result["mean_size"] == pytest.approx(sets.sum(1).mean())
  assert result["alpha"] == 0.1
