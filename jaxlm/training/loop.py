"""The one train / eval loop, for pretraining and fine-tuning alike (the task supplies model, batches and metrics).

`train_and_evaluate(experiment)` (what `jaxlm.Experiment.train()` runs; everything is set up by the
experiment: config, task, model, tokenizer, mesh, data):
  1. locks the workdir (one run at a time) and prepares the data;
  2. builds the optimizer with its trainable mask (`optim.optimizer_for`);
  3. restores, in this order: the latest checkpoint in WORKDIR/checkpoints (state and data position; its config
     must match config.json but for `workdir.RESUMABLE_KEYS`; a damaged one is moved aside), else the
     parameters of `Experiment.init_params` (the `init_from` run's, new ones like a classification head
     initialised from `config.seed`; or all from `config.seed`); a `distill.teacher` is restored as a frozen
     teacher (`Experiment.training_task`);
  4. compiles the train and eval steps once, before the loop, and logs their memory; only then, set up, writes
     WORKDIR/config.json and WORKDIR/tokenizer.model (a copy) and cuts metrics.jsonl back to the restored step;
  5. trains, logging every `train.log_every` steps, evaluating on `data.eval_split` every `train.eval_every`
     and checkpointing every `train.checkpoint_every` (kept: the latest ones and the best by
     `train.best_metric`); stops early after `train.early_stopping_patience` evaluations without a better
     best metric (a resumed run replays the count from its metrics.jsonl); on SIGTERM or Ctrl-C it saves a
     checkpoint and returns. An update that is not finite is never applied nor saved: the run stops at the next log or
     checkpoint step (default) or counts it in `skipped_updates` (`train.skip_nonfinite_updates`);
  6. evaluates, saves a final checkpoint; with `data.test_split`, evaluates the best checkpoint on it and writes
     WORKDIR/eval/report.json (with the task's `test_report` extras); prints a greedy sample when the task
     generates text.
"""

import json
import os
import signal
import sys
import time

import jax
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from jaxlm import sharding
from jaxlm.compression import pruning
from jaxlm.errors import ConfigError, NonFiniteLossError, check
from jaxlm.inference import generate
from jaxlm.models import params as params_lib
from jaxlm.training import checkpoint, optim, steps
from jaxlm.training import state as state_lib
from jaxlm.training import workdir as workdir_lib
from jaxlm.training.writer import MetricWriter, read_rows


class _Interrupts:
  """SIGTERM (preemption) and SIGINT (Ctrl-C) ask the loop to save a checkpoint and return; a second Ctrl-C
  aborts at once (KeyboardInterrupt).

  The flag is per process, and the save is collective: on several processes they agree every
  `AGREE_EVERY_STEPS` steps (an all-gather of the flags, one tiny host sync) and all stop at the same step.
  """

  AGREE_EVERY_STEPS = 5
  SIGNALS = (signal.SIGTERM, signal.SIGINT)

  def __init__(self):
    self.received = None  # name of the first signal received by this process
    self._previous = {}

  def __enter__(self):
    def handler(signum, frame):
      del frame
      if signum == signal.SIGINT and self.received:
        raise KeyboardInterrupt
      self.received = signal.Signals(signum).name
      logging.warning("%s: saving a checkpoint, then stopping (Ctrl-C again aborts at once).", self.received)

    self._previous = {signum: signal.signal(signum, handler) for signum in self.SIGNALS}
    return self

  def __exit__(self, *exc):
    for signum, previous in self._previous.items():
      signal.signal(signum, previous)

  def stop_at(self, step: int) -> bool:
    """Whether every process stops at `step` (call it once per step, on every process)."""
    if jax.process_count() == 1:
      return self.received is not None
    if step % self.AGREE_EVERY_STEPS:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.int32(self.received is not None))))


def check_config(config) -> None:
  """Validates the loop's keys: the `train` schedule of steps, evaluations and checkpoints, and `sample`."""
  train = config.train
  for key in ("steps", "batch_size", "grad_accum_steps", "log_every", "checkpoint_every", "keep_checkpoints"):
    check(train[key] > 0, f"train.{key}", f"must be positive, got {train[key]}.")
  check(train.eval_every >= 0, "train.eval_every", f"must be >= 0, got {train.eval_every}.")
  check(
    train.batch_size % train.grad_accum_steps == 0,
    "train.grad_accum_steps",
    f"{train.grad_accum_steps} micro-batches do not divide train.batch_size={train.batch_size}.",
  )
  check(train.best_mode in ("min", "max"), "train.best_mode", f"must be 'min' or 'max', got {train.best_mode!r}.")
  check(
    not train.best_metric.startswith(("eval_", "train_")),
    "train.best_metric",
    f"name the metric as in metrics.jsonl's eval rows, e.g. {train.best_metric.split('_', 1)[-1]!r}.",
  )
  check(train.early_stopping_patience >= 0, "train.early_stopping_patience", "must be >= 0 (0 = off).")
  check(config.sample.max_new_tokens >= 0, "sample.max_new_tokens", "must be >= 0.")


