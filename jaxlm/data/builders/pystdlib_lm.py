"""`pystdlib_lm`: the running interpreter's standard library as a language-modelling corpus.

Every `.py` file under `sysconfig.get_paths()["stdlib"]` (third-party
`site-packages` / `dist-packages` excluded) is one document. Files are decoded
with the encoding they declare (PEP 263); files that cannot be decoded (a few
deliberately broken test fixtures) and empty files are left out, and the build
logs each one. The split is fixed by a hash of the file's path relative to
the standard library: 5% validation, the rest train, so that the same Python
version gives the same corpus on every machine. The builder config is named
after the interpreter (e.g. `python3.11`), so corpora of different Pythons
never mix in one data directory.
"""

import hashlib
import os
import pathlib
import sys
import sysconfig
import tokenize

import tensorflow_datasets as tfds
from absl import logging

VALIDATION_PERCENT = 5
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_root() -> pathlib.Path:
  return pathlib.Path(sysconfig.get_paths()["stdlib"])


def stdlib_python_files(root: pathlib.Path) -> list[str]:
  """Sorted paths (relative to `root`, '/'-separated) of the standard library's `.py` files."""
  paths = []
  for directory, subdirectories, files in os.walk(root):
    subdirectories[:] = sorted(d for d in subdirectories if d not in _EXCLUDED_DIRS)
    for name in files:
      if name.endswith(".py"):
        paths.append(pathlib.Path(directory, name).relative_to(root).as_posix())
  return sorted(paths)


def bucket_of(relative_path: str) -> int:
  """0..99, from the first 8 hex digits of the SHA-256 of the path (the same on every machine)."""
  return int(hashlib.sha256(relative_path.encode("utf-8")).hexdigest()[:8], 16) % 100


def split_of(relative_path: str, validation_percent: int = VALIDATION_PERCENT) -> str:
  """'validation' or 'train', from the path's bucket."""
  return "validation" if bucket_of(relative_path) < validation_percent else "train"


def read_python_source(path: pathlib.Path) -> str | None:
  """The file's text in its declared encoding, or None if it cannot be decoded."""
  try:
    with tokenize.open(path) as f:
      return f.read()
  except (SyntaxError, UnicodeDecodeError, LookupError):
    return None


def interpreter_builder_configs() -> list[tfds.core.BuilderConfig]:
  """The one builder config of every pystdlib corpus, named after the interpreter (e.g. `python3.11`)."""
  name = f"python{sys.version_info.major}.{sys.version_info.minor}"
  return [tfds.core.BuilderConfig(name=name, description=f"Standard library of Python {sys.version.split()[0]}.")]


class PystdlibLm(tfds.core.GeneratorBasedBuilder):
  """Python standard library source files, one document per file."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = interpreter_builder_configs()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),  # the file's source code
          "path": tfds.features.Text(),  # path relative to the standard library root
        }
      ),
      homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    root = stdlib_root()
    files = stdlib_python_files(root)
    if not files:
      raise FileNotFoundError(f"No .py files under the standard library root {root}.")
    return {
      split: self._generate_examples(root, [f for f in files if split_of(f) == split])
      for split in ("train", "validation")
    }

  def _generate_examples(self, root: pathlib.Path, relative_paths: list[str]):
    for relative_path in relative_paths:
      text = read_python_source(root / relative_path)
      if text is None:
        logging.warning("pystdlib_lm: leaving out %s (cannot be decoded in its declared encoding).", relative_path)
        continue
      if not text.strip():
        continue  # empty modules (mostly __init__.py) carry no text to model
      yield relative_path, {"text": text, "path": relative_path}
