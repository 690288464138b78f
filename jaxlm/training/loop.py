"""The one train / eval loop, for pretraining and fine-tuning alike (the task supplies model, batches and metrics).

`train_and_evaluate(config, workdir)`:
  1. validates the config and writes WORKDIR/config.json;
  2. builds the mesh, the tokenizer (`data.tokenizer`, else the `init_from` run's, else one trained on the
     train split), the task (`jaxlm.tasks`), its model and batches, and the optimizer with its trainable mask;
  3. restores, in this order: the latest checkpoint in WORKDIR/checkpoints (state and data position), else the
     `init_from` run's parameters (new ones, like a classification head, initialised from `config.seed`),
     else initialises everything from `config.seed`; a `distill.teacher` is restored as a frozen teacher;
  4. compiles the train and eval steps once, before the loop, and logs their memory;
  5. trains, logging every `train.log_every` steps, evaluating on `data.eval_split` every `train.eval_every`
     and checkpointing every `train.checkpoint_every` (kept: the latest ones and the best by
     `train.best_metric`); stops early after `train.early_stopping_patience` evaluations without a better
     best metric (the count restarts when a run resumes); on SIGTERM it saves a checkpoint and returns;
  6. evaluates, saves a final checkpoint; with `data.test_split`, evaluates the best checkpoint on it and writes
     WORKDIR/eval/report.json; prints a greedy sample (language-model tasks).
"""

import itertools
import json
import os
import signal
import sys
import time

import jax
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils
from absl import logging

from jaxlm import configs, sharding, tasks
from jaxlm.data import pipeline, sources
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.evaluation import metrics as metrics_lib
from jaxlm.inference import generate
from jaxlm.models.config import ConfigError, ModelConfig
from jaxlm.tasks import distillation
from jaxlm.training import checkpoint, optim, pretrained, steps
from jaxlm.training import state as state_lib
from jaxlm.training.writer import MetricWriter

EVAL_ORDER_SEED = 0  # fixed, so every run and seed evaluates on the same documents


class _PreemptionFlag:
  """Set by SIGTERM; the loop checks it between steps, saves and returns."""

  def __init__(self):
    self.requested = False
    self._previous = None

  def __enter__(self):
    def handler(signum, frame):
      del signum, frame
      self.requested = True
    self._previous = signal.signal(signal.SIGTERM, handler)
    return self

  def __exit__(self, *exc):
    signal.signal(signal.SIGTERM, self._previous)


