"""Function definitions of the standard library: the shared source of `pystdlib_packages` and `pystdlib_docstrings`.

Walks the same files as `pystdlib_lm` (test directories left out: they are
mostly fixtures), parses each with `ast` and yields every function and method
that is not nested in another function, dedented, with its docstring node.

Splits are fixed by the SHA-256 bucket of the file path (`pystdlib_lm.bucket_of`),
so no file straddles two splits: buckets [0, test_percent) are `test`, the next
`validation_percent` are `validation`, the rest `train`. With test_percent=5 the
test files are exactly `pystdlib_lm`'s validation split, never seen by a model
pretrained on `pystdlib_lm`.
"""

import ast
import dataclasses
import pathlib

from absl import logging

from jaxlm.data.builders import pystdlib_lm

SPLITS = ("train", "validation", "test")
_TEST_DIRS = {"test", "tests", "idle_test"}


def split_of(relative_path: str, test_percent: int, validation_percent: int) -> str:
  """'test', 'validation' or 'train', from the path's bucket (see the module docstring)."""
  bucket = pystdlib_lm.bucket_of(relative_path)
  if bucket < test_percent:
    return "test"
  return "validation" if bucket < test_percent + validation_percent else "train"


@dataclasses.dataclass(frozen=True)
class Function:
  path: str  # file path relative to the standard library root
  name: str  # qualified name within the file, e.g. "Parser.parse"
  source: str  # source from `def` to the end of the body (decorators excluded), less the `def`'s indentation
  node: ast.FunctionDef | ast.AsyncFunctionDef  # its syntax tree (line numbers relative to the file)


def library_files() -> list[str]:
  """Standard-library `.py` files outside test directories (relative paths, sorted)."""
  return [
    f for f in pystdlib_lm.stdlib_python_files(pystdlib_lm.stdlib_root()) if not _TEST_DIRS & set(f.split("/")[:-1])
  ]


def dedent(line: str, indent: int) -> str:
  """`line` without the `def`'s indentation; a line indented less (inside a string literal) is kept whole."""
  return line[indent:] if not line[:indent].strip() else line


def functions_in(relative_path: str, text: str) -> list[Function]:
  """Module-level functions and methods (of classes at any depth), not functions nested in functions."""
  lines = text.splitlines()
  found = []

  def visit(body, prefix):
    for node in body:
      if isinstance(node, ast.ClassDef):
        visit(node.body, f"{prefix}{node.name}.")
      elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        source = "\n".join(dedent(line, node.col_offset) for line in lines[node.lineno - 1 : node.end_lineno])
        found.append(Function(relative_path, prefix + node.name, source, node))

  visit(ast.parse(text).body, "")
  return found


def iter_functions(relative_paths: list[str], corpus: str):
  """Functions of the given files, in file order; undecodable or unparsable files are logged and left out."""
  root = pystdlib_lm.stdlib_root()
  for relative_path in relative_paths:
    text = pystdlib_lm.read_python_source(pathlib.Path(root, relative_path))
    if text is None:
      logging.warning("%s: leaving out %s (cannot be decoded in its declared encoding).", corpus, relative_path)
      continue
    try:
      functions = functions_in(relative_path, text)
    except SyntaxError as error:
      logging.warning("%s: leaving out %s (does not parse: %s).", corpus, relative_path, error)
      continue
    yield from functions
