"""scripts/benchmark.py on every model family: the FLOP count of each family against the matrix multiplies of
the jitted loss counted one by one, and the benchmark (with its PyTorch peer) on a tiny encoder and
encoder-decoder."""

import math

import jax
import numpy as np
import pytest
from jax._src.interpreters import partial_eval

from conftest import experiment_config
from test_benchmark import benchmark  # scripts/benchmark.py, loaded once (its absl flags are process-wide)

# (experiment, variant, overrides of its model section): each family, tied and untied, source != target length.
FAMILY_CONFIGS = {
  "decoder": ("quickstart", "tiny", {}),
  "decoder_untied": ("quickstart", "tiny", {"tie_embeddings": False}),
  "encoder": ("pretrain_mlm", "tiny", {}),
  "encoder_decoder": ("pretrain_t5", "tiny", {"num_decoder_layers": 3}),
}


def family_config(name: str, **model):
  experiment, variant, overrides = FAMILY_CONFIGS[name]
  config = experiment_config(experiment, variant)
  with config.unlocked():
    config.model.update({**overrides, **model})
  return config


def matmul_flops(jaxpr) -> int:
  """2 x multiply-adds of every dot_general in `jaxpr`, scan bodies times their length, other sub-jaxprs once."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contracting, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[axis] for axis in contracting)
      continue
    assert eqn.primitive.name not in ("cond", "while"), f"{eqn.primitive.name}: no fixed count"
    times = eqn.params["length"] if eqn.primitive.name == "scan" else 1
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        if isinstance(sub, jax.extend.core.ClosedJaxpr):
          total += times * matmul_flops(sub.jaxpr)
        elif isinstance(sub, jax.extend.core.Jaxpr):
          total += times * matmul_flops(sub)
  return total


def gradient_matmul_flops(experiment) -> int:
  """The FLOPs of the matrix multiplies of the loss's gradient (forward and backward) on a random batch of 2 rows,
  read from its jaxpr with dead code removed."""
  from jaxlm.models import params as params_lib

  task, model = experiment.task, experiment.model
  params = params_lib.abstract_params(model, experiment.mesh)
  batch = task.random_batch(2, experiment.model_config.vocab_size, np.random.default_rng(0))

  def loss(params):
    return task.loss_and_metrics(model, params, batch, train=True, rng=jax.random.key(0))[0]

  closed = jax.make_jaxpr(jax.grad(loss))(params)
  jaxpr, _ = partial_eval.dce_jaxpr(closed.jaxpr, [True] * len(closed.jaxpr.outvars))
  return matmul_flops(jaxpr)


@pytest.mark.parametrize("name", sorted(FAMILY_CONFIGS))
def test_flop_count_equals_the_matmuls_of_the_gradient(name):
  """The dense count (every query against every key: what XLA's dense attention computes) equals the FLOPs of the
  matrix multiplies of the loss's gradient."""
  from jaxlm.experiment import Experiment
  from jaxlm.models import params as params_lib

  experiment = Experiment.from_config(family_config(name, attention="xla"))
  assert gradient_matmul_flops(experiment) == benchmark.step_flops(
    experiment.model_config,
    params_lib.abstract_params(experiment.model, experiment.mesh),
    {key: value.shape for key, value in experiment.task.random_batch(2, 8, np.random.default_rng(0)).items()},
    causal_fraction=1,
  )


def test_causal_query_blocks_compute_five_eighths_of_the_scores():
  """`model.attention = "blocks"` (4 query blocks, block i over the first (i + 1) / 4 of the keys) multiplies
  (1 + 2 + 3 + 4) / 16 = 5/8 of the dense causal scores: the count with f = 5/8 equals its matrix multiplies."""
  from jaxlm.experiment import Experiment
  from jaxlm.models import layers
  from jaxlm.models import params as params_lib

  experiment = Experiment.from_config(family_config("decoder", attention="blocks"))
  length = experiment.config.data.seq_len
  assert layers.causal_query_blocks(experiment.model_config, length) == 4
  params = params_lib.abstract_params(experiment.model, experiment.mesh)
  shapes = {"tokens": (2, length), "segment_ids": (2, length), "positions": (2, length)}
  assert gradient_matmul_flops(experiment) == benchmark.step_flops(
    experiment.model_config, params, shapes, causal_fraction=5 / 8
  )


def test_causal_attention_counts_half_the_scores():
  """f = 1/2 removes half the causal self-attention scores of the dense count and nothing else."""
  from jaxlm.experiment import Experiment
  from jaxlm.models import params as params_lib

  for name, causal_layers in (("decoder", 2), ("encoder", 0), ("encoder_decoder", 3)):
    experiment = Experiment.from_config(family_config(name))
    m = experiment.model_config
    params = params_lib.abstract_params(experiment.model, experiment.mesh)
    shapes = experiment.task.batch_shapes(2)
    saved = benchmark.step_flops(m, params, shapes, 1) - benchmark.step_flops(m, params, shapes)
    rows, length = shapes["tokens"]
    assert saved == 6 * causal_layers * rows * length * length * m.num_heads * m.head_dim, name


@pytest.mark.e2e
@pytest.mark.parametrize(
  "name, model",
  [
    # BERT's layout (learned positions, post-norm, token types): what BertForMaskedLM builds
    ("encoder", dict(position="learned", norm_position="post", type_vocab_size=2)),
    ("encoder_decoder", {}),  # pretrain_t5's model is T5's: T5ForConditionalGeneration
  ],
)
def test_benchmark_and_peer_on_the_family(name, model):
  pytest.importorskip("transformers")
  config = family_config(name, **model)
  config.train.batch_size = 8
  result = benchmark.benchmark_jaxlm(config, steps=1, warmup=1, repeats=1, measured=1e12)
  peer = benchmark.benchmark_torch(config, steps=1, warmup=1, repeats=1, compile_model=False)
  shapes = benchmark.random_batch(benchmark_task(config), config.train.batch_size, config.model.vocab_size)
  tokens = benchmark.step_tokens({key: value.shape for key, value in shapes.items()})
  assert result["tokens_per_sec"] == pytest.approx(tokens / result["step_time_s"])
  assert result["devices"] == 1  # experiment_config's one device: the peak is 1e12 FLOP/s of that device
  assert result["mfu"] == pytest.approx(result["train_flops_per_step"] / result["step_time_s"] / 1e12)
  assert peer["peer_tokens_per_sec"] > 0
  assert ("BertForMaskedLM" if name == "encoder" else "T5ForConditionalGeneration") in peer["peer"]


def benchmark_task(config):
  from jaxlm.experiment import Experiment

  return Experiment.from_config(config).task
