"""Classification, ranking, language-model and generation metrics with exact, documented definitions.

Array metrics are pure JAX functions (jit-able, fixed shapes); the streaming ones are sums
(`confusion_matrix`, `token_nll_sums`) that add over batches and devices and turn into numbers at the end
(`precision_recall_f1`, `perplexity_from_sums`). Generation metrics (exact match, BLEU, ROUGE-L) work on
Python strings or token sequences on the host. Strings are split into tokens by `tokenize`: "whitespace"
(`str.split`) or "13a" (mteval-v13a, sacrebleu's default, see `tokenize_13a`); sequences of tokens (e.g.
token ids) are used as they are.

Conventions: predictions are `argmax` of the scores (ties to the lowest class index); a confusion matrix
has true classes on rows and predicted classes on columns (as scikit-learn); ranking metrics treat
tied scores as one threshold (AUC counts a tied positive/negative pair as 1/2).
"""

import collections
import math
import re
from typing import Sequence

import jax
import jax.numpy as jnp

AVERAGES = (None, "macro", "micro", "weighted")
TOKENIZERS = ("whitespace", "13a")
BLEU_SMOOTHING = ("none", "floor", "add-k", "exp")
# sacrebleu's defaults for the smoothing value: the floor epsilon and the k of add-k (Chen & Cherry 2014).
_SMOOTH_DEFAULTS = {"none": None, "floor": 0.1, "add-k": 1.0, "exp": None}
_13A_RULES = [
  (re.compile(r"([\{-\~\[-\` -\&\(-\+\:-\@\/])"), r" \1 "),  # symbols and punctuation except . , - and '
  (re.compile(r"([^0-9])([\.,])"), r"\1 \2 "),  # period and comma unless preceded by a digit
  (re.compile(r"([\.,])([^0-9])"), r" \1 \2"),  # period and comma unless followed by a digit
  (re.compile(r"([0-9])(-)"), r"\1 \2 "),  # dash after a digit
]


def _weighted_mean(values, weights):
  values = jnp.asarray(values, jnp.float32)
  if weights is None:
    return jnp.mean(values)
  weights = jnp.asarray(weights, jnp.float32)
  return jnp.sum(values * weights) / jnp.sum(weights)