def _log_compiled(name: str, compiled) -> None:
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info(
      "%s: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB per device",
      name,
      memory.argument_size_in_bytes / 2**20,
      memory.output_size_in_bytes / 2**20,
      memory.temp_size_in_bytes / 2**20,
    )


def _metric_names(task, compiled_eval_step) -> list[str]:
  """The names `task.summarize` reports for eval sums, found from the compiled eval step without running it."""
  sums = compiled_eval_step.out_info
  return sorted(task.summarize(jax.tree.map(lambda x: np.zeros(x.shape, x.dtype), sums)))


def _finished_run_metrics(workdir: str, config, latest: int | None) -> dict | None:
  """The last eval metrics of a run that already finished (its latest checkpoint at `train.steps`, evaluated at
  that step, and its test report written when there is a test split), else None. Rerunning a finished run (a
  notebook's "train it unless it is there" cell) then costs a restore, not compiles, evaluations and a sample."""
  if latest is None or latest < config.train.steps:
    return None
  rows = [row for row in read_rows(workdir, "eval") if row["step"] == latest]
  if not rows or (config.data.test_split and not os.path.exists(os.path.join(workdir, "eval", "report.json"))):
    return None
  return {key: value for key, value in rows[-1].items() if key not in ("step", "split")}


def best_so_far(values, better, best=None, since: int = 0) -> tuple:
  """(best value, evaluations since it last improved) after `values` in order, from (`best`, `since`): the state
  of early stopping, which a resumed run replays from the eval rows of its metrics history."""
  for value in values:
    best, since = (value, 0) if best is None or better(value, best) else (best, since + 1)
  return best, since


def train_and_evaluate(experiment) -> dict:
  """Trains and evaluates `experiment` (a `jaxlm.Experiment`) in its workdir; returns the last eval metrics.

  The workdir is locked for the run: a second run on it is refused (`workdir.lock`)."""
  workdir_lib.make_workdir(experiment.workdir)
  with workdir_lib.lock(experiment.workdir):
    return _train_and_evaluate(experiment)


