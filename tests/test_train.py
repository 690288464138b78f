"""Training pieces: optimizer mask and schedule, gradient accumulation, NaN guard, one sharded run."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, experiment_config, lm_batch, make_trainer, tiny_model_config, train_config
from jaxlm import Experiment, sharding
from jaxlm.models import Decoder
from jaxlm.models import params as params_lib
from jaxlm.tasks.causal_lm import CausalLm
from jaxlm.training import optim
from jaxlm.training.writer import MetricWriter, NonFiniteLossError


def test_schedule_warms_up_then_decays_to_the_end_fraction():
  schedule = optim.learning_rate_schedule(
    train_config(steps=110, warmup_steps=10, learning_rate=1.0, end_learning_rate_fraction=0.1)
  )
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(60)) == pytest.approx(0.1 + 0.9 * 0.5, rel=1e-4)  # cosine midpoint
  assert float(schedule(110)) == pytest.approx(0.1, rel=1e-4)
  linear = optim.learning_rate_schedule(
    train_config(steps=110, warmup_steps=10, learning_rate=1.0, schedule="linear", end_learning_rate_fraction=0.0)
  )
  assert float(linear(60)) == pytest.approx(0.5)


def test_weight_decay_skips_norms_and_biases():
  params = {
    "layers": {"mlp": {"up": {"kernel": 1, "bias": 2}}, "mlp_norm": {"scale": 3}},
    "token_embed": {"embedding": 4},
  }
  mask = optim.weight_decay_mask(params)
  assert mask == {
    "layers": {"mlp": {"up": {"kernel": True, "bias": False}}, "mlp_norm": {"scale": False}},
    "token_embed": {"embedding": True},
  }


def _setup(grad_accum_steps=1, seed=0):
  model = Decoder(tiny_model_config(use_bias=True, norm="layernorm"))
  train = train_config(steps=10, warmup_steps=0, learning_rate=1e-2, grad_accum_steps=grad_accum_steps)
  return make_trainer(model, train=train, seed=seed)


def test_gradient_accumulation_gives_the_same_update():
  whole_state, whole_step, mesh = _setup()
  accum_state, accum_step, _ = _setup(grad_accum_steps=4)
  with sharding.mesh_context(mesh):
    for seed in range(3):
      whole_state, whole_metrics = whole_step(whole_state, lm_batch(seed))
      accum_state, accum_metrics = accum_step(accum_state, lm_batch(seed))
      np.testing.assert_allclose(whole_metrics["loss_sum"], accum_metrics["loss_sum"], rtol=1e-5)
      assert float(whole_metrics["weight"]) == float(accum_metrics["weight"])
  # Adam divides by sqrt(v): float32 summation-order noise in near-zero gradients shows at ~1e-6.
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=2e-5), whole_state.params, accum_state.params
  )


def test_loss_is_mean_cross_entropy_over_targets():
  """The task's loss against a NumPy computation from the logits."""
  model = Decoder(tiny_model_config(num_layers=1))
  batch = lm_batch(1)
  params = params_lib.init_params(model, jax.random.key(0))
  loss_sum, sums = CausalLm().loss_and_metrics(model, params, batch, train=False)
  logits = np.asarray(
    model.apply({"params": params}, batch["tokens"], batch["positions"], batch["segment_ids"]), np.float64
  )
  log_probs = (
    logits
    - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
    - logits.max(-1, keepdims=True)
  )
  total, count = 0.0, 0
  for b in range(8):
    for t in range(15):
      seg = batch["segment_ids"][b]
      if seg[t] != 0 and seg[t + 1] == seg[t]:
        total -= log_probs[b, t, batch["tokens"][b, t + 1]]
        count += 1
  assert float(sums["weight"]) == count
  assert float(loss_sum) == pytest.approx(total, rel=1e-5)


def test_nan_loss_stops_with_a_clear_error(tmp_path):
  writer = MetricWriter(str(tmp_path))
  writer.write(1, "train", {"loss": 2.0})
  with pytest.raises(NonFiniteLossError, match="train loss is nan at step 2"):
    writer.write(2, "train", {"loss": float("nan")})
  writer.close()
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows == [{"step": 1, "split": "train", "loss": 2.0}]


def test_tiny_run_on_a_2x2x2_mesh(data_dir, tokenizer, tmp_path, capsys):
  """End to end in-process on a data x FSDP x tensor mesh: data, eval, metrics, checkpoints, sample."""
  config = experiment_config("quickstart", "tiny")
  config.data.data_dir = data_dir
  config.mesh.update(dict(data=2, fsdp=2, tensor=2, num_devices=-1))
  config.train.update(dict(steps=12, eval_every=4, checkpoint_every=4, keep_checkpoints=1, learning_rate=1e-2))
  final = Experiment.from_config(config, str(tmp_path)).train()

  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  train_rows = [r for r in rows if r["split"] == "train"]
  eval_rows = [r for r in rows if r["split"] == "eval"]
  assert [r["step"] for r in train_rows] == list(range(1, 13))
  assert [r["step"] for r in eval_rows] == [4, 8, 12]
  assert all({"loss", "perplexity", "token_accuracy", "ece", "unigram_entropy"} <= set(r) for r in eval_rows)
  assert all(0 <= r["ece"] <= 1 for r in eval_rows) and not any("ece" in r for r in train_rows)
  assert eval_rows[-1]["loss"] < eval_rows[0]["loss"]
  assert final["loss"] == eval_rows[-1]["loss"]
  assert eval_rows[-1]["perplexity"] == pytest.approx(np.exp(eval_rows[-1]["loss"]))
  assert json.load(open(tmp_path / "config.json"))["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "num_devices": -1}
  assert os.listdir(tmp_path / "tensorboard")
  # Kept: the latest checkpoint and the one with the lowest eval loss.
  best = min(eval_rows, key=lambda r: r["loss"])["step"]
  kept = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
  assert kept == sorted({12, best})
  assert "--- greedy sample (step 12) ---" in capsys.readouterr().out


def test_metric_writer_leaves_torch_unimported(tmp_path):
  """tensorboardX would import torch (1.3 s and a second OpenMP runtime) in every training process; it must not."""
  code = (
    "import sys; from jaxlm.training import writer; w = writer.MetricWriter(sys.argv[1]); "
    "w.write(1, 'train', {'loss': 1.5}); assert 'torch' not in sys.modules; import torch"
  )
  subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, check=True)
  assert os.listdir(tmp_path / "tensorboard")


def test_failed_orbax_writes_log_no_unretrieved_task_tracebacks(caplog):
  """A full disk fails every write of a save; asyncio would log each failed Orbax task that nobody awaited (with its
  traceback) around the one CheckpointError. Those are dropped; any other task's unretrieved error is kept."""
  import asyncio
  import gc

  from jaxlm.training import checkpoint

  checkpoint._quiet_failed_save_noise()
  namespace = {}
  for name in ("orbax", "elsewhere"):  # a function "defined in" Orbax's package, and one that is not
    exec(compile(f"def {name}():\n  raise OSError('No space left on device')", f"/x/{name}/f.py", "exec"), namespace)

  def fail_unawaited(function):
    async def write():
      function()

    async def main():
      task = asyncio.ensure_future(write())
      await asyncio.sleep(0)
      del task

    asyncio.run(main())
    gc.collect()

  with caplog.at_level("ERROR", logger="asyncio"):
    fail_unawaited(namespace["orbax"])
    assert not caplog.records
    fail_unawaited(namespace["elsewhere"])
    assert [record.getMessage().splitlines()[0] for record in caplog.records] == ["Task exception was never retrieved"]
