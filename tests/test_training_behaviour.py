"""The training loop's own behaviour, each against an independent computation: the step's gradient and logged
norms, remat, whole-split evaluation with padding, init_from forms, and distillation end to end."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import experiment_config, lm_batch, make_trainer, tiny_model_config, train_config
from jaxlm import Experiment, sharding
from jaxlm.errors import ConfigError
from jaxlm.models import Decoder
from jaxlm.models import params as params_lib
from jaxlm.tasks.causal_lm import CausalLm
from jaxlm.training import checkpoint, optim


def test_the_step_is_adamw_on_the_gradient_of_the_mean_loss_and_logs_its_norms():
  """One step against optax applied to `jax.grad` of the mean next-token loss (Adam's scale invariance would hide
  a wrong divisor from loss-only comparisons, so the logged gradient norm is checked too, with clipping active)."""
  model = Decoder(tiny_model_config())
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2, grad_clip=0.5)
  state, train_step, mesh = make_trainer(model, train=train)
  params = jax.device_get(state.params)
  batch = lm_batch(4)

  def mean_loss(p):
    loss_sum, sums = CausalLm().loss_and_metrics(model, p, batch, train=True, rng=jax.random.key(0))
    return loss_sum / sums["weight"]

  grads = jax.grad(mean_loss)(params)
  assert float(optax.global_norm(grads)) > 0.5  # so the clip is part of what is checked
  optimizer, schedule = optim.create_optimizer(train)
  updates, _ = optimizer.update(grads, optimizer.init(params), params)
  expected = optax.apply_updates(params, updates)
  with sharding.mesh_context(mesh):
    new_state, metrics = train_step(state, batch)
  metrics = jax.device_get(metrics)
  assert float(metrics["grad_norm"]) == pytest.approx(float(optax.global_norm(grads)), rel=1e-5)
  assert float(metrics["learning_rate"]) == pytest.approx(1e-2) == float(schedule(0))
  assert float(metrics["update_norm"]) == pytest.approx(float(optax.global_norm(updates)), rel=1e-4)
  # Adam's first step is lr * g / (|g| + eps): where g is near zero, float noise of the reduction order moves a
  # parameter by up to ~lr; 0.5% of lr bounds it.
  jax.tree.map(
    lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-5, atol=5e-5),
    jax.device_get(new_state.params),
    expected,
  )


def mean_next_token_loss(model, batch, params):
  loss_sum, sums = CausalLm().loss_and_metrics(model, params, batch, train=True, rng=jax.random.key(0))
  return loss_sum / sums["weight"]


def test_remat_gives_the_same_gradient_and_step():
  """Rematerialisation recomputes the forward in the backward pass: the gradient must not change. Compared on the
  gradient itself (float32 noise of a differently fused recomputation, ~1e-7 of its scale), not on the parameters
  after Adam's first step, lr * g / (|g| + eps), which turns that noise into up to lr where a gradient is near 0."""
  batch = lm_batch(5)
  results = []
  for remat in ("none", "full", "save_dots"):
    model = Decoder(tiny_model_config(remat=remat))
    state, train_step, mesh = make_trainer(model)
    grads = jax.device_get(jax.jit(jax.grad(functools.partial(mean_next_token_loss, model, batch)))(state.params))
    with sharding.mesh_context(mesh):
      _, metrics = train_step(state, batch)
    results.append((float(metrics["grad_norm"]), grads))
  reference_norm, reference = results[0]
  assert reference_norm == pytest.approx(float(optax.global_norm(reference)), rel=1e-5)
  for grad_norm, grads in results[1:]:
    assert grad_norm == pytest.approx(reference_norm, rel=1e-5)
    # A wrong rematerialisation (a stale or missing recomputed activation) changes gradients by their own scale.
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * reference_norm), grads, reference)


@pytest.fixture(scope="module")
def classifier_experiment(data_dir, tokenizer, tiny_workdir):
  """The tiny packages classifier on the pretrained tiny run (nothing trained: evaluation only)."""
  config = experiment_config("finetune_packages", "tiny")
  config.data.data_dir = data_dir
  config.init_from = tiny_workdir
  return config


