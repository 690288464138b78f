"""Fine-tuning: SFT prompt masking, classification losses/metrics/pooling, trainable masks, init_from, e2e runs."""

import dataclasses
import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from sklearn.metrics import f1_score

from conftest import experiment_config, make_trainer, run_cli, tiny_model_config, train_config
from jaxlm import Experiment, configs, sharding
from jaxlm.data import pipeline
from jaxlm.errors import CheckpointError
from jaxlm.models import Decoder, ModelConfig, heads
from jaxlm.models import params as params_lib
from jaxlm.tasks import classification, seq2seq
from jaxlm.training import checkpoint

TINY = tiny_model_config()


def _log_softmax(x):
  x = np.asarray(x, np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_sft_example_puts_the_mask_on_target_and_eos(tokenizer):
  row = pipeline.sft_example(
    tokenizer, "def f(x):\n    return x" * 20, "Return x.", seq_len=48, truncation="right", separator='\n"""'
  )
  tokens, mask = row["tokens"], row["loss_mask"]
  assert tokens[0] == tokenizer.bos_id and row["segment_ids"].sum() == 48  # the prompt was cut to fit
  assert tokenizer.decode(tokens[mask == 1]) == "Return x." and tokens[mask == 1][-1] == tokenizer.eos_id
  assert tokenizer.decode(tokens[: int(mask.argmax())]).startswith("def f(x):")  # right truncation keeps the start
  assert tokenizer.decode(tokens[: int(mask.argmax())]).endswith('\n"""')  # the separator is never cut
  left = pipeline.sft_example(tokenizer, "first " + "x" * 200, "t", 32, "left", "")
  assert "first" not in tokenizer.decode(left["tokens"])


def test_sft_loss_ignores_prompt_tokens():
  """Loss on a hand-built batch against NumPy: only predictions of target tokens count."""
  model = Decoder(TINY)
  rng = np.random.default_rng(0)
  tokens = rng.integers(4, 64, size=(2, 16)).astype(np.int32)
  loss_mask = np.zeros((2, 16), np.int32)
  loss_mask[0, 9:13] = 1  # prompt 0..8, target 9..12, padding after
  loss_mask[1, 5:16] = 1
  segment_ids = np.ones((2, 16), np.int32)
  segment_ids[0, 13:] = 0
  batch = {
    "tokens": tokens,
    "segment_ids": segment_ids,
    "positions": np.tile(np.arange(16, dtype=np.int32), (2, 1)),
    "loss_mask": loss_mask,
  }
  params = params_lib.init_params(model, jax.random.key(0))
  task = seq2seq.Seq2Seq(seq_len=16)
  loss_sum, sums = task.loss_and_metrics(model, params, batch, train=False)
  log_probs = _log_softmax(model.apply({"params": params}, tokens, batch["positions"], segment_ids))
  expected = -sum(log_probs[b, t - 1, tokens[b, t]] for b in range(2) for t in range(1, 16) if loss_mask[b, t])
  assert float(sums["weight"]) == loss_mask.sum() == 15
  assert float(loss_sum) == pytest.approx(expected, rel=1e-5)
  # Changing a prompt token's *prediction target* (the tokens themselves stay) cannot change the loss:
  # the loss reads logits only where the next token is a target.
  prompt_only = np.asarray(task.weights(batch))[0]
  assert prompt_only[:8].sum() == 0 and prompt_only[8:12].sum() == 4 and prompt_only[12:].sum() == 0


def test_classification_losses_against_numpy():
  rng = np.random.default_rng(0)
  logits, labels = rng.normal(0, 2, (6, 5)).astype(np.float32), rng.integers(0, 5, 6)
  log_p = _log_softmax(logits)
  p_label = np.exp(log_p[np.arange(6), labels])
  ce = -log_p[np.arange(6), labels]
  smooth = -(0.9 * log_p[np.arange(6), labels] + 0.1 / 5 * log_p.sum(-1))
  np.testing.assert_allclose(classification.example_losses(logits, labels), ce, rtol=1e-5)
  np.testing.assert_allclose(classification.example_losses(logits, labels, label_smoothing=0.1), smooth, rtol=1e-5)
  np.testing.assert_allclose(
    classification.example_losses(logits, labels, focal_gamma=2.0), (1 - p_label) ** 2 * ce, rtol=1e-5
  )
  gamma = np.where(p_label < 0.2, 5.0, 3.0)
  np.testing.assert_allclose(
    classification.example_losses(logits, labels, focal_adaptive=True), (1 - p_label) ** gamma * ce, rtol=1e-5
  )


def test_macro_f1_and_accuracy_match_sklearn():
  rng = np.random.default_rng(1)
  labels, predictions = rng.integers(0, 6, 200), rng.integers(0, 5, 200)
  labels[labels == 3] = 4  # a class that never occurs as a label...
  predictions[predictions == 3] = 0  # ...nor as a prediction: left out of the mean, as in scikit-learn
  confusion = np.zeros((7, 7))
  np.add.at(confusion, (labels, predictions), 1)
  assert float(classification.macro_f1(confusion)) == pytest.approx(f1_score(labels, predictions, average="macro"))


def test_pooling_against_numpy():
  rng = np.random.default_rng(2)
  hidden = rng.normal(size=(3, 6, 4)).astype(np.float32)
  mask = np.array([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 0, 0]])
  np.testing.assert_allclose(heads.pool(hidden, mask, "last"), hidden[[0, 1, 2], [2, 5, 3]])
  np.testing.assert_allclose(heads.pool(hidden, mask, "first"), hidden[[0, 1, 2], [0, 0, 2]])
  mean = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
  np.testing.assert_allclose(heads.pool(hidden, mask, "mean"), mean, rtol=1e-6)


