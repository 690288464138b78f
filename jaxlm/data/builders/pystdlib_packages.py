"""`pystdlib_packages`: standard-library functions labelled with their top-level package (text classification).

The offline sibling of 20 Newsgroups. Each example is the source of one
function or method (`stdlib_functions.functions_in`) from a file of one of the
`PACKAGES` below, labelled with that package. The 19 packages exist in every
Python from 3.10 on (no `distutils`/`lib2to3`, removed in 3.12/3.13; no
`tkinter`/`idlelib`, which some distributions ship separately; no `re`/`tomllib`,
packages only since 3.11; no `encodings`, whose codec modules are near copies
of one another). Files outside these packages are left out, and the build logs
how many.

Splits by file, stratified by package so that every class is trained on: the
files of a package, in the order of their path's SHA-256, are laid end to end
by function count; a file whose midpoint falls in the first 20% of its package's
functions is `test`, in the next 10% `validation`, else `train`. So no file
straddles two splits, each package's last file is in `train`, and the split is
the same on every machine with the same Python version.
"""

import collections
import hashlib

import tensorflow_datasets as tfds
from absl import logging

from jaxlm.data.builders import pystdlib_lm, stdlib_functions

PACKAGES = (
  "asyncio",
  "collections",
  "concurrent",
  "ctypes",
  "curses",
  "dbm",
  "email",
  "html",
  "http",
  "importlib",
  "json",
  "logging",
  "multiprocessing",
  "unittest",
  "urllib",
  "wsgiref",
  "xml",
  "xmlrpc",
  "zoneinfo",
)
TEST_FRACTION, VALIDATION_FRACTION = 0.2, 0.1


def stratified_splits(function_counts: dict[str, int]) -> dict[str, str]:
  """File path -> split, for the files of one package (see the module docstring)."""
  total = max(sum(function_counts.values()), 1)
  splits, before = {}, 0
  for path in sorted(function_counts, key=lambda p: hashlib.sha256(p.encode("utf-8")).hexdigest()):
    midpoint = (before + function_counts[path] / 2) / total
    before += function_counts[path]
    splits[path] = (
      "test"
      if midpoint < TEST_FRACTION
      else "validation"
      if midpoint < TEST_FRACTION + VALIDATION_FRACTION
      else "train"
    )
  return splits


class PystdlibPackages(tfds.core.GeneratorBasedBuilder):
  """Standard-library functions labelled with their top-level package."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = pystdlib_lm.interpreter_builder_configs()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "text": tfds.features.Text(),  # the function's source, dedented
          "label": tfds.features.ClassLabel(names=PACKAGES),  # its top-level package
          "path": tfds.features.Text(),  # file path relative to the standard library root
          "name": tfds.features.Text(),  # qualified name within the file
        }
      ),
      supervised_keys=("text", "label"),
      homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = stdlib_functions.library_files()
    selected = [f for f in files if f.split("/")[0] in PACKAGES and "/" in f]
    logging.info(
      "pystdlib_packages: %d files in %d packages; leaving out the %d files of other modules.",
      len(selected),
      len(PACKAGES),
      len(files) - len(selected),
    )
    missing = sorted(set(PACKAGES) - {f.split("/")[0] for f in selected})
    if missing:
      raise FileNotFoundError(
        f"The standard library at {pystdlib_lm.stdlib_root()} lacks the packages {missing}; "
        "pystdlib_packages needs a complete CPython 3.10+ installation."
      )
    functions = list(stdlib_functions.iter_functions(selected, "pystdlib_packages"))
    counts = collections.defaultdict(collections.Counter)  # package -> file -> functions
    for function in functions:
      counts[function.path.split("/")[0]][function.path] += 1
    split_of = {path: split for package in counts.values() for path, split in stratified_splits(package).items()}
    return {
      split: self._generate_examples([f for f in functions if split_of[f.path] == split])
      for split in stdlib_functions.SPLITS
    }

  def _generate_examples(self, functions: list[stdlib_functions.Function]):
    for function in functions:
      yield (
        f"{function.path}:{function.name}:{function.node.lineno}",
        {"text": function.source, "label": function.path.split("/")[0], "path": function.path, "name": function.name},
      )