def _check_batch_sizes(config, mesh) -> None:
  """Batches must split evenly over the data-parallel shards, the processes and the data streams."""
  parallel, processes = sharding.data_parallel_size(mesh), jax.process_count()
  streams = config.data.num_streams or processes
  if streams % processes:
    raise ConfigError(f"data.num_streams={streams} must be a multiple of the {processes} processes.")
  for key, size in (("train.batch_size", config.train.batch_size // config.train.grad_accum_steps),
                    ("eval.batch_size", config.eval.batch_size)):
    per = "per micro-batch " if key.startswith("train") and config.train.grad_accum_steps > 1 else ""
    if size % parallel or size % streams:
      raise ConfigError(f"{key}: the batch {per}({size} rows) must divide over the {parallel} data-parallel "
                        f"shards (mesh.data x mesh.fsdp) and the {streams} data streams (data.num_streams, "
                        f"one per process by default).")


def _tokenizer(config, train_source) -> Tokenizer:
  """`data.tokenizer`, else the tokenizer of the `init_from` run, else one trained on the train split."""
  if not config.data.tokenizer and config.init_from:
    return Tokenizer(pretrained.tokenizer_path(pretrained.resolve(config.init_from)[1]))
  return pipeline.tokenizer_for(config.data, train_source)


def _num_classes(config) -> int:
  """Classes of `data.label_field` in the dataset's features (0 for tasks without labels)."""
  if config.task != "classification":
    return 0
  features = sources.get_builder(config.data.name, config.data.data_dir or None).info.features
  feature = features[config.data.label_field] if config.data.label_field in features else None
  if not hasattr(feature, "num_classes"):
    raise ConfigError(f"data.label_field: {config.data.label_field!r} is not a class label of {config.data.name!r} "
                      f"(features: {sorted(features)}).")
  return feature.num_classes


def _streams(config) -> tuple[int, list[int]]:
  """(number of data streams, the streams this process feeds): see `pipeline.process_streams`."""
  num_streams = config.data.num_streams or jax.process_count()
  return num_streams, pipeline.process_streams(num_streams, jax.process_index(), jax.process_count())


def _train_batches(config, task, tokenizer, source):
  """This process's rows of every training batch: one batch of each of its streams, side by side."""
  num_streams, streams = _streams(config)
  return pipeline.zip_streams([
      task.batches(source, tokenizer, batch_size=config.train.batch_size // num_streams, shuffle_seed=config.seed,
                   repeat=True, stream_index=index, stream_count=num_streams) for index in streams])


def _eval_batches(config, task, tokenizer, split: str, limit: int | None) -> list[dict]:
  """This process's rows of the first `limit` eval batches (None: all) of `split`.

  Evaluation reads the split once in a fixed shuffled order, so that the first batches are a representative
  sample, and the same one at every evaluation.
  """
  source = sources.get_source(config.data.name, split, config.data.data_dir or None)
  num_streams, streams = _streams(config)
  rows = config.eval.batch_size // num_streams
  eval_streams = [list(itertools.islice(task.batches(source, tokenizer, batch_size=rows, shuffle_seed=EVAL_ORDER_SEED,
                                                     repeat=False, stream_index=index, stream_count=num_streams),
                                        limit)) for index in streams]
  # Every process must run the same number of eval steps: shorter streams are padded with empty batches.
  num_eval = max(len(batches) for batches in eval_streams)
  if jax.process_count() > 1:
    num_eval = int(np.max(multihost_utils.process_allgather(np.int32(num_eval))))
  if not num_eval:
    raise ValueError(f"The {split!r} split of {config.data.name!r} gave no eval batch.")
  empty = pipeline.padding_batch(task.batch_shapes(rows))
  return [pipeline.concat_rows(batches) for batches in
          zip(*[batches + [empty] * (num_eval - len(batches)) for batches in eval_streams])]


def _teacher(config, task, mesh):
  """(model, params) of `distill.teacher`, restored whole into the shardings of its own config."""
  state_dir, teacher_config = pretrained.resolve(config.distill.teacher)
  teacher_model = task.build_model(ModelConfig.from_config(teacher_config["model"]))
  abstract, _ = state_lib.state_shardings(teacher_model, optax.set_to_zero(), config.data.seq_len, mesh)
  params, _ = pretrained.restore_params(state_dir, abstract.params, new_params=None, allow_adapters=False)
  return teacher_model, params


def _to_global(batch: dict, batch_sharding) -> dict:
  """This process's rows -> global arrays laid out over the mesh."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, value) for key, value in batch.items()}


def _log_compiled(name: str, compiled) -> None:
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info("%s: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB per device", name,
                 memory.argument_size_in_bytes / 2**20, memory.output_size_in_bytes / 2**20,
                 memory.temp_size_in_bytes / 2**20)


def _generation_scores(config, task, tokenizer, model, params, mesh, step: int) -> dict:
  """Greedy outputs for the first `eval.generate_examples` test examples against their references:
  exact match, ROUGE-L F1, corpus BLEU and the examples themselves."""
  source = sources.get_source(config.data.name, config.data.test_split, config.data.data_dir or None)
  records = [(index, source[index]) for index in range(min(config.eval.generate_examples, len(source)))]
  prompts = [task.prompt_text(tokenizer, record, index) for index, record in records]
  outputs = generate.generate(model, params, tokenizer, prompts, mesh=mesh, strategy="greedy",
                              max_new_tokens=config.eval.max_new_tokens)
  generated = [output.text.strip() for output in outputs]
  references = [pipeline.record_text(record, task.target_field, index, config.data.name).strip()
                for index, record in records]
  scores = {"exact_match": metrics_lib.exact_match(generated, references),
            "rouge_l": metrics_lib.rouge_l(generated, references), "bleu": metrics_lib.bleu(generated, references)}
  logging.info("step %d test generation over %d examples: %s", step, len(records), scores)
  return {**scores, "examples": [{"reference": r, "generated": g} for r, g in zip(references, generated)]}


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains and evaluates `config` in `workdir`; returns the last eval metrics."""
  model_config = configs.validate(config)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  writer = MetricWriter(workdir)
  writer.write_config(workdir, config)
  mesh = sharding.create_mesh(config.mesh)
  _check_batch_sizes(config, mesh)
  sharding.check_model_fits_mesh(model_config, mesh.shape)
  logging.info("Mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

  data = config.data
  train_source = sources.get_source(data.name, data.train_split, data.data_dir or None)
  tokenizer = _tokenizer(config, train_source)
  if tokenizer.vocab_size > model_config.vocab_size:
    raise ConfigError(f"model.vocab_size: {model_config.vocab_size} rows cannot embed the tokenizer's "
                      f"{tokenizer.vocab_size} pieces ({tokenizer.path}); raise model.vocab_size.")
  task = tasks.create(config, _num_classes(config))
  train_iterator = iter(_train_batches(config, task, tokenizer, train_source))
  eval_batches = _eval_batches(config, task, tokenizer, data.eval_split,
                               None if config.eval.num_batches == -1 else config.eval.num_batches)
  eval_baselines = task.baselines(eval_batches)
  model = task.build_model(model_config)
  if config.distill.teacher:
    teacher_model, teacher_params = _teacher(config, task, mesh)
    task = distillation.Distillation(task, teacher_model, teacher_params, config.distill.weight,
                                     config.distill.temperature)
  train = config.train
  trainable = None
  if train.trainable != "all" or train.frozen:
    trainable = lambda params: optim.trainable_mask(params, train.trainable, train.frozen, task.new_params)
  optimizer, schedule = optim.create_optimizer(train, trainable)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))

  # Restore order: the workdir's latest checkpoint, else `init_from` (+ new parameters), else a fresh init.
  abstract_state, state_sharding = state_lib.state_shardings(model, optimizer, data.seq_len, mesh)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=train.keep_checkpoints,
                                         best_metric=train.best_metric, best_mode=train.best_mode)
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("Resuming from the checkpoint at step %d in %s", latest, workdir)
    state = checkpointer.restore(latest, abstract_state, train_iterator)
  else:
    state = state_lib.create_train_state(model, optimizer, data.seq_len, mesh, state_sharding, init_rng)
    if config.init_from:
      logging.info("No checkpoint in %s: starting from %s (new parameters from seed %d)", workdir, config.init_from,
                   config.seed)
      params, _ = pretrained.restore_params(pretrained.resolve(config.init_from)[0], state.params, task.new_params)
      state = state.replace(params=params)
    else:
      logging.info("No checkpoint in %s: initialising from seed %d", workdir, config.seed)
  mask = jax.tree.leaves(trainable(state.params)) if trainable else [True] * len(jax.tree.leaves(state.params))
  trainable_count = sum(int(x.size) for x, trains in zip(jax.tree.leaves(state.params), mask) if trains)
  total_count = state_lib.count_params(state.params)
  logging.info("Model: %s parameters, %s trainable", f"{total_count:,}", f"{trainable_count:,}")

  batch_sharding = sharding.batch_sharding(mesh)
  global_batch = lambda rows: {key: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding)
                               for key, shape in task.batch_shapes(rows).items()}
  train_step, eval_step = steps.jit_steps(model=model, task=task, optimizer=optimizer, schedule=schedule,
                                          dropout_rng=dropout_rng, grad_accum_steps=train.grad_accum_steps,
                                          state_sharding=state_sharding, mesh=mesh)
  with sharding.mesh_context(mesh):
    start = time.perf_counter()
    train_step = train_step.lower(abstract_state, global_batch(train.batch_size)).compile()
    eval_step = eval_step.lower(abstract_state.params, global_batch(config.eval.batch_size)).compile()
  logging.info("Compiled the train and eval steps in %.1f s", time.perf_counter() - start)
  _log_compiled("train_step", train_step)

  def evaluate(params, batches) -> dict:
    totals = None
    for batch in batches:
      sums = eval_step(params, _to_global(batch, batch_sharding))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    return task.summarize(jax.device_get(totals))

  def evaluate_and_log(step: int, params) -> dict:
    metrics = {**evaluate(params, eval_batches), **eval_baselines}
    writer.write(step, "eval", metrics)
    logging.info("step %d eval: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  step = int(state.step)
  eval_metrics = {}
  best_value, evals_without_improvement = None, 0
  better = (lambda a, b: a < b) if train.best_mode == "min" else (lambda a, b: a > b)
  best_key = train.best_metric.removeprefix("eval_")
  tokens_per_step = train.batch_size * data.seq_len
  progress = tqdm.tqdm(total=train.steps, initial=step, desc="train", unit="step",
                       disable=jax.process_index() != 0 or not sys.stderr.isatty())
  try:
    with _PreemptionFlag() as preemption:
      interval_start, interval_steps = time.perf_counter(), 0
      while step < train.steps:
        state, metrics = train_step(state, _to_global(next(train_iterator), batch_sharding))
        step += 1
        interval_steps += 1
        progress.update(1)
        if step % train.log_every == 0 or step == train.steps:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - interval_start
          row = {**task.summarize(metrics), **{k: metrics[k] for k in
                 ("grad_norm", "update_norm", "param_norm", "learning_rate")},
                 "tokens_per_sec": interval_steps * tokens_per_step / elapsed}
          writer.write(step, "train", row)
          progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
          logging.info("step %d train: loss %.4f, %.0f tokens/s", step, row["loss"], row["tokens_per_sec"])
          interval_start, interval_steps = time.perf_counter(), 0
        evaluated_now = (train.eval_every and step % train.eval_every == 0) or step == train.steps
        stop_early = False
        if evaluated_now:
          eval_metrics = evaluate_and_log(step, state.params)
          if best_key not in eval_metrics:
            raise ConfigError(f"train.best_metric: {train.best_metric!r} is not an eval metric of this task; "
                              f"choose one of {sorted('eval_' + k for k in eval_metrics)}.")
          if best_value is None or better(eval_metrics[best_key], best_value):
            best_value, evals_without_improvement = eval_metrics[best_key], 0
          else:
            evals_without_improvement += 1
            stop_early = 0 < train.early_stopping_patience <= evals_without_improvement
        if step % train.checkpoint_every == 0 or step == train.steps or preemption.requested or stop_early:
          # Only checkpoints evaluated at their own step compete for "best".
          checkpointer.save(step, state, train_iterator,
                            metrics={train.best_metric: eval_metrics[best_key]} if evaluated_now else None)
        if preemption.requested:
          logging.warning("SIGTERM: saved the checkpoint at step %d; rerun the same command to resume.", step)
          return eval_metrics
        if stop_early:
          logging.info("Early stopping at step %d: %s has not improved on %.4f for %d evaluations.", step,
                       train.best_metric, best_value, evals_without_improvement)
          break
      if not eval_metrics:  # resumed a finished run
        eval_metrics = evaluate_and_log(step, state.params)
    checkpointer.wait()

    if data.test_split:
      best_step = checkpointer.best_step() or step
      best_params = checkpointer.restore(best_step, abstract_state, train_iterator).params
      test_batches = _eval_batches(config, task, tokenizer, data.test_split, None)
      test_metrics = evaluate(best_params, test_batches)
      report = {"split": data.test_split, "checkpoint_step": best_step, "best_metric": train.best_metric,
                "metrics": test_metrics, "baselines": task.baselines(test_batches),
                "trainable": train.trainable, "trainable_params": trainable_count, "total_params": total_count}
      if config.eval.generate_examples:  # every process runs the (sharded) decode
        report["generation"] = _generation_scores(config, task, tokenizer, model, best_params, mesh, best_step)
      logging.info("test (%s, checkpoint %d): %s", data.test_split, best_step, test_metrics)
      if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "report.json"), "w") as f:
          json.dump(report, f, indent=2)
  finally:
    progress.close()
    checkpointer.close()  # waits for pending saves
    writer.close()

  # Every process runs the (sharded) decode.
  if config.task != "classification" and config.sample.prompt and config.sample.max_new_tokens:
    sample = generate.generate(model, state.params, tokenizer, [config.sample.prompt], mesh=mesh,
                               max_new_tokens=config.sample.max_new_tokens)[0]
    if jax.process_index() == 0:
      print(f"--- greedy sample (step {step}) ---\n{config.sample.prompt}{sample.text}\n---", flush=True)
  return eval_metrics