def _changed_after_training(trainable: str, frozen: str = "") -> set[str]:
  task = classification.Classification(num_classes=3, seq_len=16)
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2, trainable=trainable, frozen=frozen)
  state, train_step, mesh = make_trainer(task.build_model(TINY), task=task, train=train)
  before = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  batch = {
    "tokens": rng.integers(4, 64, (8, 16)).astype(np.int32),
    "segment_ids": np.ones((8, 16), np.int32),
    "positions": np.tile(np.arange(16, dtype=np.int32), (8, 1)),
    "label": rng.integers(0, 3, 8).astype(np.int32),
  }
  with sharding.mesh_context(mesh):
    state, _ = train_step(state, batch)
  flat_before = jax.tree_util.tree_flatten_with_path(before)[0]
  return {
    params_lib.path_name(p)
    for (p, a), b in zip(flat_before, jax.tree.leaves(jax.device_get(state.params)))
    if not np.array_equal(a, b)
  }


def test_head_only_changes_only_the_head():
  assert _changed_after_training("head") == {"head/kernel", "head/bias"}


def test_frozen_pattern_keeps_those_parameters():
  changed = _changed_after_training("all", frozen="token_embed|attention/")
  assert "head/kernel" in changed and "backbone/layers/mlp/up/kernel" in changed
  assert not {name for name in changed if "token_embed" in name or "attention/" in name}


def _classifier_params(model_config):
  model = classification.Classification(num_classes=19, seq_len=64).build_model(model_config)
  return params_lib.init_params(model, jax.random.key(3))


def test_init_from_restores_the_backbone_exactly(tiny_workdir):
  state_dir = checkpoint.find_checkpoint(tiny_workdir).state_dir
  assert state_dir.endswith(os.path.join("checkpoints", "4", "state"))
  target = _classifier_params(ModelConfig.from_config(configs.model_config_dict("tiny")))
  restored, new = checkpoint.restore_params(state_dir, target, r"^head/")
  assert new == ["head/bias", "head/kernel"]
  source = ocp.PyTreeCheckpointer().restore(state_dir)["params"]
  jax.tree.map(np.testing.assert_array_equal, restored["backbone"], source)
  np.testing.assert_array_equal(restored["head"]["kernel"], target["head"]["kernel"])


def test_init_from_mismatch_lists_the_offending_parameters(tiny_workdir):
  state_dir = checkpoint.find_checkpoint(tiny_workdir).state_dir
  other = ModelConfig.from_config(configs.model_config_dict("tiny", mlp_dim=96, position="learned"))
  with pytest.raises(CheckpointError) as error:
    checkpoint.restore_params(state_dir, _classifier_params(other), r"^head/")
  message = str(error.value)
  for line in (
    "backbone/layers/mlp/up/kernel: shape (2, 64, 128) in the checkpoint, (2, 64, 96) in the model",
    "backbone/layers/mlp/down/kernel: shape",
    "backbone/position_embed/embedding (128, 64): in the model, not in the checkpoint",
  ):
    assert line in message
  assert "head/kernel" not in message  # new by declaration, not a mismatch


