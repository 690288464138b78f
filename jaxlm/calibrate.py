"""Evaluation and calibration workflows on an `Experiment`: what `--mode=eval` and `--mode=calibrate` run, as a
few library calls a notebook makes too.

    experiment = Experiment.from_workdir("runs/packages")
    calibrate.calibrate(experiment)                         # fit every calibrator, report before/after
    calibrate.evaluate_checkpoint(experiment, "test", calibrator="temperature")

`calibrate_classifier`: every calibrator of `evaluation.calibrators` (`calibration.calibrators`) is fitted on
`calibration.fit_split` of a classifier's checkpoint, then it and the uncalibrated model are evaluated on the
test split (accuracy, macro-F1, NLL, Brier, ECE, MCE with bootstrap intervals; each calibrator against the
uncalibrated model by the paired test). Calibrators are saved as WORKDIR/calibration/calibrator_<name>_step<S>.json
(S: the checkpoint's step), so `evaluate_checkpoint(..., calibrator=name)` applies one to that checkpoint; the
report goes to WORKDIR/calibration/report.json, report.md and reliability_<name>.png (before | after).

`prompted_classification`: a language model classifies `data.name` through the `prompt` section's templates
and label words, with and without each correction of `evaluation.prompting`, over templates and demonstration
draws; WORKDIR/calibration/report.json and report.md give each (shots, correction)'s accuracy, macro-F1, ECE
and NLL as the mean over runs with its bootstrap interval, and the spread (standard deviation, min, max)
across runs. The language model is `init_from`'s checkpoint when set, else the workdir's.
"""

import os

import jax
import numpy as np
from absl import logging

from jaxlm import sharding
from jaxlm.data import pipeline, sources
from jaxlm.evaluation import calibrators as calibrators_lib
from jaxlm.evaluation import prompting, report
from jaxlm.experiment import EVAL_ORDER_SEED, Experiment
from jaxlm.training import checkpoint, steps

CALIBRATION_DIR = "calibration"


def resolve_step(experiment: Experiment, step: str | int = "best", path: str | None = None) -> int:
  """The number of checkpoint `step` ("best", "latest" or a number) of the run at `path` (default: the workdir)."""
  config = experiment.config
  return checkpoint.find_checkpoint(
    path or experiment.workdir, step, config.train.best_metric, config.train.best_mode
  ).step


def _intervals_options(experiment: Experiment) -> dict:
  options = experiment.config.calibration
  return dict(num_bins=options.num_bins, num_resamples=options.num_resamples, confidence=options.confidence)


