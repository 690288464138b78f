"""`pystdlib_docstrings`: function signature and body -> the first line of its docstring (seq2seq SFT).

Each example is one standard-library function or method with a docstring
(`stdlib_functions.functions_in`): `prompt` is its source with the docstring
removed, `target` the first line of the docstring. Left out, with counts in
the build log: functions without a docstring, one-liners whose docstring
shares the `def` line, and functions whose only statement is the docstring.
Splits by file path (`stdlib_functions.split_of`): the test files are exactly
`pystdlib_lm`'s validation split (5%), so a model pretrained there has never
seen a test function or its docstring; 5% validation, 90% train.
"""

import ast
import collections

import tensorflow_datasets as tfds
from absl import logging

from jaxlm.data.builders import pystdlib_lm, stdlib_functions

TEST_PERCENT, VALIDATION_PERCENT = pystdlib_lm.VALIDATION_PERCENT, 5


def prompt_and_target(function: stdlib_functions.Function) -> tuple[str, str] | str:
  """(prompt, target), or the reason the function is left out."""
  node = function.node
  docstring = ast.get_docstring(node)
  if not docstring or not docstring.strip():
    return "no docstring"
  first = node.body[0]
  if first.lineno == node.lineno:
    return "docstring on the def line"
  if len(node.body) == 1:
    return "docstring is the whole body"
  lines = function.source.splitlines()
  start, end = first.lineno - node.lineno, first.end_lineno - node.lineno + 1  # docstring lines in `source`
  prompt = "\n".join(lines[:start] + lines[end:])
  target = next(line.strip() for line in docstring.splitlines() if line.strip())
  return prompt, target


class PystdlibDocstrings(tfds.core.GeneratorBasedBuilder):
  """Standard-library functions (docstring removed) paired with the first line of their docstring."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = pystdlib_lm.interpreter_builder_configs()

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      description=__doc__,
      features=tfds.features.FeaturesDict(
        {
          "prompt": tfds.features.Text(),  # signature and body, docstring removed, dedented
          "target": tfds.features.Text(),  # first non-empty line of the docstring
          "path": tfds.features.Text(),  # file path relative to the standard library root
          "name": tfds.features.Text(),  # qualified name within the file
        }
      ),
      supervised_keys=("prompt", "target"),
      homepage="https://docs.python.org/3/library/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    files = stdlib_functions.library_files()
    split_of = {f: stdlib_functions.split_of(f, TEST_PERCENT, VALIDATION_PERCENT) for f in files}
    return {
      split: self._generate_examples(split, [f for f in files if split_of[f] == split])
      for split in stdlib_functions.SPLITS
    }

  def _generate_examples(self, split: str, relative_paths: list[str]):
    left_out = collections.Counter()
    for function in stdlib_functions.iter_functions(relative_paths, "pystdlib_docstrings"):
      pair = prompt_and_target(function)
      if isinstance(pair, str):
        left_out[pair] += 1
        continue
      yield (
        f"{function.path}:{function.name}:{function.node.lineno}",
        {"prompt": pair[0], "target": pair[1], "path": function.path, "name": function.name},
      )
    logging.info("pystdlib_docstrings %s: left out %s.", split, dict(left_out))
