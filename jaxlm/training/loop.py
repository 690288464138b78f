"""The one train / eval loop.

`train_and_evaluate(config, workdir)`:
  1. validates the config and writes WORKDIR/config.json;
  2. builds the mesh, the data (training a tokenizer if none is named), the model;
  3. restores, in this order: the latest checkpoint in WORKDIR/checkpoints
     (state and data position), else initialises from `config.seed`;
  4. compiles the train and eval steps once, before the loop, and logs their memory;
  5. trains, logging every `train.log_every` steps, evaluating every
     `train.eval_every` and checkpointing every `train.checkpoint_every`;
     on SIGTERM it saves a checkpoint and returns;
  6. evaluates, saves a final checkpoint and prints a greedy sample.
"""

import itertools
import os
import signal
import sys
import time

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils
from absl import logging

from jaxlm import configs, sharding
from jaxlm.data import pipeline, sources
from jaxlm.inference import generate
from jaxlm.models.config import ConfigError
from jaxlm.models.transformer import Decoder
from jaxlm.tasks import causal_lm
from jaxlm.training import checkpoint, optim, steps
from jaxlm.training import state as state_lib
from jaxlm.training.writer import MetricWriter

TASKS = {"causal_lm": causal_lm}
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


def _data(config):
  """(tokenizer, train batches, eval batches as a list of host batches), this process's rows of each."""
  data = config.data
  data_dir = data.data_dir or None
  train_source = sources.get_source(data.name, data.train_split, data_dir)
  eval_source = sources.get_source(data.name, data.eval_split, data_dir)
  tokenizer = pipeline.tokenizer_for(data, train_source)
  if tokenizer.vocab_size > config.model.vocab_size:
    raise ConfigError(f"model.vocab_size: {config.model.vocab_size} rows cannot embed the tokenizer's "
                      f"{tokenizer.vocab_size} pieces ({tokenizer.path}); raise model.vocab_size.")
  num_streams = data.num_streams or jax.process_count()
  streams = pipeline.process_streams(num_streams, jax.process_index(), jax.process_count())

  def stream(source, index, batch_size, **options):
    return pipeline.lm_batches(source, tokenizer, text_field=data.text_field, seq_len=data.seq_len,
                               dataset_name=data.name, batch_size=batch_size // num_streams, stream_index=index,
                               stream_count=num_streams, **options)

  train_batches = pipeline.zip_streams([
      stream(train_source, index, config.train.batch_size, shuffle_seed=config.seed, repeat=True,
             shuffle_window=data.shuffle_window) for index in streams])
  # Evaluation reads the split's documents once in a fixed shuffled order, so that the first
  # eval.num_batches batches are a representative sample, and the same one at every evaluation.
  limit = None if config.eval.num_batches == -1 else config.eval.num_batches
  eval_streams = [list(itertools.islice(stream(eval_source, index, config.eval.batch_size,
                                               shuffle_seed=EVAL_ORDER_SEED, repeat=False), limit))
                  for index in streams]
  # Every process must run the same number of eval steps: shorter streams are padded with empty batches.
  num_eval = max(len(batches) for batches in eval_streams)
  if jax.process_count() > 1:
    num_eval = int(np.max(multihost_utils.process_allgather(np.int32(num_eval))))
  if not num_eval:
    raise ValueError(f"The {data.eval_split!r} split of {data.name!r} gave no eval batch.")
  empty = pipeline.padding_batch(config.eval.batch_size // num_streams, data.seq_len)
  eval_list = [pipeline.concat_rows(rows) for rows in
               zip(*[batches + [empty] * (num_eval - len(batches)) for batches in eval_streams])]
  return tokenizer, train_batches, eval_list


def _to_global(batch: dict, batch_sharding) -> dict:
  """This process's rows -> global arrays laid out over the mesh."""
  return {key: jax.make_array_from_process_local_data(batch_sharding, value) for key, value in batch.items()}


def _log_compiled(name: str, compiled) -> None:
  memory = compiled.memory_analysis()
  if memory is not None:
    logging.info("%s: arguments %.1f MiB, outputs %.1f MiB, temporaries %.1f MiB per device", name,
                 memory.argument_size_in_bytes / 2**20, memory.output_size_in_bytes / 2**20,
                 memory.temp_size_in_bytes / 2**20)


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

  task = TASKS[config.task]
  tokenizer, train_batches, eval_batches = _data(config)
  train_iterator = iter(train_batches)
  unigram_entropy = causal_lm.unigram_entropy(eval_batches)
  model = Decoder(model_config)
  optimizer, schedule = optim.create_optimizer(config.train)
  init_rng, dropout_rng = jax.random.split(jax.random.key(config.seed))

  # Restore order: the workdir's latest checkpoint, else a fresh init.
  abstract_state, state_sharding = state_lib.state_shardings(model, optimizer, config.data.seq_len, mesh)
  checkpointer = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.train.keep_checkpoints)
  latest = checkpointer.latest_step()
  if latest is not None:
    logging.info("Resuming from the checkpoint at step %d in %s", latest, workdir)
    state = checkpointer.restore(latest, abstract_state, train_iterator)
  else:
    logging.info("No checkpoint in %s: initialising from seed %d", workdir, config.seed)
    state = state_lib.create_train_state(model, optimizer, config.data.seq_len, mesh, state_sharding, init_rng)
  logging.info("Model: %s parameters", f"{state_lib.count_params(state.params):,}")

  batch_sharding = sharding.batch_sharding(mesh)
  global_batch = lambda rows: {key: jax.ShapeDtypeStruct((rows, config.data.seq_len), np.int32, sharding=batch_sharding)
                               for key in ("tokens", "segment_ids", "positions")}
  train_step, eval_step = steps.jit_steps(model=model, task=task, optimizer=optimizer, schedule=schedule,
                                          dropout_rng=dropout_rng, grad_accum_steps=config.train.grad_accum_steps,
                                          state_sharding=state_sharding, mesh=mesh)
  with sharding.mesh_context(mesh):
    start = time.perf_counter()
    train_step = train_step.lower(abstract_state, global_batch(config.train.batch_size)).compile()
    eval_step = eval_step.lower(abstract_state.params, global_batch(config.eval.batch_size)).compile()
  logging.info("Compiled the train and eval steps in %.1f s", time.perf_counter() - start)
  _log_compiled("train_step", train_step)

  def evaluate(step: int, params) -> dict:
    totals = None
    for batch in eval_batches:
      sums = eval_step(params, _to_global(batch, batch_sharding))
      totals = sums if totals is None else jax.tree.map(lambda a, b: a + b, totals, sums)
    metrics = {**task.summarize(jax.device_get(totals)), "unigram_entropy": unigram_entropy}
    writer.write(step, "eval", metrics)
    logging.info("step %d eval: %s", step, {k: round(v, 4) for k, v in metrics.items()})
    return metrics

  step = int(state.step)
  eval_metrics = {}
  tokens_per_step = config.train.batch_size * config.data.seq_len
  progress = tqdm.tqdm(total=config.train.steps, initial=step, desc="train", unit="step",
                       disable=jax.process_index() != 0 or not sys.stderr.isatty())
  try:
    with _PreemptionFlag() as preemption:
      interval_start, interval_steps = time.perf_counter(), 0
      while step < config.train.steps:
        state, metrics = train_step(state, _to_global(next(train_iterator), batch_sharding))
        step += 1
        interval_steps += 1
        progress.update(1)
        if step % config.train.log_every == 0 or step == config.train.steps:
          metrics = jax.device_get(metrics)
          elapsed = time.perf_counter() - interval_start
          row = {**task.summarize(metrics), **{k: metrics[k] for k in
                 ("grad_norm", "update_norm", "param_norm", "learning_rate")},
                 "tokens_per_sec": interval_steps * tokens_per_step / elapsed}
          writer.write(step, "train", row)
          progress.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_sec']:,.0f}")
          logging.info("step %d train: loss %.4f, %.0f tokens/s", step, row["loss"], row["tokens_per_sec"])
          interval_start, interval_steps = time.perf_counter(), 0
        is_last = step == config.train.steps
        evaluated_now = (config.train.eval_every and step % config.train.eval_every == 0) or is_last
        if evaluated_now:
          eval_metrics = evaluate(step, state.params)
        if step % config.train.checkpoint_every == 0 or is_last or preemption.requested:
          # Only checkpoints with an eval loss of their own step compete for "best".
          checkpointer.save(step, state, train_iterator,
                            metrics={"eval_loss": eval_metrics["loss"]} if evaluated_now else None)
        if preemption.requested:
          logging.warning("SIGTERM: saved the checkpoint at step %d; rerun the same command to resume.", step)
          return eval_metrics
      if not eval_metrics:  # resumed a finished run
        eval_metrics = evaluate(step, state.params)
  finally:
    progress.close()
    checkpointer.close()  # waits for pending saves
    writer.close()

  if config.sample.prompt and config.sample.max_new_tokens:  # every process runs the (sharded) decode
    sample = generate.generate(model, state.params, tokenizer, [config.sample.prompt], mesh=mesh,
                               max_new_tokens=config.sample.max_new_tokens)[0]
    if jax.process_index() == 0:
      print(f"--- greedy sample (step {step}) ---\n{config.sample.prompt}{sample.text}\n---", flush=True)
  return eval_metrics