def test_whole_split_evaluation_counts_every_example_once_whatever_the_batching(classifier_experiment):
  """eval.num_batches=-1 over a split whose size no batch divides, with one and with two data streams: the
  padding rows and padding batches count for nothing, so every batching gives the same metrics."""
  results = []
  for batch_size, streams in ((8, 1), (16, 2), (24, 8)):
    config = classifier_experiment.copy_and_resolve_references()
    config.eval.batch_size, config.data.num_streams = batch_size, streams
    experiment = Experiment.from_config(config)
    params = experiment.init_params()
    size = len(experiment.source("validation"))
    assert size % batch_size  # a last partial batch
    predictions = experiment.predict(params, "validation", num_batches=-1)
    assert len(predictions.labels) == size and (predictions.weights == 1).all()
    results.append((experiment.evaluate(params, "validation", num_batches=-1), predictions))
  (first, first_predictions), *others = results
  accuracy = (first_predictions.logits.argmax(-1) == first_predictions.labels).mean()
  assert first["accuracy"] == pytest.approx(accuracy)
  for metrics, predictions in others:
    assert metrics["accuracy"] == first["accuracy"]
    assert metrics["loss"] == pytest.approx(first["loss"], rel=1e-5)
    assert sorted(predictions.labels.tolist()) == sorted(first_predictions.labels.tolist())


def test_init_from_a_checkpoint_directory_and_past_an_unfinished_save(tiny_workdir, tmp_path, classifier_experiment):
  """init_from=WORKDIR/checkpoints/<step> restores that step; an interrupted save (Orbax's temporary directory) is
  never taken for the latest checkpoint."""
  run = tmp_path / "run"
  shutil.copytree(tiny_workdir, run)
  os.makedirs(run / "checkpoints" / "6.orbax-checkpoint-tmp-1234" / "state")
  assert checkpoint.find_checkpoint(str(run)).step == 4
  config = classifier_experiment.copy_and_resolve_references()
  config.init_from = str(run / "checkpoints" / "2")
  restored = Experiment.from_config(config).init_params()
  at_2 = Experiment.from_workdir(str(run)).load_params(2)
  at_4 = Experiment.from_workdir(str(run)).load_params(4)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["backbone"]), jax.device_get(at_2))
  # The new head (the only parameters initialised) holds what a full init from the seed gives it.
  experiment = Experiment.from_config(config)
  full_init = params_lib.init_params(experiment.model, jax.random.split(jax.random.key(config.seed))[0])
  assert set(restored) == {"backbone", "head"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(restored["head"]), jax.device_get(full_init["head"]))
  differs = jax.tree.leaves(jax.tree.map(lambda a, b: bool((np.asarray(a) != np.asarray(b)).any()), at_2, at_4))
  assert any(differs)
  with pytest.raises(checkpoint.CheckpointError, match=r"No finished checkpoint 3 .* steps \[2, 4\]"):
    Experiment.from_workdir(str(run)).load_params(3)


@pytest.mark.e2e
def test_distillation_restores_the_teacher_from_its_workdir_and_trains(classifier_experiment, tmp_path):
  teacher_config = classifier_experiment.copy_and_resolve_references()
  teacher_config.train.update(dict(steps=2, eval_every=2, checkpoint_every=2))
  teacher_config.data.test_split = ""
  Experiment.from_config(teacher_config, str(tmp_path / "teacher")).train()

  student_config = classifier_experiment.copy_and_resolve_references()
  student_config.train.update(dict(steps=2, eval_every=2, checkpoint_every=2))
  student_config.data.test_split = ""
  student_config.distill.teacher = str(tmp_path / "teacher")
  student = Experiment.from_config(student_config, str(tmp_path / "student"))
  task = student.training_task()
  teacher_params = Experiment.from_workdir(str(tmp_path / "teacher")).load_params()
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(task.teacher_params), jax.device_get(teacher_params))
  assert task.new_params == student.task.new_params and task.generates_text is False
  metrics = student.train()
  assert metrics["distill_kl"] > 0 and np.isfinite(metrics["task_loss"])
  assert metrics["loss"] == pytest.approx(0.5 * metrics["task_loss"] + 0.5 * metrics["distill_kl"], rel=1e-5)


