"""Random-access data sources: the built-in local corpora and public TFDS datasets, one code path.

Every dataset is a TFDS builder read with `tfds.data_source` (array_record
files, no TensorFlow). Built-in corpora are built on first use; public ones
must already be prepared in the data directory (nothing is downloaded at run
time), and the error says how to prepare them.
"""

import contextlib
import importlib
import io

import tensorflow_datasets as tfds
from absl import logging

from jaxlm.errors import ConfigError

# Built-in corpora: TFDS name -> module that defines (and so registers) its builder.
BUILTIN_DATASETS = {
  "pystdlib_lm": "jaxlm.data.builders.pystdlib_lm",
  "pystdlib_packages": "jaxlm.data.builders.pystdlib_packages",
  "pystdlib_docstrings": "jaxlm.data.builders.pystdlib_docstrings",
}


def _base_name(name: str) -> str:
  """'glue/sst2:2.0.0' -> 'glue'."""
  return name.split(":")[0].split("/")[0]


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The prepared TFDS builder for `name`, building a built-in corpus on first use."""
  base = _base_name(name)
  if base in BUILTIN_DATASETS:
    importlib.import_module(BUILTIN_DATASETS[base])
    builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
    if not builder.is_prepared():
      logging.info(
        "Building the built-in corpus %s in %s (from this Python's standard library; nothing is downloaded)",
        name,
        builder.data_dir,
      )
      with contextlib.redirect_stdout(io.StringIO()):  # TFDS prints "Downloading and preparing dataset"
        builder.download_and_prepare(file_format="array_record")
    return builder

  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as error:
    raise ConfigError(
      f"data.name: unknown dataset {name!r}. Use a built-in corpus ({', '.join(sorted(BUILTIN_DATASETS))}) "
      "or a name from the TFDS catalog (https://www.tensorflow.org/datasets/catalog)."
    ) from error
  # The `tfds` command line (and most builders' preparation) imports TensorFlow, which jaxlm does not need.
  command = (
    f"pip install tensorflow tensorflow-datasets && tfds build {name} "
    f"--data_dir={data_dir or '~/tensorflow_datasets'} --file_format=array_record"
  )
  if not builder.is_prepared():
    raise FileNotFoundError(
      f"Dataset {name!r} is not prepared in {builder.data_dir}. jaxlm never downloads at run time: prepare it "
      f"once on a machine with internet, in an environment with TensorFlow (preparation needs it, training does "
      f"not): `{command}`; then copy the prepared directory into data.data_dir."
    )
  if builder.info.file_format != tfds.core.FileFormat.ARRAY_RECORD:
    raise ValueError(
      f"Dataset {name!r} in {builder.data_dir} is stored as {builder.info.file_format.value}; "
      f"random access needs array_record. Rebuild it with `{command}`."
    )
  return builder


def class_names(name: str, data_dir: str | None, label_field: str = "label") -> list[str]:
  """The class names of the ClassLabel feature `label_field` of dataset `name`, in label order."""
  feature = get_builder(name, data_dir).info.features[label_field]
  if not hasattr(feature, "names"):
    raise ConfigError(f"data.label_field: {label_field!r} of {name!r} is not a class label ({type(feature).__name__}).")
  return list(feature.names)


def get_source(name: str, split: str, data_dir: str | None):
  """A random-access source (`len`, `__getitem__` -> dict of features) for one split."""
  builder = get_builder(name, data_dir)
  if split not in builder.info.splits:
    raise ConfigError(f"Dataset {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}.")
  return builder.as_data_source(split=split)