def accuracy(scores: jax.Array, labels: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Weighted mean of [argmax_k scores[i, k] == labels[i]] over examples (scores [N, C], labels [N])."""
  return _weighted_mean(jnp.argmax(scores, axis=-1) == labels, weights)


def top_k_accuracy(scores: jax.Array, labels: jax.Array, k: int, weights: jax.Array | None = None) -> jax.Array:
  """Weighted mean of [labels[i] is among the k classes `jax.lax.top_k` returns] (ties to the lower class index).

  That is, #{j : s_j > s_y} + #{j < y : s_j = s_y} < k. Equals scikit-learn's `top_k_accuracy_score` when
  scores have no ties.
  """
  _, top = jax.lax.top_k(jnp.asarray(scores), k)
  return _weighted_mean(jnp.any(top == jnp.asarray(labels)[:, None], axis=-1), weights)


def confusion_matrix(
  predictions: jax.Array, labels: jax.Array, num_classes: int, weights: jax.Array | None = None
) -> jax.Array:
  """[C, C] float32 counts (or summed weights): entry (i, j) = weight of examples with label i predicted j.

  A sum, so matrices of batches add up to the matrix of the whole set. Labels or predictions outside
  [0, C) are dropped (one_hot of an out-of-range index is all zero).
  """
  labels_one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
  if weights is not None:
    labels_one_hot = labels_one_hot * jnp.asarray(weights, jnp.float32)[..., None]
  predictions_one_hot = jax.nn.one_hot(predictions, num_classes, dtype=jnp.float32)
  return jnp.einsum("nc,nd->cd", labels_one_hot.reshape(-1, num_classes), predictions_one_hot.reshape(-1, num_classes))


def precision_recall_f1(confusion: jax.Array, average: str | None = None, zero_division: float = 0.0) -> dict:
  """Precision, recall and F1 from a confusion matrix (rows true, columns predicted), as scikit-learn.

  Per class k: precision = tp / (tp + fp), recall = tp / (tp + fn), F1 = 2 tp / (2 tp + fp + fn); a 0/0
  gives `zero_division` (scikit-learn's default behaves as 0). Every class of the matrix counts, also
  one absent from labels and predictions (scikit-learn with `labels=range(C)`).
  average: None -> [C] arrays; "macro" -> unweighted mean over classes; "weighted" -> mean weighted by
  support (true count); "micro" -> from the summed tp, fp, fn (all three equal accuracy here).
  """
  if average not in AVERAGES:
    raise ValueError(f"average must be one of {AVERAGES}, got {average!r}.")
  confusion = jnp.asarray(confusion, jnp.float32)
  tp = jnp.diagonal(confusion)
  predicted = jnp.sum(confusion, axis=0)
  support = jnp.sum(confusion, axis=1)
  if average == "micro":
    tp, predicted, support = jnp.sum(tp), jnp.sum(predicted), jnp.sum(support)

  def ratio(numerator, denominator):
    return jnp.where(denominator > 0, numerator / jnp.where(denominator > 0, denominator, 1.0), zero_division)

  result = {"precision": ratio(tp, predicted), "recall": ratio(tp, support), "f1": ratio(2 * tp, predicted + support)}
  if average == "macro":
    result = {name: jnp.mean(value) for name, value in result.items()}
  elif average == "weighted":
    total = jnp.sum(support)
    result = {
      name: jnp.where(total > 0, jnp.sum(value * support) / jnp.where(total > 0, total, 1.0), zero_division)
      for name, value in result.items()
    }
  return result


def macro_f1(confusion) -> jax.Array:
  """Mean per-class F1 over the classes that occur as a label or a prediction (scikit-learn's default); 0 when
  none does. Traceable (the bootstrap scores it under `jax.vmap`); `float()` it for a number."""
  confusion = jnp.asarray(confusion, jnp.float32)
  present = (jnp.sum(confusion, axis=0) + jnp.sum(confusion, axis=1)) > 0
  f1 = precision_recall_f1(confusion)["f1"]
  return jnp.sum(jnp.where(present, f1, 0.0)) / jnp.maximum(jnp.sum(present), 1)


def _counts_below(scores: jax.Array, mask: jax.Array, values: jax.Array, side: str) -> jax.Array:
  """For each value v: number of masked scores < v (side="left") or <= v (side="right")."""
  masked_sorted = jnp.sort(jnp.where(mask, scores, jnp.inf))
  return jnp.searchsorted(masked_sorted, values, side=side)


def roc_auc(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """Binary ROC-AUC of scores [N] for labels [N] in {0, 1} (or bool): P(s_pos > s_neg) + 1/2 P(s_pos = s_neg).

  The Mann-Whitney statistic, equal to the trapezoidal area under the ROC curve with tied scores as one
  threshold (scikit-learn's `roc_auc_score`). NaN when one of the two classes is absent.
  """
  scores = jnp.asarray(scores)
  positive = jnp.asarray(labels) > 0
  below = _counts_below(scores, ~positive, scores, "left")
  at_or_below = _counts_below(scores, ~positive, scores, "right")
  num_positive = jnp.sum(positive).astype(jnp.float32)  # float: the pair count overflows int32 past ~46k each
  num_negative = positive.shape[0] - num_positive
  wins = jnp.sum(jnp.where(positive, below + 0.5 * (at_or_below - below), 0.0))
  return wins / (num_positive * num_negative)


def roc_auc_ovr(probs: jax.Array, labels: jax.Array, average: str = "macro") -> jax.Array:
  """One-vs-rest ROC-AUC of probs [N, C]: `roc_auc(probs[:, k], labels == k)` averaged over classes.

  average: "macro" (unweighted mean) or "weighted" (by class prevalence), as scikit-learn's
  `roc_auc_score(multi_class="ovr")`; None returns the [C] per-class values. A class absent from
  the labels has NaN AUC, which makes the averages NaN.
  """
  probs = jnp.asarray(probs)
  classes = jnp.arange(probs.shape[1])
  per_class = jax.vmap(lambda column, k: roc_auc(column, labels == k), in_axes=(1, 0))(probs, classes)
  if average is None:
    return per_class
  if average == "macro":
    return jnp.mean(per_class)
  if average == "weighted":
    prevalence = jnp.sum(jnp.asarray(labels)[:, None] == classes, axis=0)
    return jnp.sum(per_class * prevalence) / jnp.sum(prevalence)
  raise ValueError(f"average must be 'macro', 'weighted' or None, got {average!r}.")


def average_precision(scores: jax.Array, labels: jax.Array) -> jax.Array:
  """PR-AUC as average precision: sum_n (R_n - R_{n-1}) P_n over the distinct score thresholds, high to low.

  Equivalently (1/P) sum over positives i of the precision at threshold s_i, counting every example with
  score >= s_i (so tied scores form one threshold); scikit-learn's `average_precision_score`, which has
  no interpolation. NaN without positives.
  """
  scores = jnp.asarray(scores)
  positive = jnp.asarray(labels) > 0
  everything = jnp.ones_like(positive)
  accepted = positive.shape[0] - _counts_below(scores, everything, scores, "left")
  true_accepted = jnp.sum(positive) - _counts_below(scores, positive, scores, "left")
  return jnp.sum(jnp.where(positive, true_accepted / accepted, 0.0)) / jnp.sum(positive)


def token_nll_sums(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> dict:
  """{"nll_sum": sum_t w_t * -log softmax(logits_t)[target_t] (nats, float32), "weight": sum_t w_t}."""
  log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
  nll = -jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)[..., 0]
  weights = jnp.ones_like(nll) if weights is None else jnp.asarray(weights, jnp.float32)
  return {"nll_sum": jnp.sum(nll * weights), "weight": jnp.sum(weights)}


def perplexity_from_sums(sums: dict) -> dict:
  """{"nll": nll_sum / weight (nats per token), "perplexity": exp(nll), "bits_per_token": nll / ln 2}."""
  nll = sums["nll_sum"] / sums["weight"]
  return {"nll": nll, "perplexity": jnp.exp(nll), "bits_per_token": nll / math.log(2.0)}


def perplexity(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """exp of the weighted mean next-token negative log-likelihood (nats) of `targets` under `logits`."""
  return perplexity_from_sums(token_nll_sums(logits, targets, weights))["perplexity"]


def bits_per_token(logits: jax.Array, targets: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  """Weighted mean negative log2-likelihood of `targets` under `logits`: nats / ln 2."""
  return perplexity_from_sums(token_nll_sums(logits, targets, weights))["bits_per_token"]


def tokenize_13a(text: str) -> list[str]:
  """Tokens of mteval-v13a (WMT's reference tokenizer), as sacrebleu's default `13a` tokenizer.

  Drops "<skipped>" and hyphenated line breaks, unescapes &quot; &amp; &lt; &gt;, then splits off punctuation
  and symbols; periods and commas stay inside numbers ("3.5", "1,000"), and a dash after a digit is split.
  No lower-casing.
  """
  text = text.replace("<skipped>", "").replace("-\n", "").replace("\n", " ")
  if "&" in text:
    text = text.replace("&quot;", '"').replace("&amp;", "&").replace("&lt;", "<").replace("&gt;", ">")
  text = f" {text} "
  for pattern, replacement in _13A_RULES:
    text = pattern.sub(replacement, text)
  return text.split()


def _check_tokenize(tokenize: str) -> None:
  if tokenize not in TOKENIZERS:
    raise ValueError(f"tokenize must be one of {TOKENIZERS}, got {tokenize!r}.")


def _tokens(text, tokenize: str = "whitespace") -> list:
  """Tokens of a string by `tokenize` ("whitespace" or "13a"); a sequence of tokens (e.g. ids) is used as it is."""
  if not isinstance(text, str):
    return list(text)
  return text.split() if tokenize == "whitespace" else tokenize_13a(text)


def exact_match(predictions: Sequence[str], references: Sequence) -> float:
  """Fraction of predictions equal to their reference (a string) or to one of their references (a list).

  Strings are compared as they are (no case folding, no whitespace stripping): normalise first if needed.
  """
  if len(predictions) != len(references) or not predictions:
    raise ValueError(
      f"exact_match: needs as many references as predictions (>0); got {len(predictions)} and {len(references)}."
    )
  hits = sum(
    prediction in ([reference] if isinstance(reference, str) else list(reference))
    for prediction, reference in zip(predictions, references)
  )
  return hits / len(predictions)


def _ngrams(tokens: list, n: int) -> collections.Counter:
  return collections.Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _bleu_statistics(hypothesis: list, references: list[list], max_order: int) -> tuple[list, list, int, int]:
  """(clipped n-gram matches [max_order], hypothesis n-gram counts [max_order], hypothesis length, closest
  reference length) of one tokenised hypothesis; the closest length is the shorter one on a tie."""
  matches, totals = [], []
  for n in range(1, max_order + 1):
    counts = _ngrams(hypothesis, n)
    max_reference = collections.Counter()
    for reference in references:
      max_reference |= _ngrams(reference, n)
    matches.append(sum(min(count, max_reference[gram]) for gram, count in counts.items()))
    totals.append(sum(counts.values()))
  closest = min((abs(len(r) - len(hypothesis)), len(r)) for r in references)[1]
  return matches, totals, len(hypothesis), closest


def _bleu_from_statistics(
  matches, totals, hypothesis_length, reference_length, smooth, smooth_value, effective_order
) -> float:
  """BLEU in [0, 1] from pooled statistics, step for step sacrebleu's `BLEU.compute_bleu` (divided by 100)."""
  if smooth not in BLEU_SMOOTHING:
    raise ValueError(f"smooth must be one of {BLEU_SMOOTHING}, got {smooth!r}.")
  if not any(matches):
    return 0.0
  value = _SMOOTH_DEFAULTS[smooth] if smooth_value is None else smooth_value
  precisions = [0.0] * len(matches)
  order, exp_divisor = len(matches), 1.0
  for n, (match, total) in enumerate(zip(matches, totals)):
    if smooth == "add-k" and n > 0:
      match, total = match + value, total + value
    if total == 0:
      break
    if effective_order:
      order = n + 1
    if match > 0:
      precisions[n] = match / total
    elif smooth == "exp":
      exp_divisor *= 2
      precisions[n] = 1.0 / (exp_divisor * total)
    elif smooth == "floor":
      precisions[n] = value / total
  if min(precisions[:order]) == 0.0:  # sacrebleu's floored log(0) = -1e10 gives exactly 0
    return 0.0
  brevity = 1.0 if hypothesis_length >= reference_length else math.exp(1.0 - reference_length / hypothesis_length)
  return brevity * math.exp(sum(math.log(p) for p in precisions[:order]) / order)


def _reference_lists(entry, tokenize) -> list[list]:
  """One reference (a string) or several (a list of strings or token sequences), tokenised."""
  return [_tokens(entry, tokenize)] if isinstance(entry, str) else [_tokens(r, tokenize) for r in entry]


def bleu(
  hypotheses: Sequence,
  references: Sequence,
  max_order: int = 4,
  smooth: str = "none",
  smooth_value: float | None = None,
  tokenize: str = "whitespace",
  effective_order: bool = False,
) -> float:
  """Corpus BLEU (Papineni et al. 2002) in [0, 1]: BP * exp(mean_{n=1..max_order} log p_n) (sacrebleu / 100).

  p_n = (sum over hypotheses of n-gram counts clipped by the maximum count in any of its references) /
  (sum over hypotheses of their n-gram counts). BP = 1 if c >= r else exp(1 - r / c), with c the total
  hypothesis length and r the sum of the reference lengths closest to each hypothesis length (the shorter
  on a tie). Each entry of `references` is one reference string, or a list of references (strings or token
  sequences). Tokens: see the module docstring (default whitespace, unlike sacrebleu's 13a).
  smooth (sacrebleu's methods, applied to the pooled counts; Chen & Cherry 2014): "none" (default): BLEU is 0
  if some p_n is 0; "floor" (method 1): a zero count becomes smooth_value (default 0.1); "add-k" (method 2):
  smooth_value (default 1) is added to the matches and counts of every order n >= 2; "exp" (method 3, NIST
  mteval): the i-th zero precision becomes 1 / (2^i * count). An order with no hypothesis n-grams at all ends
  the product, and counts as p_n = 0 unless `effective_order` (then the mean runs over the orders before it).
  """
  _check_tokenize(tokenize)
  if len(hypotheses) != len(references):
    raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} reference entries.")
  matches, totals = [0] * max_order, [0] * max_order
  hypothesis_length = reference_length = 0
  for hypothesis, entry in zip(hypotheses, references):
    statistics = _bleu_statistics(_tokens(hypothesis, tokenize), _reference_lists(entry, tokenize), max_order)
    matches = [a + b for a, b in zip(matches, statistics[0])]
    totals = [a + b for a, b in zip(totals, statistics[1])]
    hypothesis_length += statistics[2]
    reference_length += statistics[3]
  return _bleu_from_statistics(
    matches, totals, hypothesis_length, reference_length, smooth, smooth_value, effective_order
  )


def sentence_bleu(
  hypothesis,
  references,
  max_order: int = 4,
  smooth: str = "exp",
  smooth_value: float | None = None,
  tokenize: str = "13a",
  effective_order: bool = True,
) -> float:
  """BLEU in [0, 1] of one hypothesis against one reference (a string) or several (a list): `bleu` of a
  one-sentence corpus, with sacrebleu's `sentence_bleu` defaults (exp smoothing, effective order, 13a tokens).
  """
  return bleu([hypothesis], [references], max_order, smooth, smooth_value, tokenize, effective_order)


def _lcs_length(a: list, b: list) -> int:
  previous = [0] * (len(b) + 1)
  for token in a:
    current = [0]
    for j, other in enumerate(b):
      current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(hypotheses: Sequence, references: Sequence, beta: float = 1.0, tokenize: str = "whitespace") -> float:
  """Mean over examples of sentence ROUGE-L F (Lin 2004), the best over an example's references.

  With L the longest-common-subsequence length, R = L / |reference|, P = L / |hypothesis|:
  F = (1 + beta^2) P R / (R + beta^2 P), 0 when L = 0. Tokens by `tokenize` (module docstring), no case
  folding; Google's rouge-score package instead lower-cases and keeps only [a-z0-9] runs by default.
  """
  _check_tokenize(tokenize)
  if len(hypotheses) != len(references) or not hypotheses:
    raise ValueError(
      f"rouge_l: needs as many references as hypotheses (>0); got {len(hypotheses)} and {len(references)}."
    )
  total = 0.0
  for hypothesis, entry in zip(hypotheses, references):
    hypothesis = _tokens(hypothesis, tokenize)
    best = 0.0
    for reference in _reference_lists(entry, tokenize):
      common = _lcs_length(hypothesis, reference)
      if common:
        recall, precision = common / len(reference), common / len(hypothesis)
        best = max(best, (1 + beta**2) * precision * recall / (recall + beta**2 * precision))
    total += best
  return total / len(hypotheses)
