"""Seq2seq on the encoder-decoder, end to end: `experiments/sft_docstrings.py:tiny,t5` fine-tunes a
span-corruption checkpoint (`init_from`) through `Experiment`, next to the same run from scratch."""

import json
import os

import jax
import numpy as np
import pytest

from conftest import experiment_config


@pytest.mark.e2e
def test_seq2seq_fine_tunes_a_span_corruption_checkpoint(data_dir, tmp_path):
  from jaxlm import Experiment
  from jaxlm.models import params as params_lib

  pretrained = str(tmp_path / "t5")
  config = experiment_config("pretrain_t5", "tiny")
  config.data.data_dir = data_dir
  config.train.update(dict(steps=100, eval_every=100, checkpoint_every=100))
  config.sample.max_new_tokens = 0
  Experiment.from_config(config, pretrained).train()

  def fine_tune(workdir: str, init_from: str) -> tuple[Experiment, dict]:
    config = experiment_config("sft_docstrings", "tiny,t5")
    config.data.data_dir = data_dir
    config.init_from = init_from
    # The same tokenizer (with the pretraining's sentinel pieces) for both runs: their losses compare.
    config.data.tokenizer = Experiment.from_workdir(pretrained).tokenizer_path()
    config.train.update(dict(steps=10, eval_every=10, checkpoint_every=10))
    experiment = Experiment.from_config(config, str(tmp_path / workdir))
    return experiment, experiment.train()

  fine, fine_metrics = fine_tune("from_t5", pretrained)
  # Every tensor of the pretrained encoder-decoder is where seq2seq training starts.
  start = params_lib.flatten(Experiment.from_config(fine.config).init_params())
  restored = params_lib.flatten(Experiment.from_workdir(pretrained).load_params())
  assert sorted(start) == sorted(restored)
  for name, value in restored.items():
    np.testing.assert_array_equal(jax.device_get(start[name]), jax.device_get(value), err_msg=name)
  _, scratch_metrics = fine_tune("scratch", "")
  assert fine_metrics["loss"] < scratch_metrics["loss"]

  # The test report of the encoder-decoder: the loss and greedy generations next to their references.
  with open(os.path.join(fine.workdir, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["metrics"]["loss"] > 0 and len(report["generation"]["examples"]) == 2
