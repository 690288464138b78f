"""Prompted classification by a language model: prompts, label-word scores, and the corrections of its priors.

A prompt is demonstrations (train examples with their label words, drawn with a seed) followed by the input
in a template; the class is the label word the model finds most likely after it. Everything here is pure
array and string code: the model comes in as a function `log_prob_fn(batch) -> [R, T]` (the log-probability
of tokens[:, t + 1] given tokens[:, :t + 1], see `next_token_log_probs`), so this module neither builds nor
calls a model (the experiment layer does, in `jaxlm.calibrate`).

Scoring (`score_label_words`): every label word of a prompt is one row of the same batch (prompt + word,
right-padded), so one forward pass scores a prompt against all C label words, several prompts at a time; a
multi-token word scores the sum (`reduce="sum"`) or the mean (`"mean"`) of its tokens' log-probabilities.

Corrections, one interface (`Correction.probabilities(scores [N, C]) -> [N, C]`), each turning label-word
scores into probabilities over the label words:
  none        softmax of the scores (renormalised over the label words);
  contextual  Zhao et al. 2021: p(y|x) / p_cf(y), renormalised, with p_cf the mean over content-free inputs
              ("N/A", "", "[MASK]" in the same prompt) of their label distribution (each renormalised);
  domain      Fei et al. 2023: the same, with the prior of ~20 random texts of in-domain words of the average
              input length (`domain_texts`);
  batch       Zhou et al. 2024: log p(y|x) - log p_bar(y), p_bar the mean label distribution of the test
              inputs seen so far (a running estimate updated batch by batch, each batch included in its own);
  pmi         pointwise mutual information: log p(y|prompt) - log p(y|null prompt), the null prompt being the
              template's answer prefix alone (Holtzman et al. 2021's domain premise).

Shape legend: N examples, C classes (label words), R rows (prompts x label words), T row length.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.errors import check
from jaxlm.evaluation import metrics

CORRECTIONS = ("none", "contextual", "domain", "batch", "pmi")
REDUCTIONS = ("sum", "mean")
CONTENT_FREE = ("N/A", "", "[MASK]")  # Zhao et al. 2021


def check_config(prompt) -> None:
  """Validates the `prompt` config section (ConfigError naming the key)."""
  check(len(prompt.templates) > 0, "prompt.templates", "give at least one template with a {text} field.")
  for template in prompt.templates:
    try:
      check_template(template)
    except ValueError as error:
      check(False, "prompt.templates", str(error))
  check(prompt.score in REDUCTIONS, "prompt.score", f"{prompt.score!r} is not one of {REDUCTIONS}.")
  check(
    len(prompt.shots) > 0 and all(shots >= 0 for shots in prompt.shots),
    "prompt.shots",
    f"must be demonstration counts >= 0, e.g. (0, 4); got {tuple(prompt.shots)}.",
  )
  unknown = set(prompt.corrections) - set(CORRECTIONS)
  check(
    not unknown and len(prompt.corrections) > 0,
    "prompt.corrections",
    f"{sorted(unknown) or '()'}: use some of {CORRECTIONS}.",
  )
  for key in ("orders", "domain_texts", "batch_size", "max_text_tokens", "prompts_per_batch"):
    check(prompt[key] > 0, f"prompt.{key}", f"must be positive, got {prompt[key]}.")
  check(len(prompt.content_free) > 0, "prompt.content_free", "give at least one content-free input, e.g. 'N/A'.")
  check(
    prompt.num_examples == -1 or prompt.num_examples > 0,
    "prompt.num_examples",
    f"must be positive or -1 (the whole split), got {prompt.num_examples}.",
  )


def check_template(template: str) -> None:
  """A template holds `{text}` once and nothing else in braces (ValueError otherwise)."""
  try:
    filled = template.format(text="")
  except (KeyError, IndexError, ValueError) as error:
    raise ValueError(
      f"Prompt template {template!r} must have exactly one {{text}} field and no other braces "
      f"(double them: {{{{ }}}}): {error!r}."
    ) from None
  if template.count("{text}") != 1:
    raise ValueError(f"Prompt template {template!r} must have exactly one {{text}} field.")
  del filled


def answer_prefix(template: str) -> str:
  """What follows `{text}` in a template (e.g. "\\n# package:"): the null prompt of PMI scoring."""
  return template.split("{text}", 1)[1]


def draw_demonstrations(num_train: int, shots: int, seed: int) -> np.ndarray:
  """Indices of `shots` distinct train examples, in the order they appear in the prompt (a seeded draw)."""
  if shots > num_train:
    raise ValueError(f"{shots} demonstrations asked for, but the train split has {num_train} examples.")
  return np.random.default_rng(seed).choice(num_train, size=shots, replace=False)


def build_prompt(template: str, text: str, demonstrations: list[tuple[str, str]], separator: str = "\n\n") -> str:
  """Demonstrations (text, label word), each filled into the template and followed by its label word, then the
  input in the template (the label word to score comes right after)."""
  shown = [template.format(text=demo_text) + word + separator for demo_text, word in demonstrations]
  return "".join(shown) + template.format(text=text)


def domain_texts(texts: list[str], num_texts: int = 20, seed: int = 0) -> list[str]:
  """`num_texts` random texts of in-domain words (Fei et al. 2023): words (whitespace-split) drawn uniformly
  from all words of `texts`, each text as long as the texts are on average (in words)."""
  words = [word for text in texts for word in text.split()]
  if not words:
    raise ValueError("domain_texts needs texts with at least one word.")
  length = max(1, round(len(words) / len(texts)))
  rng = np.random.default_rng(seed)
  return [" ".join(words[i] for i in rng.integers(0, len(words), size=length)) for _ in range(num_texts)]


def continuation_rows(
  prompts: list[list[int]], continuations: list[list[int]], length: int, pad_id: int, row_multiple: int = 1
) -> dict:
  """The batch scoring every continuation after every prompt: row p * C + c is prompts[p] + continuations[c],
  right-padded to `length` (rows added up to a multiple of `row_multiple`, all padding).

  Returns int32 tokens, positions, segment_ids [R, T] (segment 1 = the row's text, 0 = padding) and float32
  target_weights [R, T]: 1 at position t when tokens[t + 1] is a continuation token (the logits at t predict it).
  """
  num_rows = len(prompts) * len(continuations)
  num_rows += -num_rows % row_multiple
  batch = {key: np.zeros((num_rows, length), np.int32) for key in ("tokens", "positions", "segment_ids")}
  batch["tokens"][:] = pad_id
  weights = np.zeros((num_rows, length), np.float32)
  for p, prompt in enumerate(prompts):
    for c, continuation in enumerate(continuations):
      row, size = p * len(continuations) + c, len(prompt) + len(continuation)
      if not prompt or not continuation or size > length:
        raise ValueError(
          f"A prompt of {len(prompt)} tokens with a continuation of {len(continuation)} does not fit "
          f"a row of {length} tokens (both must be non-empty)."
        )
      batch["tokens"][row, :size] = prompt + continuation
      batch["positions"][row, :size] = np.arange(size)
      batch["segment_ids"][row, :size] = 1
      weights[row, len(prompt) - 1 : size - 1] = 1.0
  batch["target_weights"] = weights
  return batch


def next_token_log_probs(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """[R, T] float32: log-softmax(logits[:, t])[tokens[:, t + 1]] (the last position scores token 0, unused)."""
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(log_probs, jnp.roll(tokens, -1, axis=1)[..., None], axis=-1)[..., 0]


def score_label_words(
  log_prob_fn,
  prompts: list[list[int]],
  label_tokens: list[list[int]],
  length: int,
  pad_id: int,
  reduce: str = "sum",
  prompts_per_batch: int = 8,
  row_multiple: int = 1,
) -> np.ndarray:
  """[N, C] float64 score of each label word after each prompt: the sum or mean of its tokens' log-probabilities.

  `log_prob_fn(batch)` maps a `continuation_rows` batch to `next_token_log_probs` [R, T]; it is called once per
  `prompts_per_batch` prompts, each call scoring those prompts against all C label words.
  """
  if reduce not in REDUCTIONS:
    raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
  num_labels, scores = len(label_tokens), []
  for start in range(0, len(prompts), prompts_per_batch):
    chunk = prompts[start : start + prompts_per_batch]
    batch = continuation_rows(chunk, label_tokens, length, pad_id, row_multiple)
    token_log_probs = np.asarray(log_prob_fn(batch), np.float64)
    weights = batch["target_weights"]
    sums = (token_log_probs * weights).sum(axis=1)[: len(chunk) * num_labels]
    if reduce == "mean":
      sums = sums / weights.sum(axis=1)[: len(chunk) * num_labels]
    scores.append(sums.reshape(len(chunk), num_labels))
  return np.concatenate(scores) if scores else np.zeros((0, num_labels))


def _softmax(scores) -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def _check_scores(scores, name: str = "scores") -> np.ndarray:
  scores = np.asarray(scores, np.float64)
  if scores.ndim != 2 or scores.shape[1] < 2:
    raise ValueError(f"{name} must be [N, C] label-word scores (C >= 2), got shape {scores.shape}.")
  if not np.all(np.isfinite(scores)):
    raise ValueError(f"{name} must be finite log-probability scores.")
  return scores


@dataclasses.dataclass
class Correction:
  """Label-word scores -> probabilities over the label words; see the module docstring for each `name`.

  `prior_scores` [M, C]: the scores of the content-free inputs (contextual), the domain texts (domain) or the
  null prompt (pmi, M = 1); none for "none" and "batch". `batch_size`: the test inputs per batch-calibration
  update, in the order given.
  """

  name: str = "none"
  prior_scores: np.ndarray | None = None
  batch_size: int = 32

  def __post_init__(self):
    if self.name not in CORRECTIONS:
      raise ValueError(f"Unknown correction {self.name!r}; use one of {CORRECTIONS}.")
    needs_prior = self.name in ("contextual", "domain", "pmi")
    if needs_prior != (self.prior_scores is not None):
      raise ValueError(f"Correction {self.name!r} {'needs' if needs_prior else 'takes no'} prior_scores.")
    if needs_prior:
      self.prior_scores = _check_scores(self.prior_scores, "prior_scores")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be positive, got {self.batch_size}.")

  def prior(self) -> np.ndarray:
    """[C] the label distribution divided out (contextual, domain)."""
    return _softmax(self.prior_scores).mean(axis=0)

  def probabilities(self, scores) -> np.ndarray:
    """[N, C] float64 probabilities over the label words of the test inputs' scores [N, C]."""
    scores = _check_scores(scores)
    if self.prior_scores is not None and self.prior_scores.shape[1] != scores.shape[1]:
      raise ValueError(f"prior_scores have {self.prior_scores.shape[1]} label words, scores {scores.shape[1]}.")
    if self.name in ("contextual", "domain"):
      corrected = _softmax(scores) / self.prior()
      return corrected / corrected.sum(axis=-1, keepdims=True)
    if self.name == "pmi":
      return _softmax(scores - self.prior_scores.mean(axis=0))
    probs = _softmax(scores)
    if self.name == "none":
      return probs
    seen, total, corrected = 0, np.zeros(scores.shape[1]), []
    for start in range(0, len(probs), self.batch_size):  # batch: running mean of the distributions seen so far
      batch = probs[start : start + self.batch_size]
      total, seen = total + batch.sum(axis=0), seen + len(batch)
      corrected.append(_softmax(np.log(batch) - np.log(total / seen)))
    return np.concatenate(corrected) if corrected else probs


def accuracy_and_macro_f1(probs, labels) -> dict:
  """{"accuracy", "macro_f1"} of the argmax of probs [N, C] against labels [N]."""
  probs, labels = np.asarray(probs), np.asarray(labels)
  predictions = probs.argmax(axis=-1)
  confusion = metrics.confusion_matrix(predictions, labels, probs.shape[-1])
  return {"accuracy": float((predictions == labels).mean()), "macro_f1": float(metrics.macro_f1(confusion))}