@pytest.mark.e2e
def test_finetune_cli_from_a_tiny_workdir_writes_the_report(tiny_workdir, data_dir, tmp_path):
  """The real CLI: LoRA fine-tuning of the tiny classifier; eval every 3 steps, best checkpoint, test report."""
  run_cli(
    "--config=experiments/finetune_packages.py:tiny,lora",
    f"--workdir={tmp_path}",
    f"--config.data.data_dir={data_dir}",
    f"--config.init_from={tiny_workdir}",
  )
  report = json.load(open(tmp_path / "eval" / "report.json"))
  eval_rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl") if '"eval"' in line]
  assert [row["step"] for row in eval_rows] == [3, 6]
  best = max(eval_rows, key=lambda row: (row["accuracy"], row["step"]))  # ties: the later step
  assert report["split"] == "test" and report["checkpoint_step"] == best["step"]
  assert {"accuracy", "macro_f1", "loss", "nll"} <= set(report["metrics"])
  assert 0 < report["baselines"]["majority_accuracy"] < 1
  assert 0 < report["trainable_params"] < report["total_params"] / 2  # adapters and head only


@pytest.mark.e2e
def test_sft_from_a_pretrained_run_reports_generation_and_generates_from_its_workdir(tiny_workdir, data_dir, tmp_path):
  """quickstart -> SFT with init_from -> --mode=generate on the SFT workdir (once broken: generation looked for
  a tokenizer trained on the SFT data, which does not exist; the run uses init_from's)."""
  config = experiment_config("sft_docstrings", "tiny")
  config.data.data_dir = data_dir
  config.init_from = tiny_workdir
  Experiment.from_config(config, str(tmp_path)).train()
  report = json.load(open(tmp_path / "eval" / "report.json"))
  generation = report["generation"]
  assert len(generation["examples"]) == 2 and 0 <= generation["rouge_l"] <= 1
  assert {"loss", "perplexity", "token_accuracy"} <= set(report["metrics"])
  # The SFT workdir holds the pretrained run's tokenizer, byte for byte.
  assert (tmp_path / "tokenizer.model").read_bytes() == open(os.path.join(tiny_workdir, "tokenizer.model"), "rb").read()
  cli = run_cli(f"--workdir={tmp_path}", "--mode=generate", "--prompt=def add(a, b):\n    return a + b\n")
  assert cli.stdout.endswith("\n") and "Traceback" not in cli.stderr


def test_distillation_loss_against_numpy():
  """(1 - w) task loss + w tau^2 KL(teacher_tau || student_tau), on the rows the task scores."""
  from jaxlm.tasks import distillation

  task = classification.Classification(num_classes=3, seq_len=16)
  student, teacher = task.build_model(TINY), task.build_model(dataclasses.replace(TINY, mlp_dim=32))
  rng = np.random.default_rng(0)
  batch = {
    "tokens": rng.integers(4, 64, (4, 16)).astype(np.int32),
    "segment_ids": np.ones((4, 16), np.int32),
    "positions": np.tile(np.arange(16, dtype=np.int32), (4, 1)),
    "label": np.array([0, 1, 2, 0], np.int32),
  }
  batch["segment_ids"][3] = 0  # a padding row: not scored
  init = lambda model, seed: params_lib.init_params(model, jax.random.key(seed))
  student_params, teacher_params = init(student, 0), init(teacher, 1)
  distill = distillation.Distillation(task, teacher, teacher_params, weight=0.3, temperature=2.0)
  loss, sums = distill.loss_and_metrics(student, student_params, batch, train=False)
  logits = [
    np.asarray(task.logits(m, p, batch, train=False), np.float64)
    for m, p in ((student, student_params), (teacher, teacher_params))
  ]
  task_loss = -sum(_log_softmax(logits[0])[i, batch["label"][i]] for i in range(3))
  log_s, log_t = _log_softmax(logits[0] / 2.0), _log_softmax(logits[1] / 2.0)
  kl = (np.exp(log_t) * (log_t - log_s)).sum(-1)[:3].sum() * 4.0
  assert float(loss) == pytest.approx(0.7 * task_loss + 0.3 * kl, rel=1e-5)
  reported = distill.summarize(jax.device_get(sums))
  assert reported["task_loss"] == pytest.approx(task_loss / 3, rel=1e-5)
  assert reported["distill_kl"] == pytest.approx(kl / 3, rel=1e-4)  # float32 differences of log-probabilities
  assert set(reported) >= {"accuracy", "macro_f1", "ece", "loss"}
