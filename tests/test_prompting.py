"""Prompted classification: label-word scoring against the model's own logits, and the corrections of its prior."""

import jax
import numpy as np
import pytest

from conftest import tiny_model_config
from jaxlm.errors import ConfigError
from jaxlm.evaluation import prompting
from jaxlm.models import Decoder
from jaxlm.models import params as params_lib
from jaxlm import configs
from jaxlm.experiment import validate


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_multi_token_label_words_score_the_sum_or_mean_of_their_token_log_probs(reduce):
  """Batched scoring (prompts x label words as rows of one padded batch) equals running the model on each
  prompt + word alone and adding up (or averaging) the log-probabilities of the word's tokens."""
  config = tiny_model_config(max_len=32)
  model = Decoder(config)
  params = params_lib.init_params(model, jax.random.key(0))
  prompts = [[2, 10, 11, 12, 13], [2, 20, 21], [2, 30, 31, 32, 33, 34, 35]]
  words = [[40], [41, 42, 43], [44, 45]]  # one- and multi-token label words
  apply = jax.jit(model.apply)  # one compile per shape; op by op, every op of the model compiled on its own
  calls = []

  def log_prob_fn(batch):
    calls.append(batch["tokens"].shape)
    logits = apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"])
    return prompting.next_token_log_probs(logits, batch["tokens"])

  scores = prompting.score_label_words(
    log_prob_fn, prompts, words, length=16, pad_id=0, reduce=reduce, prompts_per_batch=2, row_multiple=4
  )
  assert calls == [(8, 16), (4, 16)]  # one forward pass per 2 prompts x 3 words, rows padded to a multiple of 4
  expected = np.zeros((3, 3))
  for p, prompt in enumerate(prompts):
    for c, word in enumerate(words):
      tokens = np.asarray([prompt + word], np.int32)
      log_probs = _log_softmax(
        apply({"params": params}, tokens, np.arange(tokens.shape[1])[None], np.ones_like(tokens))
      )[0]
      token_scores = [log_probs[len(prompt) - 1 + i, token] for i, token in enumerate(word)]
      expected[p, c] = np.sum(token_scores) if reduce == "sum" else np.mean(token_scores)
  np.testing.assert_allclose(scores, expected, rtol=1e-5, atol=1e-5)


def test_contextual_calibration_removes_a_hand_built_label_bias_exactly():
  """Scores = log(true distribution x bias) (up to a per-row constant); content-free inputs show the bias alone
  (in three differently scaled copies, averaged after renormalising). Dividing it out recovers the truth."""
  rng = np.random.default_rng(0)
  truth = rng.dirichlet(np.ones(4), size=50)
  bias = np.array([0.6, 0.2, 0.15, 0.05])
  scores = np.log(truth * bias) + rng.normal(size=(50, 1))  # each row shifted: a label-word score, not normalised
  content_free = np.log(bias)[None] + np.array([[0.0], [-3.0], [5.0]])
  corrected = prompting.Correction("contextual", content_free).probabilities(scores)
  np.testing.assert_allclose(corrected, truth, rtol=1e-10)
  biased = prompting.Correction("none").probabilities(scores)
  assert (biased.argmax(-1) == 0).mean() > (truth.argmax(-1) == 0).mean()  # the bias was there
  # Domain-context calibration is the same division with another prior; PMI subtracts the null prompt's scores.
  np.testing.assert_allclose(prompting.Correction("domain", content_free).probabilities(scores), truth, rtol=1e-10)
  np.testing.assert_allclose(prompting.Correction("pmi", np.log(bias)[None]).probabilities(scores), truth, rtol=1e-10)


def test_batch_calibration_balances_the_mean_prediction_of_a_balanced_batch():
  """A batch whose true labels are balanced, scored by a model biased towards class 0: batch calibration divides
  out the batch's mean label distribution, so predictions become balanced (one division in log space is a
  first-order correction, so the mean distribution moves most of the way to uniform, not all of it)."""
  rng = np.random.default_rng(1)
  labels = np.repeat(np.arange(3), 20)
  logits = rng.normal(size=(60, 3)) + 2.0 * np.eye(3)[labels] + np.array([1.0, 0.0, -0.5])
  raw = prompting.Correction("none").probabilities(logits)
  calibrated = prompting.Correction("batch", batch_size=60).probabilities(logits)
  raw_gap, calibrated_gap = (np.abs(p.mean(0) - 1 / 3).max() for p in (raw, calibrated))
  assert raw_gap > 0.15 and calibrated_gap < raw_gap / 2
  np.testing.assert_allclose(calibrated.sum(-1), 1.0)
  counts = np.bincount(calibrated.argmax(-1), minlength=3)
  assert np.bincount(raw.argmax(-1), minlength=3).max() >= 30 and np.all(np.abs(counts - 20) <= 5)
  assert (calibrated.argmax(-1) == labels).mean() > (raw.argmax(-1) == labels).mean()


def test_batch_calibration_keeps_a_running_prior_over_batches():
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(10, 3))
  probs = prompting._softmax(logits)
  calibrated = prompting.Correction("batch", batch_size=4).probabilities(logits)
  for start, stop in ((0, 4), (4, 8), (8, 10)):
    prior = probs[:stop].mean(0)  # everything seen so far, this batch included
    expected = probs[start:stop] / prior
    np.testing.assert_allclose(calibrated[start:stop], expected / expected.sum(-1, keepdims=True), rtol=1e-10)


def test_prompts_demonstrations_and_domain_texts():
  template = "{text}\n# package:"
  prompt = prompting.build_prompt(template, "def f(): pass", [("def g(): pass", " json"), ("x = 1", " email")])
  assert prompt == "def g(): pass\n# package: json\n\nx = 1\n# package: email\n\ndef f(): pass\n# package:"
  assert prompting.answer_prefix(template) == "\n# package:"
  first, again = prompting.draw_demonstrations(100, 4, seed=3), prompting.draw_demonstrations(100, 4, seed=3)
  assert list(first) == list(again) and len(set(first)) == 4
  assert list(prompting.draw_demonstrations(100, 4, seed=4)) != list(first)
  texts = ["a b c d", "e f", "g h i"]
  domain = prompting.domain_texts(texts, num_texts=20, seed=0)
  assert len(domain) == 20 and all(len(text.split()) == 3 for text in domain)  # 9 words / 3 texts
  assert set(" ".join(domain).split()) <= set("abcdefghi")


def test_bad_prompt_configs_name_the_key():
  for key, value in (
    ("templates", ("no field here",)),
    ("score", "max"),
    ("corrections", ("none", "typo")),
    ("shots", (-1,)),
    ("num_examples", 0),
  ):
    config = configs.base_config()
    config.prompt[key] = value
    with pytest.raises(ConfigError, match=f"prompt.{key}"):
      validate(config)
  with pytest.raises(ValueError, match="needs prior_scores"):
    prompting.Correction("contextual")