def _classifier_outputs(experiment: Experiment, params, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(logits [N, C] float32, labels [N]) of every example of `split` (the whole split)."""
  predictions = experiment.predict(params, split, num_batches=-1)
  return predictions.logits.astype(np.float32), predictions.labels


def calibrate_classifier(experiment: Experiment, step: str | int = "best") -> dict:
  """Fits, saves and reports every calibrator of a classifier's checkpoint `step` (see the module docstring)."""
  config, options = experiment.config, experiment.config.calibration
  step = resolve_step(experiment, step)
  params = experiment.load_params(step)
  test_split = config.data.test_split or config.data.eval_split
  fit_logits, fit_labels = _classifier_outputs(experiment, params, options.fit_split)
  test_logits, test_labels = _classifier_outputs(experiment, params, test_split)
  directory = os.path.join(experiment.workdir, CALIBRATION_DIR)
  uncalibrated = _softmax(test_logits)
  interval_options = _intervals_options(experiment)
  rows = {"uncalibrated": report.classification_intervals(uncalibrated, test_labels, **interval_options)}
  comparisons, saved = {}, {}
  for name in calibrators_lib.applicable(tuple(options.calibrators), test_logits.shape[1]):
    calibrator = calibrators_lib.CALIBRATORS[name]().fit(fit_logits, fit_labels)
    saved[name] = calibrator.save(directory, step)
    probs = calibrator(test_logits)
    rows[name] = report.classification_intervals(probs, test_labels, **interval_options)
    comparisons[name] = report.classification_comparisons(probs, uncalibrated, test_labels, **interval_options)
    report.reliability_diagram(
      os.path.join(directory, f"reliability_{name}.png"),
      {"uncalibrated": uncalibrated, name: probs},
      test_labels,
      options.num_bins,
    )
    logging.info(
      "Calibrator %s: test ECE %.4f -> %.4f", name, rows["uncalibrated"]["ece"]["value"], rows[name]["ece"]["value"]
    )
  result = {
    "step": step,
    "fit_split": options.fit_split,
    "fit_examples": len(fit_labels),
    "test_split": test_split,
    "test_examples": len(test_labels),
    "metrics": rows,
    "versus_uncalibrated": comparisons,
    "calibrators": saved,
    "conventions": _conventions(experiment),
  }
  title = (
    f"# Calibration of step {step}: fitted on {options.fit_split} ({len(fit_labels)} examples), tested on "
    f"{test_split} ({len(test_labels)} examples)\n\n{_conventions(experiment)}\n"
  )
  report.write_report(directory, result, title + "\n" + report.markdown_table(rows, comparisons=comparisons))
  return result


def calibrated_probabilities(
  experiment: Experiment, split: str | None = None, step: str | int = "best"
) -> tuple[dict, np.ndarray]:
  """({"uncalibrated": softmax probabilities [N, C], NAME: the probabilities through each calibrator that
  `calibrate_classifier` saved for checkpoint `step`, whatever `calibration.calibrators` chose}, labels [N]) of
  every example of `split` (default: data.test_split, else data.eval_split): what reliability diagrams and
  conformal sets of a notebook draw on."""
  config = experiment.config
  split = split or config.data.test_split or config.data.eval_split
  step = resolve_step(experiment, step)
  logits, labels = _classifier_outputs(experiment, experiment.load_params(step), split)
  directory = os.path.join(experiment.workdir, CALIBRATION_DIR)
  probs = {"uncalibrated": _softmax(logits)}
  for name in calibrators_lib.applicable((), logits.shape[1]):  # every kind, where one was saved for `step`
    if os.path.exists(calibrators_lib.calibrator_path(directory, step, name)):
      probs[name] = calibrators_lib.load(directory, step, name)(logits)
  return probs, labels


def _conventions(experiment: Experiment) -> str:
  options = experiment.config.calibration
  return (
    f"Cells: value [{options.confidence:.0%} percentile bootstrap interval, {options.num_resamples} resamples]. "
    f"ECE/MCE: top-label, {options.num_bins} equal-width right-closed bins. NLL: label probability clipped at "
    f"{report.MIN_PROB}."
  )


def _softmax(logits) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return shifted / shifted.sum(axis=-1, keepdims=True)


def evaluate_checkpoint(
  experiment: Experiment, split: str | None = None, step: str | int = "best", calibrator: str = ""
) -> dict:
  """Evaluates checkpoint `step` on `split` (default: data.test_split, else data.eval_split), optionally through
  the saved calibrator `calibrator` of that step, into WORKDIR/eval/<split>/report.json and report.md.

  Classifiers: the metrics of `report.classification_intervals` on the whole split. Token-level tasks: loss,
  token accuracy and ECE (`report.token_intervals`) over `eval.num_batches` batches of the split.
  """
  config = experiment.config
  split = split or config.data.test_split or config.data.eval_split
  step = resolve_step(experiment, step)
  params = experiment.load_params(step)
  interval_options = _intervals_options(experiment)
  if config.task == "classification":
    logits, labels = _classifier_outputs(experiment, params, split)
    if calibrator:
      probs = calibrators_lib.load(os.path.join(experiment.workdir, CALIBRATION_DIR), step, calibrator)(logits)
    else:
      probs = _softmax(logits)
    metrics = report.classification_intervals(probs, labels, **interval_options)
    examples = len(labels)
  else:
    if calibrator:
      raise ValueError(f"--calibrator applies to classifiers; task {config.task!r} has none.")
    predictions = experiment.predict(params, split, num_batches=config.eval.num_batches)
    arrays = report.token_arrays(predictions.logits, predictions.labels, predictions.weights)
    metrics = report.token_intervals(
      arrays["nll"],
      arrays["confidence"],
      arrays["correct"],
      arrays["weights"],
      interval_options["num_bins"],
      interval_options["num_resamples"],
      interval_options["confidence"],
    )
    examples = len(predictions.labels)
  system = calibrator or "uncalibrated"
  result = {
    "step": step,
    "split": split,
    "examples": examples,
    "calibrator": calibrator,
    "metrics": metrics,
    "conventions": _conventions(experiment),
  }
  title = f"# Step {step} on {split} ({examples} rows), {system}\n\n{_conventions(experiment)}\n\n"
  report.write_report(
    os.path.join(experiment.workdir, "eval", split), result, title + report.markdown_table({system: metrics})
  )
  return result


# ------------------------------------------------------------------------------------- prompted classification


def _label_log_prob_fn(experiment: Experiment, params):
  """batch (a `prompting.continuation_rows` batch) -> [R, T] next-token log-probabilities on the host."""
  task, model, mesh = experiment.task, experiment.model, experiment.mesh
  step = jax.jit(
    lambda params, batch: prompting.next_token_log_probs(
      task.logits(model, params, batch, train=False), batch["tokens"]
    ),
    in_shardings=(experiment.param_shardings, sharding.batch_sharding(mesh)),
    out_shardings=sharding.replicated(mesh),
  )

  def log_prob_fn(batch):
    inputs = {key: batch[key] for key in ("tokens", "positions", "segment_ids")}
    with sharding.mesh_context(mesh):
      return jax.device_get(step(params, steps.to_global(inputs, mesh)))

  return log_prob_fn


def _labelled_texts(experiment: Experiment, split: str, limit: int = -1) -> tuple[list[str], np.ndarray]:
  """(texts, labels) of `split` in a fixed shuffled order (the first `limit`; -1 = all)."""
  data = experiment.config.data
  source = experiment.source(split)
  order = np.random.default_rng(EVAL_ORDER_SEED).permutation(len(source))
  order = order if limit == -1 else order[:limit]
  records = [(int(i), source[int(i)]) for i in order]
  texts = [pipeline.record_text(record, data.text_field, i, data.name) for i, record in records]
  labels = np.asarray([int(record[data.label_field]) for _, record in records])
  return texts, labels


def prompted_classification(experiment: Experiment, step: str | int = "latest") -> dict:
  """Zero/few-shot classification by a language model, with and without each correction (module docstring)."""
  config, options = experiment.config, experiment.config.prompt
  if experiment.task.name != "causal_lm":
    raise ValueError(f"prompted classification needs a language model (task 'causal_lm'), got {config.task!r}.")
  model_path = config.init_from or experiment.workdir
  step = resolve_step(experiment, step, model_path)
  params = experiment.load_params(step, path=model_path)
  tokenizer = experiment.tokenizer
  class_names = sources.class_names(config.data.name, config.data.data_dir or None, config.data.label_field)
  label_words = list(options.label_words) or [" " + name for name in class_names]
  if len(label_words) != len(class_names):
    raise ValueError(f"prompt.label_words: {len(label_words)} words for {len(class_names)} classes {class_names}.")
  label_tokens = [tokenizer.encode(word) for word in label_words]
  cut = lambda text: tokenizer.decode(tokenizer.encode(text)[: options.max_text_tokens])
  texts, labels = _labelled_texts(experiment, options.split, options.num_examples)
  texts = [cut(text) for text in texts]
  train_source = experiment.source(config.data.train_split)
  max_len = experiment.model_config.max_len
  parallel = sharding.data_parallel_size(experiment.mesh)
  log_prob_fn = _label_log_prob_fn(experiment, params)

  def score(prompts):
    """[N, C] label-word scores of token prompts, in rows as long as the longest needs (multiples of 32)."""
    longest = max(len(p) for p in prompts) + max(len(t) for t in label_tokens)
    if longest > max_len:
      raise ValueError(
        f"prompt.max_text_tokens: a prompt needs {longest} tokens, more than model.max_len={max_len}; "
        "lower prompt.max_text_tokens or prompt.shots."
      )
    return prompting.score_label_words(
      log_prob_fn,
      prompts,
      label_tokens,
      min(max_len, -(-longest // 32) * 32),
      tokenizer.pad_id,
      options.score,
      options.prompts_per_batch,
      parallel,
    )

  def scores(template, inputs, demonstrations):
    return score(
      [
        tokenizer.bos_prefix + tokenizer.encode(prompting.build_prompt(template, text, demonstrations))
        for text in inputs
      ]
    )

  runs = []
  domain = prompting.domain_texts(texts, options.domain_texts, seed=0)
  for template in options.templates:
    for shots in options.shots:
      for order in range(options.orders if shots else 1):
        demonstrations = []
        for i in prompting.draw_demonstrations(len(train_source), shots, seed=order):
          record = train_source[int(i)]
          text = pipeline.record_text(record, config.data.text_field, int(i), config.data.name)
          demonstrations.append((cut(text), label_words[int(record[config.data.label_field])]))
        test_scores = scores(template, texts, demonstrations)
        priors = {
          "contextual": lambda: scores(template, list(options.content_free), demonstrations),
          "domain": lambda: scores(template, domain, demonstrations),
          "pmi": lambda: score([tokenizer.bos_prefix + tokenizer.encode(prompting.answer_prefix(template))]),
        }
        probs = {}
        for name in options.corrections:
          correction = prompting.Correction(name, priors[name]() if name in priors else None, options.batch_size)
          probs[name] = correction.probabilities(test_scores)
        runs.append({"template": template, "shots": shots, "order": order, "probs": probs})
        logging.info(
          "Prompted %d-shot, template %r, order %d: accuracy %s",
          shots,
          template,
          order,
          {name: round(float((p.argmax(-1) == labels).mean()), 4) for name, p in probs.items()},
        )
  return _prompted_report(experiment, runs, labels, step, model_path, label_words)


def _prompted_report(experiment, runs, labels, step, model_path, label_words) -> dict:
  """Per (shots, correction): mean over runs with bootstrap intervals, and the spread across runs."""
  options, interval_options = experiment.config.prompt, _intervals_options(experiment)
  table, summary, per_run = {}, {}, []
  for run in runs:
    for name, probs in run["probs"].items():
      per_run.append(
        {
          "template": run["template"],
          "shots": run["shots"],
          "order": run["order"],
          "correction": name,
          **prompting.accuracy_and_macro_f1(probs, labels),
        }
      )
  for shots in options.shots:
    for name in options.corrections:
      stacked = np.stack([run["probs"][name] for run in runs if run["shots"] == shots], axis=1)  # [N, R, C]
      key = f"{shots}-shot {name}"
      table[key] = report.classification_intervals(stacked, labels, **interval_options)
      values = {
        metric: [row[metric] for row in per_run if row["shots"] == shots and row["correction"] == name]
        for metric in ("accuracy", "macro_f1")
      }
      summary[key] = {
        metric: {
          "mean": float(np.mean(v)),
          "std": float(np.std(v)),
          "min": float(np.min(v)),
          "max": float(np.max(v)),
          "runs": len(v),
        }
        for metric, v in values.items()
      }
  result = {
    "model": model_path,
    "step": step,
    "split": options.split,
    "examples": len(labels),
    "templates": list(options.templates),
    "label_words": label_words,
    "score": options.score,
    "metrics": table,
    "spread": summary,
    "runs": per_run,
    "conventions": _conventions(experiment),
  }
  spread = ["| setting | accuracy mean ± std [min, max] | macro-F1 mean ± std [min, max] |", "|---|---|---|"]
  spread += [
    f"| {key} | "
    + " | ".join(
      f"{s[m]['mean']:.4f} ± {s[m]['std']:.4f} [{s[m]['min']:.4f}, {s[m]['max']:.4f}]" for m in ("accuracy", "macro_f1")
    )
    + " |"
    for key, s in summary.items()
  ]
  markdown = (
    f"# Prompted classification of {experiment.config.data.name}/{options.split} ({len(labels)} examples) "
    f"by {model_path} step {step}\n\n{len(options.templates)} templates, label words scored by their "
    f"{options.score} log-probability. Metrics averaged over the runs (templates x demonstration draws); "
    f"{_conventions(experiment)}\n\n" + report.markdown_table(table) + "\n\nSpread across runs:\n\n" + "\n".join(spread)
  )
  report.write_report(os.path.join(experiment.workdir, CALIBRATION_DIR), result, markdown)
  return result


def calibrate(experiment: Experiment, step: str | int | None = None) -> dict:
  """`--mode=calibrate`: a classifier's calibrators (`calibrate_classifier`, default step "best"), or a language
  model's prompted classification (`prompted_classification`, default step "latest")."""
  if experiment.config.task == "classification":
    return calibrate_classifier(experiment, step or "best")
  return prompted_classification(experiment, step or "latest")
