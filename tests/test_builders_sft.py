"""The labelled built-in corpora: documented splits and labels, no file in two splits, docstring extraction."""

import ast
import collections
import hashlib

import pytest
import tensorflow_datasets as tfds

from jaxlm.data import sources
from jaxlm.data.builders import pystdlib_docstrings, pystdlib_lm, pystdlib_packages, stdlib_functions


def _records(name, data_dir):
  sources.get_builder(name, data_dir)
  return {
    split: [dict(r) for r in tfds.data_source(name, split=split, data_dir=data_dir)]
    for split in stdlib_functions.SPLITS
  }


def test_packages_splits_labels_and_disjoint_files(data_dir):
  records = _records("pystdlib_packages", data_dir)
  assert tfds.builder("pystdlib_packages", data_dir=data_dir).info.features["label"].names == list(
    pystdlib_packages.PACKAGES
  )
  paths = {split: {r["path"].decode() for r in rows} for split, rows in records.items()}
  assert not paths["train"] & paths["validation"] and not paths["train"] & paths["test"]
  assert not paths["validation"] & paths["test"]
  sizes = {split: len(rows) for split, rows in records.items()}
  assert sizes["train"] > 2 * sizes["test"] > 0 and sizes["validation"] > 0
  train_labels = collections.Counter(int(r["label"]) for r in records["train"])
  assert set(train_labels) == set(range(len(pystdlib_packages.PACKAGES)))  # every class is trained on
  for row in records["test"][:50]:
    assert row["path"].decode().split("/")[0] == pystdlib_packages.PACKAGES[int(row["label"])]
    assert row["text"].decode().lstrip().startswith(("def ", "async def "))


def test_stratified_split_is_by_file_and_keeps_the_last_file_in_train():
  counts = {"pkg/a.py": 10, "pkg/b.py": 10, "pkg/c.py": 60, "pkg/d.py": 20}
  splits = pystdlib_packages.stratified_splits(counts)
  assert splits == pystdlib_packages.stratified_splits(dict(reversed(counts.items())))  # order-free
  assert pystdlib_packages.stratified_splits({"pkg/only.py": 5}) == {"pkg/only.py": "train"}
  # The documented rule, recomputed: files in SHA-256 order laid end to end by function count; a file's
  # midpoint in the first 20% -> test, the next 10% -> validation, else train.
  order = sorted(counts, key=lambda p: hashlib.sha256(p.encode()).hexdigest())
  before, expected = 0, {}
  for path in order:
    midpoint = (before + counts[path] / 2) / sum(counts.values())
    before += counts[path]
    expected[path] = "test" if midpoint < 0.2 else "validation" if midpoint < 0.3 else "train"
  assert splits == expected and splits[order[-1]] == "train"
  # Many equal files: the split shares land on 20% / 10% / 70% of the functions.
  many = {f"pkg/m{i}.py": 3 for i in range(200)}
  shares = collections.Counter(pystdlib_packages.stratified_splits(many).values())
  assert (shares["test"], shares["validation"], shares["train"]) == (40, 20, 140)


def test_docstring_pairs_and_test_split_is_pystdlib_lm_validation(data_dir):
  records = _records("pystdlib_docstrings", data_dir)
  assert all(pystdlib_lm.split_of(r["path"].decode()) == "validation" for r in records["test"])
  for row in records["test"][:50]:
    prompt, target = row["prompt"].decode(), row["target"].decode()
    assert target and "\n" not in target and target == target.strip()
    (function,) = [node for node in ast.parse(prompt).body]  # the prompt is still one valid function
    body = function.body[0]
    # Its docstring is gone: the first statement is not a string constant, and the target is nowhere in it.
    assert not (
      isinstance(body, ast.Expr) and isinstance(body.value, ast.Constant) and isinstance(body.value.value, str)
    )
    assert target not in prompt


@pytest.mark.parametrize(
  "source, expected",
  [
    (
      'def f(x):\n    """Add one.\n\n    More.\n    """\n    return x + 1\n',
      ("def f(x):\n    return x + 1", "Add one."),
    ),
    ('def f():\n    """\n    Starts on line two.\n    """\n    pass\n', ("def f():\n    pass", "Starts on line two.")),
    ('def f(): "Same line."; return 1\n', "docstring on the def line"),
    ('def f():\n    "Only a docstring."\n', "docstring is the whole body"),
    ("def f():\n    return 1\n", "no docstring"),
  ],
)
def test_prompt_and_target(source, expected):
  (function,) = stdlib_functions.functions_in("m.py", source)
  assert pystdlib_docstrings.prompt_and_target(function) == expected


def test_functions_in_takes_methods_but_not_nested_functions():
  source = "def a():\n  def inner():\n    pass\nclass C:\n  class D:\n    async def b(self):\n      pass\n"
  assert [f.name for f in stdlib_functions.functions_in("m.py", source)] == ["a", "C.D.b"]
  assert stdlib_functions.functions_in("m.py", source)[1].source.startswith("async def b(self):")
