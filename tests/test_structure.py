"""The house's structure: imports point down the layers, no cycles, a light `import jaxlm`, a short notebook path."""

import ast
import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO

# Layers of the house (ARCHITECTURE.md), lowest first. A module may import its own package and lower layers.
LAYERS = [
  ("jaxlm.errors",),
  ("jaxlm.sharding", "jaxlm.runtime"),
  ("jaxlm.models", "jaxlm.data", "jaxlm.evaluation"),
  ("jaxlm.tasks", "jaxlm.inference", "jaxlm.interop", "jaxlm.compression"),
  ("jaxlm.training",),
  ("jaxlm.configs",),
  ("jaxlm.plan",),
  ("jaxlm.experiment",),
  ("jaxlm.calibrate", "jaxlm.ensemble", "jaxlm.compress", "jaxlm.sweep"),  # workflows on Experiments and runs
  ("jaxlm.main", "jaxlm"),  # `jaxlm/__init__.py` re-exports lazily from the top
]


def _unit(module: str) -> str:
  """The layer unit of a module: its package under jaxlm (jaxlm.models.layers -> jaxlm.models)."""
  for layer in LAYERS:
    for unit in sorted(layer, key=len, reverse=True):
      if module == unit or module.startswith(unit + ".") and unit != "jaxlm":
        return unit
  return "jaxlm"


def _layer(unit: str) -> int:
  return next(index for index, layer in enumerate(LAYERS) if unit in layer)


def _jaxlm_imports() -> dict[str, set[str]]:
  """module -> the jaxlm modules it imports (anywhere in the file, function-level imports included)."""
  graph = {}
  root = os.path.join(REPO, "jaxlm")
  for directory, _, files in os.walk(root):
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(directory, name)
      module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".").removesuffix(".__init__")
      imported = set()
      for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
          imported |= {alias.name for alias in node.names if alias.name.startswith("jaxlm")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("jaxlm"):
          imported |= {f"{node.module}.{alias.name}" for alias in node.names}
      graph[module] = imported
  return graph


def test_imports_point_down_the_layers():
  upward = []
  for module, imported in _jaxlm_imports().items():
    unit = _unit(module)
    for target in imported:
      target_unit = _unit(target)
      if target_unit != unit and _layer(target_unit) >= _layer(unit):
        upward.append(f"{module} ({unit}) imports {target} ({target_unit})")
  assert not upward, "\n".join(sorted(upward))


def test_no_import_cycles_between_modules():
  graph = _jaxlm_imports()
  modules = set(graph)
  # `from jaxlm.models import lora` names the module jaxlm.models.lora; `from x import function` names x.
  edges = {
    m: {t if t in modules else t.rsplit(".", 1)[0] for t in targets} & modules - {m} for m, targets in graph.items()
  }
  edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in edges.items()}  # a package's
  # own __init__ is imported first by Python anyway
  state = {}

  def visit(node, path):
    state[node] = "open"
    for target in sorted(edges[node]):
      if state.get(target) == "open":
        pytest.fail("import cycle: " + " -> ".join(path[path.index(target) :] + [target]))
      if target not in state:
        visit(target, path + [target])
    state[node] = "done"

  for module in sorted(modules):
    if module not in state:
      visit(module, [module])


def test_import_jaxlm_is_light():
  code = (
    "import sys, time; start = time.perf_counter(); import jaxlm; elapsed = time.perf_counter() - start; "
    "heavy = [m for m in ('jax', 'flax', 'orbax', 'grain', 'optax', 'sentencepiece', 'tensorflow_datasets') "
    "if m in sys.modules]; print(elapsed, heavy)"
  )
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
  elapsed, heavy = out.split(" ", 1)
  assert heavy.strip() == "[]"
  assert float(elapsed) < 1.0


def test_the_notebook_path_is_short(tiny_workdir):
  """Preset -> model -> init; a workdir's best params -> evaluate a split -> temperature on predict output:
  public names only, well under 15 lines."""
  import jax
  import jaxlm

  model = jaxlm.models.Decoder(jaxlm.models.ModelConfig(**jaxlm.models.PRESETS["tiny"]))
  params = jaxlm.models.init_params(model, jax.random.key(0))
  experiment = jaxlm.Experiment.from_workdir(tiny_workdir)
  best = experiment.load_params("best")
  metrics = experiment.evaluate(best, "validation")
  predictions = experiment.predict(best, "validation", num_batches=1)
  mask = predictions.weights > 0
  temperature = jaxlm.evaluation.TemperatureScaling().fit(predictions.logits[mask], predictions.labels[mask])

  assert params["token_embed"]["embedding"].shape == (512, 64)
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["token_accuracy"] <= 1
  assert predictions.logits.shape[:2] == predictions.labels.shape == predictions.weights.shape
  assert predictions.logits.shape[-1] == experiment.model_config.vocab_size
  calibrated = temperature(predictions.logits[mask])
  np.testing.assert_allclose(calibrated.sum(-1), 1.0, rtol=1e-6)
  labels = predictions.labels[mask]
  nll = lambda probs: -np.mean(np.log(probs[np.arange(len(labels)), labels]))
  assert nll(calibrated) <= nll(predictions.probabilities()[mask]) + 1e-9  # fitted on these very tokens
  # predict and evaluate agree: the mean NLL of the predicted targets is the evaluated loss on the same batch.
  one_batch = experiment.evaluate(best, "validation", num_batches=1)
  log_probs = (
    predictions.logits
    - np.log(np.exp(predictions.logits - predictions.logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - predictions.logits.max(-1, keepdims=True)
  )
  nll = -np.take_along_axis(log_probs, predictions.labels[..., None], -1)[..., 0]
  assert (nll * predictions.weights).sum() / predictions.weights.sum() == pytest.approx(one_batch["loss"], rel=1e-4)
