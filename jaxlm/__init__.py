"""jaxlm: a JAX/Flax research framework for language models.

The names a notebook needs, imported lazily (so `import jaxlm` stays light):

    import jaxlm
    experiment = jaxlm.Experiment.from_workdir("runs/quickstart")   # or .from_config(config, workdir)
    params = experiment.load_params("best")
    jaxlm.models.Decoder, jaxlm.models.ModelConfig, jaxlm.models.PRESETS
    jaxlm.evaluation.TemperatureScaling, jaxlm.evaluation.expected_calibration_error, ...
"""

import importlib

_NAMES = {
  "Experiment": "jaxlm.experiment",
  "Predictions": "jaxlm.experiment",
  "load_params": "jaxlm.experiment",
  "base_config": "jaxlm.configs",
  "ConfigError": "jaxlm.errors",
  "CheckpointError": "jaxlm.errors",
}
_SUBMODULES = (
  "calibrate",
  "compress",
  "compression",
  "configs",
  "data",
  "ensemble",
  "errors",
  "evaluation",
  "experiment",
  "inference",
  "interop",
  "models",
  "plan",
  "sharding",
  "sweep",
  "tasks",
  "training",
)

__all__ = sorted([*_NAMES, *_SUBMODULES])


def __getattr__(name: str):
  if name in _NAMES:
    return getattr(importlib.import_module(_NAMES[name]), name)
  if name in _SUBMODULES:
    return importlib.import_module(f"jaxlm.{name}")
  raise AttributeError(f"module 'jaxlm' has no attribute {name!r}")


def __dir__():
  return __all__
