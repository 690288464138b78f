"""Metrics against scikit-learn or a float64 NumPy / pure-Python reference on fresh seeded random inputs."""

import jax
import numpy as np
import pytest
from sklearn import metrics as sk

from jaxlm.evaluation import metrics


def _classification(seed, n=300, c=5, ties=False):
  rng = np.random.default_rng(seed)
  scores = rng.normal(size=(n, c)).astype(np.float32)
  if ties:
    scores = np.round(scores)  # many tied scores
  labels = rng.integers(0, c, size=n)
  return scores, labels


@pytest.mark.parametrize("seed", [0, 1])
def test_accuracy_top_k_and_confusion_match_sklearn(seed):
  scores, labels = _classification(seed)
  weights = np.random.default_rng(seed + 10).uniform(0.1, 2.0, size=len(labels))
  predictions = scores.argmax(-1)
  assert float(metrics.accuracy(scores, labels)) == pytest.approx(sk.accuracy_score(labels, predictions))
  assert float(metrics.accuracy(scores, labels, weights)) == pytest.approx(
    sk.accuracy_score(labels, predictions, sample_weight=weights), rel=1e-5
  )
  for k in (1, 2, 3):
    assert float(metrics.top_k_accuracy(scores, labels, k)) == pytest.approx(
      sk.top_k_accuracy_score(labels, scores, k=k, labels=range(5))
    )
  confusion = jax.jit(metrics.confusion_matrix, static_argnums=2)(predictions, labels, 5)
  np.testing.assert_array_equal(confusion, sk.confusion_matrix(labels, predictions, labels=range(5)))
  # Streaming: the sum of per-batch matrices is the matrix of the whole set.
  halves = sum(metrics.confusion_matrix(predictions[s], labels[s], 5) for s in (slice(0, 100), slice(100, None)))
  np.testing.assert_array_equal(halves, confusion)


def test_top_k_breaks_ties_toward_the_lower_class_index():
  scores = np.array([[1.0, 1.0, 1.0, 0.0]] * 3, np.float32)
  np.testing.assert_array_equal(
    [float(metrics.top_k_accuracy(scores[:1], [label], 2)) for label in range(4)], [1.0, 1.0, 0.0, 0.0]
  )