def test_class_weights_weigh_the_loss_and_out_of_range_labels_are_refused(classifier_experiment):
  """Each example's loss times its label's weight, normalised by the summed weights (NumPy reference)."""
  from jaxlm.tasks.classification import Classification

  task = Classification(num_classes=3, seq_len=16, class_weights=(1.0, 3.0, 0.5))
  logits = jnp.asarray(np.random.default_rng(0).normal(size=(5, 3)), jnp.float32)
  batch = {"label": jnp.asarray([0, 1, 2, 1, 0]), "segment_ids": jnp.ones((5, 16), jnp.int32).at[4].set(0)}
  loss_sum, sums = task.loss_sums(logits, batch, train=True)
  log_probs = np.asarray(jax.nn.log_softmax(logits), np.float64)
  weights = np.asarray([1.0, 3.0, 0.5, 3.0, 0.0])  # the padding row weighs nothing
  expected = -sum(w * log_probs[i, label] for i, (w, label) in enumerate(zip(weights, [0, 1, 2, 1, 0])))
  assert float(loss_sum) == pytest.approx(expected, rel=1e-5) and float(sums["weight"]) == weights.sum()
  config = classifier_experiment.copy_and_resolve_references()
  config.classification.class_weights = (1.0, 2.0)
  with pytest.raises(Exception, match="classification.class_weights: has 2 weights for 19 classes"):
    Experiment.from_config(config)


def test_early_stopping_and_the_best_checkpoint_survive_a_resume(data_dir, tokenizer, tmp_path):
  """Ranking by the *highest* loss makes every evaluation after the first a non-improvement, so patience 2 stops
  at step 3. A run stopped at step 2 and resumed must stop at step 3 too (its count is not reset), and the best
  checkpoint is still step 1."""
  from jaxlm.training import writer

  def run(workdir, steps):
    config = experiment_config("quickstart", "tiny")
    config.data.data_dir = data_dir
    config.train.update(
      dict(
        steps=steps,
        eval_every=1,
        checkpoint_every=1,
        keep_checkpoints=1,
        best_mode="max",
        early_stopping_patience=2,
        learning_rate=1e-2,
      )
    )
    config.sample.max_new_tokens = 0
    experiment = Experiment.from_config(config, str(workdir))
    experiment.train()
    return [row["step"] for row in writer.read_rows(str(workdir), "eval")], experiment

  straight, _ = run(tmp_path / "straight", 8)
  assert straight == [1, 2, 3]
  first, _ = run(tmp_path / "resumed", 2)
  resumed, experiment = run(tmp_path / "resumed", 8)
  assert (first, resumed) == ([1, 2], [1, 2, 3])
  best = checkpoint.find_checkpoint(experiment.workdir, "best", "loss", "max")
  assert best.step == 1


def test_a_best_metric_the_task_does_not_report_is_refused_before_the_first_step(data_dir, tokenizer, tmp_path):
  config = experiment_config("quickstart", "tiny")
  config.data.data_dir = data_dir
  config.train.best_metric = "accuracy"  # a classifier's metric; the language model reports token_accuracy
  with pytest.raises(ConfigError, match=r"train.best_metric: 'accuracy' is not an eval metric .*'token_accuracy'"):
    Experiment.from_config(config, str(tmp_path)).train()
  assert not os.path.exists(tmp_path / "metrics.jsonl") and not os.path.exists(tmp_path / "checkpoints" / "1")


def test_a_finished_run_reruns_as_a_restore_unless_its_final_checkpoint_is_damaged(tiny_workdir, tmp_path, caplog):
  """Rerunning a finished run returns its last evaluation and changes nothing; with its final checkpoint damaged,
  the rerun moves it aside, resumes from the one before and trains the last steps again."""
  import glob
  import logging

  from jaxlm.training import writer

  workdir = str(tmp_path / "run")
  shutil.copytree(tiny_workdir, workdir)
  metrics_file = os.path.join(workdir, "metrics.jsonl")
  history = open(metrics_file).read()
  last_eval = writer.read_rows(workdir, "eval")[-1]
  experiment = Experiment.from_workdir(workdir)
  with caplog.at_level(logging.INFO):
    metrics = experiment.train()
  assert metrics == {k: v for k, v in last_eval.items() if k not in ("step", "split")}
  assert "finished at step 4: nothing to train" in caplog.text and "Compiled" not in caplog.text
  assert open(metrics_file).read() == history

  data_files = glob.glob(os.path.join(workdir, "checkpoints", "4", "state", "ocdbt.process_0", "d", "*"))
  os.remove(max(data_files, key=os.path.getsize))
  caplog.clear()
  with caplog.at_level(logging.INFO):
    retrained = experiment.train()
  assert "Resuming from the checkpoint at step 2" in caplog.text
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "4.corrupt"))
  assert [row["step"] for row in writer.read_rows(workdir, "eval")] == [2, 4]
  assert retrained["loss"] == pytest.approx(metrics["loss"], rel=1e-5)  # the same steps again
