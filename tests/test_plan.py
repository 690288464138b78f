"""`--mode=plan`: exact parameter / optimizer bytes per device, and an activation estimate near XLA's."""

import jax
import numpy as np
import pytest

from conftest import experiment_config, run_cli
from jaxlm import Experiment, sharding
from jaxlm.training import optim, steps
from jaxlm.training import state as state_lib


@pytest.mark.parametrize("remat", ["none", "full"])
def test_plan_matches_the_compiled_train_step(remat):
  config = experiment_config("quickstart", None)
  config.model.remat = remat
  config.mesh.update(dict(data=2, fsdp=2, tensor=2, num_devices=-1))
  experiment = Experiment.from_config(config)
  memory = experiment.plan()
  assert memory.mesh == {"data": 2, "fsdp": 2, "tensor": 2}

  mesh = experiment.mesh
  optimizer, schedule, _ = optim.optimizer_for(config.train, experiment.task.new_params)
  abstract, shardings = state_lib.state_shardings(experiment.model, optimizer, mesh)
  train_step = steps.jit_train_step(
    model=experiment.model,
    task=experiment.task,
    optimizer=optimizer,
    schedule=schedule,
    dropout_rng=jax.random.key(0),
    grad_accum_steps=1,
    state_sharding=shardings,
    mesh=mesh,
  )
  batch_shape = (config.train.batch_size, config.data.seq_len)
  batch = {
    key: jax.ShapeDtypeStruct(batch_shape, np.int32, sharding=sharding.batch_sharding(mesh))
    for key in ("tokens", "segment_ids", "positions")
  }
  with sharding.mesh_context(mesh):
    compiled = train_step.lower(abstract, batch).compile().memory_analysis()

  # Parameters and optimizer state: exactly the compiled step's arguments, less this device's batch rows.
  batch_bytes = 3 * 4 * np.prod(batch_shape) // 4  # rows split over data x fsdp = 4
  state_bytes = compiled.argument_size_in_bytes - batch_bytes
  assert abs(memory.param_bytes + memory.optimizer_bytes - state_bytes) <= 64  # step counters
  # Activations (+ gradients): an estimate, within a factor of two of XLA's temporaries.
  ratio = (memory.activation_bytes + memory.gradient_bytes) / compiled.temp_size_in_bytes
  assert 0.5 < ratio < 2.0, ratio


def test_plan_cli_prints_every_parameter_and_the_verdict(tmp_path):
  out = run_cli(
    "--config=experiments/pretrain.py:llama_1b",
    f"--workdir={tmp_path}",
    "--mode=plan",
    "--plan_devices=64",
    "--config.mesh.data=1",
    "--config.mesh.fsdp=-1",
    devices=1,
    timeout=120,
  )
  assert "layers/mlp/gate/kernel" in out.stdout and "('layers', 'embed', 'mlp')" in out.stdout
  assert "(None, 'fsdp', 'tensor')" in out.stdout
  assert "total per device" in out.stdout and "device memory" in out.stdout


@pytest.mark.parametrize(
  "mesh",
  [dict(data=2, fsdp=2, tensor=2), dict(data=2, fsdp=1, tensor=4), dict(data=1, fsdp=8, tensor=1)],
  ids=["2x2x2", "tensor4", "fsdp8"],
)
def test_plan_bytes_of_every_parameter_are_its_real_shard(mesh):
  """Each parameter's planned bytes per device equal the shard the real sharding gives it (tensor and FSDP
  splits included), and frozen parameters hold no Adam moments."""
  config = experiment_config("finetune_packages", "tiny,lora")
  config.classification.num_classes = 19
  config.mesh.update(dict(mesh, num_devices=-1))
  experiment = Experiment.from_config(config)
  memory = experiment.plan()
  abstract = {row.path: row for row in memory.params}
  real = jax.tree_util.tree_leaves_with_path(experiment.abstract_params())
  assert len(real) == len(abstract)
  for path, leaf in real:
    row = abstract[jax.tree_util.keystr(path, simple=True, separator="/")]
    shard = leaf.sharding.shard_shape(leaf.shape)
    assert row.bytes_per_device == np.prod(shard) * leaf.dtype.itemsize, row.path
  if mesh["tensor"] == 4:
    assert abstract["backbone/layers/attention/query/kernel"].mesh_axes[2] == "tensor"
  # LoRA: only adapters and the head train, so Adam keeps two moments of those alone.
  trained = sum(row.bytes_per_device for row in memory.params if "lora_" in row.path or row.path.startswith("head/"))
  assert memory.optimizer_bytes <= 2 * trained + 64