@pytest.mark.parametrize("absent_class", [False, True])
def test_precision_recall_f1_match_sklearn(absent_class):
  scores, labels = _classification(2, c=6)
  predictions = scores.argmax(-1)
  if absent_class:  # class 5 never a label; class 4 neither a label nor a prediction
    labels = np.where(labels >= 4, 0, labels)
    predictions = np.where(predictions == 4, 1, predictions)
  confusion = metrics.confusion_matrix(predictions, labels, 6)
  for average in (None, "macro", "micro", "weighted"):
    ours = metrics.precision_recall_f1(confusion, average)
    kwargs = dict(labels=range(6), average=average, zero_division=0.0)
    np.testing.assert_allclose(ours["precision"], sk.precision_score(labels, predictions, **kwargs), rtol=1e-6)
    np.testing.assert_allclose(ours["recall"], sk.recall_score(labels, predictions, **kwargs), rtol=1e-6)
    np.testing.assert_allclose(ours["f1"], sk.f1_score(labels, predictions, **kwargs), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ties", [False, True])
def test_roc_auc_and_average_precision_match_sklearn(ties):
  rng = np.random.default_rng(3)
  labels = rng.integers(0, 2, size=400)
  scores = (labels * 0.8 + rng.normal(size=400)).astype(np.float32)
  if ties:
    scores = np.round(scores * 2) / 2
  assert float(jax.jit(metrics.roc_auc)(scores, labels)) == pytest.approx(sk.roc_auc_score(labels, scores), rel=1e-6)
  assert float(jax.jit(metrics.average_precision)(scores, labels)) == pytest.approx(
    sk.average_precision_score(labels, scores), rel=1e-6
  )
  # Edge cases: probabilities of exactly 0 and 1, all tied, perfect separation.
  edge = np.array([0.0, 1.0, 1.0, 0.0, 0.5, 0.5], np.float32)
  edge_labels = np.array([0, 1, 0, 0, 1, 1])
  assert float(metrics.roc_auc(edge, edge_labels)) == pytest.approx(sk.roc_auc_score(edge_labels, edge))
  assert float(metrics.average_precision(edge, edge_labels)) == pytest.approx(
    sk.average_precision_score(edge_labels, edge)
  )
  assert float(metrics.roc_auc(np.full(6, 0.3), edge_labels)) == 0.5
  assert float(metrics.roc_auc(edge_labels * 1.0, edge_labels)) == 1.0
  assert np.isnan(float(metrics.roc_auc(edge, np.zeros(6))))


def test_one_vs_rest_auc_matches_sklearn():
  scores, labels = _classification(4, c=4)
  probs = np.asarray(jax.nn.softmax(scores, axis=-1), np.float64)
  for average in ("macro", "weighted"):
    assert float(metrics.roc_auc_ovr(probs, labels, average)) == pytest.approx(
      sk.roc_auc_score(labels, probs, multi_class="ovr", average=average), rel=1e-6
    )
  per_class = metrics.roc_auc_ovr(probs, np.where(labels == 3, 0, labels), None)  # class 3 absent: undefined
  assert np.isnan(per_class[3]) and not np.isnan(per_class[:3]).any()


def test_perplexity_and_bits_per_token_match_numpy():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(4, 7, 11)) * 3
  targets = rng.integers(0, 11, size=(4, 7))
  weights = (rng.uniform(size=(4, 7)) > 0.3).astype(np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  nll = -(np.take_along_axis(log_probs, targets[..., None], -1)[..., 0] * weights).sum() / weights.sum()
  assert float(metrics.perplexity(logits.astype(np.float32), targets, weights)) == pytest.approx(np.exp(nll), rel=1e-5)
  assert float(metrics.bits_per_token(logits.astype(np.float32), targets, weights)) == pytest.approx(
    nll / np.log(2), rel=1e-5
  )


def test_exact_match():
  assert metrics.exact_match(["a b", "c", "x "], ["a b", ["d", "c"], "x"]) == pytest.approx(2 / 3)
  with pytest.raises(ValueError, match="as many references"):
    metrics.exact_match(["a"], [])


def test_bleu_on_hand_computed_examples():
  # Hypothesis of 7 tokens, reference of 8: p1 = 6/7, p2 = 4/6, p3 = 2/5, p4 = 1/4, BP = exp(1 - 8/7).
  hypothesis = "the cat sat on the red mat"
  reference = "the cat sat on a red mat today"
  # n-grams shared: 1: the,cat,sat,on,red,mat (the x2 in hyp, x1 in ref: clipped) -> 6/7
  # 2: the cat, cat sat, sat on, red mat -> 4/6; 3: the cat sat, cat sat on -> 2/5; 4: the cat sat on -> 1/4
  expected = np.exp(1 - 8 / 7) * np.exp(np.mean(np.log([6 / 7, 4 / 6, 2 / 5, 1 / 4])))
  assert metrics.bleu([hypothesis], [reference]) == pytest.approx(expected, rel=1e-12)
  assert metrics.bleu([reference], [[reference, hypothesis]]) == pytest.approx(1.0)
  assert metrics.bleu(["a b c"], ["d e f g"]) == 0.0
  # Corpus level: counts are pooled before the ratios, and token-id sequences work like words.
  pooled = metrics.bleu([[1, 2, 3, 4, 5], [1, 2, 3, 4]], [[[1, 2, 3, 4, 5]], [[1, 2, 3, 9]]])
  expected = np.exp(np.mean(np.log([8 / 9, 6 / 7, 4 / 5, 2 / 3])))  # c = r = 9, BP = 1
  assert pooled == pytest.approx(expected, rel=1e-12)


def _lcs_brute_force(a, b):
  """Longest common subsequence by recursion with memoisation, independent of the table in metrics."""
  import functools

  @functools.lru_cache(maxsize=None)
  def lcs(i, j):
    if i == len(a) or j == len(b):
      return 0
    return 1 + lcs(i + 1, j + 1) if a[i] == b[j] else max(lcs(i + 1, j), lcs(i, j + 1))

  return lcs(0, 0)


def test_rouge_l_matches_a_brute_force_reference():
  rng = np.random.default_rng(6)
  hypotheses = [" ".join(rng.choice(list("abcde"), size=rng.integers(1, 9))) for _ in range(20)]
  references = [" ".join(rng.choice(list("abcde"), size=rng.integers(1, 9))) for _ in range(20)]
  expected = []
  for hypothesis, reference in zip(hypotheses, references):
    h, r = hypothesis.split(), reference.split()
    common = _lcs_brute_force(tuple(h), tuple(r))
    expected.append(0.0 if common == 0 else 2 * common / (len(h) + len(r)))  # F1 = 2L / (|h| + |r|)
  assert metrics.rouge_l(hypotheses, references) == pytest.approx(np.mean(expected), rel=1e-12)
  assert metrics.rouge_l(["police killed the gunman"], [["the gunman police killed", "x"]]) == pytest.approx(0.5)


def test_13a_tokenizer_on_hand_tokenised_examples():
  """mteval-v13a: punctuation split off except inside numbers; apostrophes and in-word dashes stay."""
  assert metrics.tokenize_13a("Hello, world! It's 3.5-4 km (approx.) &amp; 1,000 <skipped>items.") == [
    "Hello",
    ",",
    "world",
    "!",
    "It's",
    "3.5",
    "-",
    "4",
    "km",
    "(",
    "approx",
    ".",
    ")",
    "&",
    "1,000",
    "items",
    ".",
  ]
  assert metrics.tokenize_13a('a-b "q"; e.g. x/y') == ["a-b", '"', "q", '"', ";", "e", ".", "g", ".", "x", "/", "y"]


def test_sentence_bleu_smoothing_on_hand_computed_examples():
  # "a b c d e" vs "a b x d e y": p1 = 4/5, p2 = 2/4 (a b, d e), p3 = 0/3, p4 = 0/2; c = 5, r = 6.
  hypothesis, reference = "a b c d e", "a b x d e y"
  brevity = np.exp(1 - 6 / 5)
  expected = {
    "none": 0.0,
    "floor": brevity * np.exp(np.mean(np.log([4 / 5, 2 / 4, 0.1 / 3, 0.1 / 2]))),  # zero counts -> 0.1
    "add-k": brevity * np.exp(np.mean(np.log([4 / 5, 3 / 5, 1 / 4, 1 / 3]))),  # +1 to orders 2..4
    "exp": brevity * np.exp(np.mean(np.log([4 / 5, 2 / 4, 1 / (2 * 3), 1 / (4 * 2)]))),  # 1 / (2^i count)
  }
  for smooth, value in expected.items():
    assert metrics.sentence_bleu(hypothesis, reference, smooth=smooth) == pytest.approx(value, rel=1e-12), smooth
  assert metrics.sentence_bleu(hypothesis, [reference], smooth="floor", smooth_value=0.5) == pytest.approx(
    brevity * np.exp(np.mean(np.log([4 / 5, 2 / 4, 0.5 / 3, 0.5 / 2]))), rel=1e-12
  )
  # "a b" vs "a b c": no 3-grams at all. Effective order: the mean over orders 1..2 (p = 1, 1), BP = exp(-1/2);
  # without it BLEU is 0 (add-k still counts 1/1 for the orders 3 and 4).
  assert metrics.sentence_bleu("a b", "a b c") == pytest.approx(np.exp(-0.5), rel=1e-12)
  assert metrics.sentence_bleu("a b", "a b c", effective_order=False) == 0.0
  assert metrics.sentence_bleu("a b", "a b c", smooth="add-k", effective_order=False) == pytest.approx(np.exp(-0.5))
  # Tokenizers: 13a splits the punctuation, so "mat." matches "mat"; whitespace tokens do not.
  assert metrics.sentence_bleu("the cat sat on the mat.", "the cat sat on the mat") == pytest.approx(
    np.exp(np.mean(np.log([6 / 7, 5 / 6, 4 / 5, 3 / 4]))), rel=1e-12
  )  # c = 7 > r = 6, BP = 1
  assert metrics.sentence_bleu(
    "the cat sat on the mat.", "the cat sat on the mat", tokenize="whitespace"
  ) == pytest.approx(np.exp(np.mean(np.log([5 / 6, 4 / 5, 3 / 4, 2 / 3]))), rel=1e-12)
  # The corpus score smooths the pooled counts the same way; the default (whitespace, none) is unchanged.
  assert metrics.bleu([hypothesis], [reference], smooth="exp") == pytest.approx(expected["exp"], rel=1e-12)
  assert metrics.bleu([hypothesis], [reference]) == 0.0
  with pytest.raises(ValueError, match="smooth must be one of"):
    metrics.sentence_bleu("a", "a", smooth="method1")
  with pytest.raises(ValueError, match="tokenize must be one of"):
    metrics.bleu(["a"], ["a"], tokenize="spacy")


def test_rouge_l_tokenizers():
  # 13a: [Hello , world .] vs [Hello world]: L = 2, P = 2/4, R = 1, F1 = 2/3; whitespace: no common token.
  assert metrics.rouge_l(["Hello, world."], ["Hello world"], tokenize="13a") == pytest.approx(2 / 3)
  assert metrics.rouge_l(["Hello, world."], ["Hello world"]) == 0.0
  with pytest.raises(ValueError, match="tokenize must be one of"):
    metrics.rouge_l(["a"], ["a"], tokenize="rouge")
