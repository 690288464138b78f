"""Test setup: 8 simulated CPU devices (before jax is imported) and one shared built corpus."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pytest  # noqa: E402

TINY_VOCAB = 512


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A TFDS data directory holding the built `pystdlib_lm` corpus (built once per session)."""
  from jaxlm.data import sources
  directory = str(tmp_path_factory.mktemp("tfds"))
  sources.get_builder("pystdlib_lm", directory)
  return directory


@pytest.fixture(scope="session")
def tokenizer(data_dir):
  """The tiny tokenizer the `tiny` configs train, cached in `data_dir`."""
  import ml_collections
  from jaxlm.data import pipeline, sources
  data_config = ml_collections.ConfigDict(dict(tokenizer="", data_dir=data_dir, name="pystdlib_lm",
                                               text_field="text", vocab_size=TINY_VOCAB))
  return pipeline.tokenizer_for(data_config, sources.get_source("pystdlib_lm", "train", data_dir))
