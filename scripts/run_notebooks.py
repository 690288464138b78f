"""Executes the notebooks of colab/ top to bottom in their small setting (`SMALL = True`), on CPU.

  python scripts/run_notebooks.py            # run every notebook, report each one's time, write nothing
  python scripts/run_notebooks.py --write    # the same, then save the outputs into the .ipynb files

The one execution path for `tests/test_notebooks.py` (CI) and for the outputs committed with the notebooks.
Each notebook runs in a fresh kernel of this Python (a kernelspec bound to `sys.executable`, written to a
temporary directory, so an installed `python3` kernelspec of another interpreter never runs them), with its
folder as the working directory and this checkout's jaxlm first on PYTHONPATH. They run in `NOTEBOOKS` order and
share one directory (`JAXLM_NOTEBOOK_DIR`: the data and the runs), so the later ones reuse the tiny language
model quickstart.ipynb trains. The kernel's environment is set here, not inherited from the caller's JAX setup:
CPU only, `DEVICES` simulated devices (accelerators.ipynb shards over them).
"""

import argparse
import os
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COLAB = os.path.join(REPO, "colab")
NOTEBOOKS = (
  "quickstart.ipynb",
  "finetune_and_calibrate.ipynb",
  "prompted_calibration.ipynb",
  "pretrained_encoder.ipynb",
  "accelerators.ipynb",
)
DEVICES = 4
CELL_TIMEOUT_S = 600


def kernel_environment(notebook_dir: str, xla_flags: str = "") -> dict:
  """The environment of every notebook kernel (see the module docstring); `xla_flags` go after the device count
  (the tests pass their faster-compiling ones)."""
  env = {key: value for key, value in os.environ.items() if key not in ("XLA_FLAGS", "JAX_PLATFORMS")}
  return {
    **env,
    "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES} {xla_flags}".strip(),
    "JAX_PLATFORMS": "cpu",
    "JAXLM_NOTEBOOK_DIR": notebook_dir,
    "TQDM_DISABLE": "1",
    "PYTHONPATH": os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
  }


def execute(path: str, notebook_dir: str, kernel_dir: str, xla_flags: str = ""):
  """Runs the notebook at `path` in a fresh kernel; returns (the executed notebook, seconds). A cell error raises
  `nbclient.exceptions.CellExecutionError` with the cell's source and traceback."""
  import nbclient
  import nbformat
  from jupyter_client.kernelspec import KernelSpecManager
  from jupyter_client.manager import KernelManager

  notebook = nbformat.read(path, as_version=4)
  if not any(
    cell.cell_type == "code" and line.split("#")[0].strip() == "SMALL = True"
    for cell in notebook.cells
    for line in cell.source.splitlines()
  ):
    raise ValueError(f"{path}: no `SMALL = True` line; notebooks are committed (and run in CI) in the small setting.")
  manager = KernelManager(kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=[kernel_dir]))
  client = nbclient.NotebookClient(
    notebook,
    km=manager,
    timeout=CELL_TIMEOUT_S,
    record_timing=False,
    resources={"metadata": {"path": os.path.dirname(path)}},
  )
  start = time.perf_counter()
  client.execute(env=kernel_environment(notebook_dir, xla_flags))
  return notebook, time.perf_counter() - start


def run(names=NOTEBOOKS, notebook_dir: str | None = None, write: bool = False, xla_flags: str = "") -> dict:
  """Executes `names` (files of colab/) in order, sharing `notebook_dir` (default: a new temporary directory),
  with `xla_flags` added to the kernels' XLA_FLAGS; with `write`, saves each executed notebook over its file.
  Returns {name: seconds}."""
  import nbformat
  from ipykernel.kernelspec import write_kernel_spec

  seconds = {}
  with tempfile.TemporaryDirectory() as kernel_dir, tempfile.TemporaryDirectory() as scratch:
    write_kernel_spec(os.path.join(kernel_dir, "python3"))  # argv: [sys.executable, -m, ipykernel_launcher, ...]
    for name in names:
      path = os.path.join(COLAB, name)
      notebook, seconds[name] = execute(path, notebook_dir or scratch, kernel_dir, xla_flags)
      print(f"{name}: {seconds[name]:.1f} s", flush=True)
      if write:
        nbformat.write(notebook, path)
  return seconds


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("names", nargs="*", default=NOTEBOOKS, help="notebooks of colab/ to run, in order")
  parser.add_argument("--write", action="store_true", help="save the outputs into the notebooks")
  parser.add_argument("--notebook_dir", default=None, help="the notebooks' shared directory (default: temporary)")
  args = parser.parse_args()
  seconds = run(args.names, args.notebook_dir, args.write)
  print(f"total: {sum(seconds.values()):.1f} s")


if __name__ == "__main__":
  sys.exit(main())