def _train_and_evaluate(experiment) -> dict:
  config, workdir = experiment.config, experiment.workdir
  train, data = config.train, config.data
  mesh = experiment.mesh
  logging.info("Mesh %s over %d devices (%s)", dict(mesh.shape), mesh.size, jax.devices()[0].platform)

  task, model, tokenizer = experiment.training_task(), experiment.model, experiment.tokenizer
  train_iterator = iter(experiment.train_batches())
  eval_batches = experiment.eval_batches()
  eval_baselines = task.baselines(eval_batches)
  optimizer, schedule, trainable = optim.optimizer_for(train, task.new_params)

  # Restore order: the workdir's latest checkpoint, else `Experiment.init_params` (`init_from` or a fresh init).
  abstract_state, state_sharding = state_lib.state_shardings(model, optimizer, mesh)
  checkpointer = checkpoint.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    keep=train.keep_checkpoints,
    best_metric=train.best_metric,
    best_mode=train.best_mode,
  )
  if checkpointer.latest_step() is not None:
    workdir_lib.check_resumable(workdir, config)
  latest, state = checkpointer.restore_latest(abstract_state, train_iterator)
  if latest is not None:
    logging.info("Resuming from the checkpoint at step %d in %s", latest, workdir)
  else:
    if not config.init_from:
      logging.info("No checkpoint in %s: initialising from seed %d", workdir, config.seed)
    state = state_lib.create_train_state(experiment.init_params(), optimizer, state_sharding, mesh)
  mask = jax.tree.leaves(trainable(state.params)) if trainable else [True] * len(jax.tree.leaves(state.params))
  trainable_count = sum(int(x.size) for x, trains in zip(jax.tree.leaves(state.params), mask) if trains)
  total_count = params_lib.count(state.params)
  logging.info("Model: %s parameters, %s trainable", f"{total_count:,}", f"{trainable_count:,}")
  finished = _finished_run_metrics(workdir, config, latest)
  if finished is not None:  # its final checkpoint restored above: a damaged one would have been moved aside
    checkpointer.close()
    logging.info(
      "The run in %s finished at step %d: nothing to train (--mode=generate samples from it). Last evaluation: %s",
      workdir,
      latest,
      {k: round(v, 4) for k, v in finished.items()},
    )
    return finished

  batch_sharding = sharding.batch_sharding(mesh)
  global_batch = lambda rows: {
    key: jax.ShapeDtypeStruct(shape, np.int32, sharding=batch_sharding)
    for key, shape in task.batch_shapes(rows).items()
  }
  dropout_rng = jax.random.split(jax.random.key(config.seed))[1]
  train_step = steps.jit_train_step(
    model=model,
    task=task,
    optimizer=optimizer,
    schedule=schedule,
    dropout_rng=dropout_rng,
    grad_accum_steps=train.grad_accum_steps,
    state_sharding=state_sharding,
    mesh=mesh,
  )
  eval_step = steps.jit_eval_step(model=model, task=task, param_sharding=state_sharding.params, mesh=mesh)
  with sharding.mesh_context(mesh):
    start = time.perf_counter()
    train_step = train_step.lower(abstract_state, global_batch(train.batch_size)).compile()
    eval_step = eval_step.lower(abstract_state.params, global_batch(config.eval.batch_size)).compile()
    metric_names = _metric_names(task, eval_step)
  logging.info("Compiled the train and eval steps in %.1f s", time.perf_counter() - start)
  _log_compiled("train_step", train_step)
  if train.best_metric not in metric_names:
    raise ConfigError(
      f"train.best_metric: {train.best_metric!r} is not an eval metric of task {config.task!r}; "
      f"choose one of {metric_names}."
    )
  # Set up: only now is the workdir's config written, and its metric history cut back to the restored step.
  workdir_lib.write_config(workdir, config)
  experiment.save_tokenizer()
  step = int(state.step)
  writer = MetricWriter(workdir, step)

  def evaluate_and_log(step: int, params) -> dict:
    metrics = {**task.summarize(steps.evaluate(eval_step, params, eval_batches, mesh)), **eval_baselines}
    writer.write(step, "eval", metrics)
    logging.info("step %d eval: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  eval_metrics = {}
  better = (lambda a, b: a < b) if train.best_mode == "min" else (lambda a, b: a > b)
  best_key = train.best_metric
  # Early stopping resumes where it was: replayed from the evaluations this history already holds.
  best_value, evals_without_improvement = best_so_far(
    [row[best_key] for row in read_rows(workdir, "eval") if row["step"] <= step and best_key in row], better
  )
  tokens_per_step = train.batch_size * data.seq_len
  progress = tqdm.tqdm(
    total=train.steps,
    initial=step,
    desc="train",
    unit="step",
    disable=jax.process_index() != 0 or not sys.stderr.isatty(),
  )
  # On the device: each step's count of updates not applied, since the last check (no host sync per step, and no
  # small program per step either: see steps.evaluate for the XLA:CPU deadlock such programs can cause).
  nonfinite = []
  skipped = 0  # updates skipped (train.skip_nonfinite_updates) in the current logging interval

  def check_updates(step: int) -> None:
    """At log steps and before every save (one host sync): stops on a non-finite update unless they are skipped."""
    nonlocal nonfinite, skipped
    count = int(sum(jax.device_get(nonfinite)))
    nonfinite = []
    if count and not train.skip_nonfinite_updates:
      raise NonFiniteLossError(
        f"{count} update(s) up to step {step} were not finite (NaN/Inf gradients or parameters). None was applied "
        f"or saved: the last checkpoint (step {checkpointer.latest_step()}) holds the last finite state. Lower "
        "train.learning_rate, keep train.grad_clip > 0, use float32 (model.dtype), or set "
        "train.skip_nonfinite_updates=True to skip such updates and go on; rerun to resume."
      )
    if count:
      logging.warning("Skipped %d non-finite update(s) up to step %d (train.skip_nonfinite_updates).", count, step)
    skipped += count

  try:
    with _Interrupts() as interrupts:
      interval_start, interval_steps = time.perf_counter(), 0
      while step < train.steps:
        checkpointer.check_for_errors()  # a failed asynchronous save stops the run at the next step
        state, metrics = train_step(state, steps.to_global(next(train_iterator), mesh))
        nonfinite.append(metrics["nonfinite"])
        step += 1
        interval_steps += 1
        progress.update(1)
        if step % train.log_every == 0 or step == train.steps:
          check_updates(step)
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - interval_start
          row = {
            **task.summarize(metrics),
            **{k: metrics[k] for k in ("grad_norm", "update_norm", "param_norm", "learning_rate")},
            "skipped_updates": skipped,
            "tokens_per_sec": interval_steps * tokens_per_step / elapsed,
          }
          # A skipped update's loss may be NaN: the step's own check above is what guards training.
          writer.write(step, "train", row, require_finite_loss=False)
          progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
          logging.info("step %d train: loss %.4f, %.0f tokens/s", step, row["loss"], row["tokens_per_sec"])
          interval_start, interval_steps, skipped = time.perf_counter(), 0, 0
        evaluated_now = (train.eval_every and step % train.eval_every == 0) or step == train.steps
        stop_early = False
        if evaluated_now:
          eval_metrics = evaluate_and_log(step, state.params)
          best_value, evals_without_improvement = best_so_far(
            [eval_metrics[best_key]], better, best_value, evals_without_improvement
          )
          stop_early = 0 < train.early_stopping_patience <= evals_without_improvement
        interrupted = interrupts.stop_at(step)
        if step % train.checkpoint_every == 0 or step == train.steps or interrupted or stop_early:
          check_updates(step)  # a state with a non-finite update left out is saved only when skipping is asked for
          # Only checkpoints evaluated at their own step compete for "best".
          checkpointer.save(
            step, state, train_iterator, metrics={train.best_metric: eval_metrics[best_key]} if evaluated_now else None
          )
        if interrupted:
          checkpointer.wait()
          logging.warning(
            "%s: saved the checkpoint at step %d; rerun the same command to resume.",
            interrupts.received or "A signal to another process",
            step,
          )
          return eval_metrics
        if stop_early:
          logging.info(
            "Early stopping at step %d: %s has not improved on %.4f for %d evaluations.",
            step,
            train.best_metric,
            best_value,
            evals_without_improvement,
          )
          break
      if not eval_metrics:  # resumed a finished run that has no evaluation at its last step
        eval_metrics = evaluate_and_log(step, state.params)
    checkpointer.wait()
    if pruning.enabled(train.prune):  # the sparsity reached, per layer -> WORKDIR/eval/sparsity.json
      reached = pruning.sparsity(state.params, train.prune.targets)
      logging.info("Pruned: %.1f%% of the targeted weights are zero", 100 * reached["total"])
      if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "sparsity.json"), "w") as f:
          json.dump(reached, f, indent=2)

    if data.test_split:
      best_step = checkpointer.best_step() or step
      best_params, _ = checkpoint.restore_params(
        os.path.join(workdir, "checkpoints", str(best_step), "state"), abstract_state.params
      )
      test_batches = experiment.eval_batches(data.test_split, -1)
      test_metrics = task.summarize(steps.evaluate(eval_step, best_params, test_batches, mesh))
      logging.info("test (%s, checkpoint %d): %s", data.test_split, best_step, test_metrics)
      report = {
        "split": data.test_split,
        "checkpoint_step": best_step,
        "best_metric": train.best_metric,
        "metrics": test_metrics,
        "baselines": task.baselines(test_batches),
        "trainable": train.trainable,
        "trainable_params": trainable_count,
        "total_params": total_count,
      }
      # Every process runs the (sharded) decode of a generation report.
      report.update(
        task.test_report(
          source=experiment.source(data.test_split),
          tokenizer=tokenizer,
          generate=lambda prompts, max_new_tokens: generate.generate(
            model, best_params, tokenizer, prompts, mesh=mesh, strategy="greedy", max_new_tokens=max_new_tokens
          ),
          max_examples=config.eval.generate_examples,
          max_new_tokens=config.eval.max_new_tokens,
        )
      )
      if jax.process_index() == 0:
        os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
        with open(os.path.join(workdir, "eval", "report.json"), "w") as f:
          json.dump(report, f, indent=2)
  finally:
    failing = sys.exc_info()[1] is not None
    for close in (progress.close, checkpointer.close, writer.close):  # checkpointer.close waits for pending saves
      try:
        close()
      except Exception as error:  # noqa: BLE001
        if not failing:
          raise
        # The error in flight is the one to report (a full disk also fails the writer's last flush).
        logging.warning("Also failed while stopping: %s: %s", type(error).__name__, error)

  # Every process runs the (sharded) decode.
  if task.generates_text and config.sample.prompt and config.sample.max_new_tokens:
    sample = generate.generate(
      model, state.params, tokenizer, [config.sample.prompt], mesh=mesh, max_new_tokens=config.sample.max_new_tokens
    )[0]
    if jax.process_index() == 0:
      print(f"--- greedy sample (step {step}) ---\n{config.sample.prompt}{sample.text}\n---", flush=True)
  return eval_metrics
