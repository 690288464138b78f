"""Built-in corpus, sources, tokenizer and packing pipeline."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from jaxlm.data import pipeline, sources
from jaxlm.data.builders import pystdlib_lm
from jaxlm.errors import ConfigError
from jaxlm.tasks import causal_lm


def test_split_is_a_fixed_function_of_the_path():
  files = pystdlib_lm.stdlib_python_files(pystdlib_lm.stdlib_root())
  splits = [pystdlib_lm.split_of(f) for f in files]
  assert splits == [pystdlib_lm.split_of(f) for f in files]
  fraction = splits.count("validation") / len(splits)
  assert 0.02 < fraction < 0.08
  # Pinned values: SHA-256 of the path (not Python's salted hash()) decides, identically on every machine.
  assert pystdlib_lm.split_of("json/decoder.py") == "train"
  validation = [f"module_{i}.py" for i in range(200) if pystdlib_lm.split_of(f"module_{i}.py") == "validation"]
  assert validation[:3] == ["module_83.py", "module_92.py", "module_102.py"]


def test_builder_is_deterministic_and_splits_are_disjoint(data_dir, tmp_path):
  first = {split: tfds.data_source("pystdlib_lm", split=split, data_dir=data_dir) for split in ("train", "validation")}
  rebuilt_dir = str(tmp_path / "again")
  sources.get_builder("pystdlib_lm", rebuilt_dir)
  second = {
    split: tfds.data_source("pystdlib_lm", split=split, data_dir=rebuilt_dir) for split in ("train", "validation")
  }
  for split in first:
    assert len(first[split]) == len(second[split]) > 0
    assert [first[split][i] for i in range(len(first[split]))] == [second[split][i] for i in range(len(second[split]))]
  train_paths = {first["train"][i]["path"] for i in range(len(first["train"]))}
  validation_paths = {first["validation"][i]["path"] for i in range(len(first["validation"]))}
  assert not train_paths & validation_paths
  assert all(pystdlib_lm.split_of(p.decode()) == "validation" for p in validation_paths)
  record = first["train"][0]
  assert record["text"].decode().strip() and record["path"].decode().endswith(".py")


def test_unknown_dataset_name_is_a_clear_error(tmp_path):
  with pytest.raises(ConfigError, match="unknown dataset 'no_such_corpus'"):
    sources.get_source("no_such_corpus", "train", str(tmp_path))


def test_public_dataset_that_is_not_prepared_says_how_to_get_it(tmp_path):
  with pytest.raises(FileNotFoundError, match="tfds build tiny_shakespeare"):
    sources.get_source("tiny_shakespeare", "train", str(tmp_path))


def test_unknown_split_is_a_clear_error(data_dir):
  with pytest.raises(ConfigError, match="no split 'test'"):
    sources.get_source("pystdlib_lm", "test", data_dir)


def test_tokenizer_round_trip_is_lossless(tokenizer):
  rng = np.random.default_rng(0)
  alphabet = list("abcdefXYZ019 _()[]{}:=.,'\"#\t\n\\") + ["é", "日本", "🙂", "\u00a0", "Ω"]
  for _ in range(50):
    text = "".join(rng.choice(alphabet, size=rng.integers(1, 80)))
    assert tokenizer.decode(tokenizer.encode(text)) == text
  code = "def f(x):\n    return  x\t# done\n\n\n"
  assert tokenizer.decode(tokenizer.encode(code)) == code
  assert tokenizer.vocab_size == 512
  assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 2, 3)


def test_record_text_errors_name_the_record():
  assert pipeline.record_text({"text": "é".encode()}, "text", 3, "ds") == "é"
  with pytest.raises(ValueError, match="ds record 7, field 'text', is not valid UTF-8"):
    pipeline.record_text({"text": b"\xff\xfe"}, "text", 7, "ds")
  with pytest.raises(ValueError, match="record 8, field 'text', is empty"):
    pipeline.record_text({"text": b""}, "text", 8, "ds")
  with pytest.raises(KeyError, match="set data.text_field"):
    pipeline.record_text({"content": b"x"}, "text", 9, "ds")


def test_non_utf8_record_fails_the_pipeline_with_its_index(tokenizer):
  source = [{"text": b"fine"}, {"text": b"bad \xff"}]
  batches = pipeline.lm_batches(
    source, tokenizer, text_field="text", seq_len=8, batch_size=1, dataset_name="toy", shuffle_seed=None, repeat=False
  )
  with pytest.raises(ValueError, match="toy record 1"):
    list(batches)


def _unpack(batch):
  """Documents (token lists) of a packed batch, recovered from segment ids."""
  pieces = []
  for tokens, segments in zip(batch["tokens"], batch["segment_ids"]):
    for segment in sorted(set(segments.tolist()) - {0}):
      pieces.append(tokens[segments == segment].tolist())
  return pieces


def test_packing_keeps_documents_apart(tokenizer):
  texts = ["a = 1", "def f():\n    pass\n" * 6, "x", "import os\nprint(os.sep)\n" * 3, "y = [1, 2]"]
  source = [{"text": t.encode()} for t in texts]
  seq_len, batch_size = 16, 3
  batches = list(
    pipeline.lm_batches(
      source,
      tokenizer,
      text_field="text",
      seq_len=seq_len,
      batch_size=batch_size,
      dataset_name="toy",
      shuffle_seed=None,
      repeat=False,
    )
  )
  documents = [[tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id] for t in texts]
  stream = sum(documents, [])
  pieces = []
  for batch in batches:
    assert {k: v.shape for k, v in batch.items()} == {
      k: (batch_size, seq_len) for k in ("tokens", "segment_ids", "positions")
    }
    # Positions count from 0 within each segment of a row.
    for positions, segments in zip(batch["positions"], batch["segment_ids"]):
      for segment in set(segments.tolist()) - {0}:
        np.testing.assert_array_equal(positions[segments == segment], np.arange(np.sum(segments == segment)))
    # Padding is all zeros.
    assert np.all(batch["tokens"][batch["segment_ids"] == 0] == 0)
    pieces += _unpack(batch)
  # The pieces, in order, are exactly the documents cut at row ends: nothing lost, nothing mixed.
  assert sum(pieces, []) == stream
  boundaries = np.cumsum([len(d) for d in documents])
  position = 0
  for piece in pieces:
    end = position + len(piece)
    assert not any(position < b < end for b in boundaries), "a segment crosses a document boundary"
    position = end


def test_targets_never_cross_documents():
  segment_ids = np.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
  weights = np.asarray(causal_lm.target_weights(segment_ids))
  np.testing.assert_array_equal(weights, [[1, 1, 0, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]])


def test_training_stream_resumes_exactly_from_a_checkpoint(data_dir, tokenizer, tmp_path):
  """The iterator position saved with Orbax (asynchronously, while reading goes on) resumes the same stream."""
  import jax
  import jax.numpy as jnp
  from jaxlm.training.checkpoint import Checkpointer

  source = sources.get_source("pystdlib_lm", "validation", data_dir)
  make = lambda: iter(
    pipeline.lm_batches(
      source,
      tokenizer,
      text_field="text",
      seq_len=32,
      batch_size=4,
      dataset_name="pystdlib_lm",
      shuffle_seed=3,
      repeat=True,
      shuffle_window=16,
    )
  )
  reference = make()
  expected = [next(reference) for _ in range(12)]
  iterator = make()
  for _ in range(3):
    next(iterator)
  checkpointer = Checkpointer(str(tmp_path / "checkpoints"), keep=1)
  state = {"w": jnp.ones(2)}
  checkpointer.save(3, state, iterator)
  for _ in range(5):
    next(iterator)  # reading goes on while the save completes
  checkpointer.wait()
  restarted = make()
  checkpointer.restore(
    3, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state), restarted
  )
  checkpointer.close()
  for want in expected[3:]:
    got = next(restarted)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key])


def test_unigram_entropy_matches_numpy():
  rng = np.random.default_rng(0)
  tokens = rng.integers(0, 5, size=(3, 10))
  batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens)}
  targets = tokens[:, 1:].ravel()
  p = np.bincount(targets) / targets.size
  p = p[p > 0]
  assert causal_lm.unigram_entropy([batch]) == pytest.approx(-(p * np.log(p)).sum())
