"""The encoder-decoder family (T5-style) and span corruption: attention pattern, T5's relative buckets
against transformers, span statistics, cached decoding against an uncached reference, sharded training,
the t5_base shape, and the CLI from pretraining to generation and seq2seq fine-tuning."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import experiment_config, make_trainer, run_cli
from jaxlm import sharding
from jaxlm.inference import decode
from jaxlm.inference.generate import decode as run_decode
from jaxlm.models import layers
from jaxlm.models import params as params_lib
from jaxlm.models.config import PRESETS, ModelConfig
from jaxlm.models.transformer import EncoderDecoder, backbone
from jaxlm.tasks import span_corruption

T5_LIKE = dict(
  family="encoder_decoder",
  vocab_size=128,
  embed_dim=64,
  num_layers=2,
  num_decoder_layers=3,
  num_heads=8,
  mlp_dim=128,
  max_len=32,
  position="relative",
  relative_buckets=8,
  relative_max_distance=16,
  mlp="relu",
  scale_attention=False,
  tied_logits_scale=True,
)


def _apply(model, params, tokens, encoder_tokens, encoder_segment_ids):
  return np.asarray(
    model.apply({"params": params}, tokens, encoder_tokens=encoder_tokens, encoder_segment_ids=encoder_segment_ids)
  )


@pytest.mark.parametrize(
  "overrides", [{}, dict(position="rotary", tie_embeddings=False, scale_attention=True)], ids=["t5", "rotary_untied"]
)
def test_decoder_is_causal_and_cross_attention_ignores_encoder_padding(overrides):
  model = EncoderDecoder(ModelConfig(**{**T5_LIKE, **overrides}))
  params = params_lib.init_params(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(4, 128, size=(2, 8)), jnp.int32)
  source = jnp.asarray(rng.integers(4, 128, size=(2, 10)), jnp.int32)
  source_segments = jnp.asarray([[1] * 10, [1] * 6 + [0] * 4], jnp.int32)
  base = _apply(model, params, tokens, source, source_segments)

  later = _apply(model, params, tokens.at[:, 5].set(3), source, source_segments)
  np.testing.assert_allclose(later[:, :5], base[:, :5], rtol=1e-5, atol=1e-5)  # the past ignores the future
  assert np.abs(later[:, 5:] - base[:, 5:]).max() > 1e-4
  padded = _apply(model, params, tokens, source.at[1, 6:].set(9), source_segments)
  np.testing.assert_allclose(padded, base, rtol=1e-5, atol=1e-5)  # encoder padding is never read
  real = _apply(model, params, tokens, source.at[1, 2].set(9), source_segments)
  assert np.abs(real[1] - base[1]).max() > 1e-4  # a real source token is


def test_relative_buckets_match_transformers_t5():
  torch = pytest.importorskip("torch")
  t5 = pytest.importorskip("transformers.models.t5.modeling_t5")
  relative = np.arange(-300, 300)[None, :]
  for bidirectional in (True, False):
    want = t5.T5Attention._relative_position_bucket(
      torch.tensor(relative), bidirectional=bidirectional, num_buckets=32, max_distance=128
    ).numpy()
    got = layers.relative_buckets(jnp.asarray(relative), bidirectional, 32, 128)
    np.testing.assert_array_equal(np.asarray(got), want)


def test_span_corruption_statistics_on_a_large_sample():
  rng = np.random.default_rng(0)
  length = span_corruption.chunk_length(256, 0.15, 3.0)
  inputs_length, targets_length, num_spans = span_corruption.corrupted_lengths(length, 0.15, 3.0)
  assert inputs_length <= 256 < span_corruption.corrupted_lengths(length + 1, 0.15, 3.0)[0]
  sentinels = np.arange(1000, 1100, dtype=np.int32)
  noise_total, span_lengths = 0, []
  for _ in range(300):
    tokens = rng.integers(4, 900, size=length).astype(np.int32)
    noise = span_corruption.random_spans_noise_mask(length, 0.15, 3.0, rng)
    inputs, targets = span_corruption.corrupt(tokens, noise, sentinels)
    assert (len(inputs) + 1, len(targets) + 1) == (inputs_length, targets_length)
    np.testing.assert_array_equal(inputs[np.isin(inputs, sentinels)], sentinels[:num_spans])  # in order
    np.testing.assert_array_equal(targets[np.isin(targets, sentinels)], sentinels[:num_spans])
    # Recover the chunk: each sentinel of the inputs is replaced by the tokens after it in the targets.
    pieces = np.split(targets, np.flatnonzero(np.isin(targets, sentinels)))[1:]
    restored = np.concatenate(
      [pieces[np.flatnonzero(sentinels == t)[0]][1:] if t in sentinels else [t] for t in inputs]
    )
    np.testing.assert_array_equal(restored, tokens)
    noise_total += noise.sum()
    starts = np.flatnonzero(noise & ~np.concatenate([[False], noise[:-1]]))
    ends = np.flatnonzero(noise & ~np.concatenate([noise[1:], [False]]))
    span_lengths += list(ends - starts + 1)
  assert noise_total / (300 * length) == pytest.approx(0.15, abs=0.005)
  assert np.mean(span_lengths) == pytest.approx(3.0, abs=0.2)


def _uncached_greedy(model, params, prompt, start, steps, start_id):
  """Reference: every step runs encoder and decoder on the whole target so far (no cache) and takes the argmax;
  one jitted call on a fixed-size buffer (the decoder is causal: the zeros after the current step do not matter)."""
  segments = (np.arange(prompt.shape[1])[None] >= start[:, None]).astype(np.int32)
  positions = np.maximum(np.arange(prompt.shape[1])[None] - start[:, None], 0)
  apply = jax.jit(
    lambda tokens: model.apply(
      {"params": params},
      tokens,
      encoder_tokens=jnp.asarray(prompt),
      encoder_positions=jnp.asarray(positions),
      encoder_segment_ids=jnp.asarray(segments),
    )
  )
  out = np.zeros((prompt.shape[0], steps + 1), np.int32)
  out[:, 0] = start_id
  for step in range(steps):
    out[:, step + 1] = np.argmax(np.asarray(apply(jnp.asarray(out))[:, step]), axis=-1)
  return out[:, 1:]


@pytest.mark.parametrize("overrides", [{}, dict(position="learned", tie_embeddings=False)], ids=["relative", "learned"])
def test_cached_greedy_equals_uncached_reference(overrides):
  model = EncoderDecoder(ModelConfig(**{**T5_LIKE, **overrides, "init_std": 0.3}))
  params = params_lib.init_params(model, jax.random.key(1))
  rng = np.random.default_rng(0)
  prompt = rng.integers(4, 128, size=(3, 8)).astype(np.int32)
  start = np.array([0, 3, 5], np.int32)
  prompt[np.arange(8)[None] < start[:, None]] = 0
  settings = decode.DecodeSettings(max_new_tokens=10)
  step_model = decode.step_model(model, 2)
  output = run_decode(step_model, params, jnp.asarray(prompt), jnp.asarray(start), jax.random.key(0), settings)
  want = _uncached_greedy(model, params, prompt, start, 10, 2)
  np.testing.assert_array_equal(np.asarray(output.tokens), want)
  assert len(set(map(tuple, want))) > 1  # the rows differ: the encoder output matters
  beam = run_decode(
    step_model,
    params,
    jnp.asarray(prompt),
    jnp.asarray(start),
    jax.random.key(0),
    decode.DecodeSettings(max_new_tokens=10, strategy="beam", beam_size=3),
  )
  assert np.all(np.asarray(beam.scores) >= np.asarray(output.scores) - 1e-4)  # beam finds at least greedy's score


def _batches(steps=3, rows=8):
  rng = np.random.default_rng(0)
  for _ in range(steps):
    segments = np.repeat([[1] * 7 + [2] * 5 + [0] * 4], rows, axis=0).astype(np.int32)
    positions = np.concatenate([np.arange(7), np.arange(5), [0] * 4])[None].repeat(rows, 0).astype(np.int32)
    yield {
      "tokens": rng.integers(4, 128, size=(rows, 16)).astype(np.int32),
      "segment_ids": segments,
      "positions": positions,
      "encoder_tokens": rng.integers(4, 128, size=(rows, 16)).astype(np.int32),
      "encoder_segment_ids": segments[:, ::-1].copy(),
      "encoder_positions": positions[:, ::-1].copy(),
    }


def _train(mesh, devices):
  state, train_step, mesh = make_trainer(
    EncoderDecoder(ModelConfig(**T5_LIKE)), task=span_corruption.SpanCorruption(), mesh=mesh, devices=devices
  )
  losses = []
  with sharding.mesh_context(mesh):
    for batch in _batches():
      batch = {key: jax.device_put(value, sharding.batch_sharding(mesh)) for key, value in batch.items()}
      state, metrics = train_step(state, batch)
      losses.append(float(metrics["loss_sum"] / metrics["weight"]))
  return np.array(losses)


def test_encoder_decoder_trains_on_a_2x2x2_mesh_like_one_device():
  reference = _train(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  np.testing.assert_allclose(_train(dict(data=2, fsdp=2, tensor=2), jax.devices()), reference, rtol=2e-5)


def test_t5_base_has_the_published_parameter_count():
  abstract = params_lib.abstract_params(backbone(ModelConfig(**PRESETS["t5_base"])))
  assert params_lib.count(abstract) == 222_903_552  # t5-base, embeddings tied


@pytest.mark.e2e
def test_span_corruption_pretraining_generation_and_seq2seq_fine_tuning(data_dir, tmp_path):
  """The CLI pretrains (span corruption) and generates with beam search from the workdir; `sft_docstrings:tiny,t5`
  fine-tunes that checkpoint (`init_from`) through `Experiment`, next to the same run from scratch."""
  from jaxlm import Experiment

  pretrained = str(tmp_path / "t5")
  # 100 of the config's 400 steps keep the suite short (the whole :tiny run ends below 0.7 of its first loss). More
  # pretraining is not better for the SFT comparison below: after 150 steps the model starts 10 SFT steps further
  # from docstrings (SFT validation loss 7.8 against 7.1 after 100) and ends them behind the run from scratch.
  run_cli(
    "--config=experiments/pretrain_t5.py:tiny",
    f"--workdir={pretrained}",
    f"--config.data.data_dir={data_dir}",
    "--config.train.steps=100",
  )
  rows = [json.loads(line) for line in open(os.path.join(pretrained, "metrics.jsonl"))]
  evals = [row for row in rows if row["split"] == "eval"]
  assert all({"loss", "token_accuracy"} <= set(row) for row in evals)
  assert evals[-1]["loss"] < 0.85 * evals[0]["loss"]
  process = run_cli(
    "--mode=generate",
    f"--config=experiments/workdir.py:{pretrained}",
    f"--workdir={pretrained}",
    "--prompt=def f(x):",
    "--config.decode.strategy=beam",
    "--config.decode.max_new_tokens=8",
  )
  assert process.stdout.count("\n") == 1  # one generation printed per prompt

  def fine_tune(workdir: str, init_from: str) -> tuple[Experiment, dict]:
    config = experiment_config("sft_docstrings", "tiny,t5")
    config.data.data_dir = data_dir
    config.init_from = init_from
    # The same tokenizer (with the pretraining's sentinel pieces) for both runs: their losses compare.
    config.data.tokenizer = Experiment.from_workdir(pretrained).tokenizer_path()
    config.train.update(dict(steps=10, eval_every=10, checkpoint_every=10))
    experiment = Experiment.from_config(config, str(tmp_path / workdir))
    return experiment, experiment.train()

  fine, fine_metrics = fine_tune("from_t5", pretrained)
  # Every tensor of the pretrained encoder-decoder is where seq2seq training starts.
  start = params_lib.flatten(Experiment.from_config(fine.config).init_params())
  restored = params_lib.flatten(Experiment.from_workdir(pretrained).load_params())
  assert sorted(start) == sorted(restored)
  for name, value in restored.items():
    np.testing.assert_array_equal(jax.device_get(start[name]), jax.device_get(value), err_msg=name)
  _, scratch_metrics = fine_tune("scratch", "")
  assert fine_metrics["loss"] < scratch_metrics["loss"], (fine_metrics["loss"], scratch_metrics["loss"])

  # The test report of the encoder-decoder: the loss and greedy generations next to their references.
  with open(os.path.join(fine.workdir, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["metrics"]["loss"] > 0 and len(report["generation"]["examples"]) == 2
