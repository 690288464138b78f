"""Quantization schemes (jaxlm.models.quantize) against NumPy bounds, and quantization-aware training's forward and
straight-through gradient against the quantized model."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import lm_batch, tiny_model_config
from jaxlm.errors import ConfigError
from jaxlm.models import params as params_lib
from jaxlm.models import quantize
from jaxlm.models.transformer import Decoder

SCHEMES = ("int8", "int4", "int8-asym", "int4-g8", "int4-g8-asym", "int8-g16")


@pytest.mark.parametrize("name", SCHEMES)
def test_round_trip_error_within_half_a_scale_of_each_group(name):
  kind = quantize.scheme(name)
  kernel = np.random.default_rng(0).normal(size=(32, 4, 8)).astype(np.float32) + 0.3  # [D, N, H], off-centre
  scale_shape = kind.scale_shape(kernel.shape, output_dims=2)
  q, scale, offset = quantize.quantize_array(jnp.asarray(kernel), scale_shape, kind)
  q, scale = np.asarray(q).astype(np.int64), np.asarray(scale)
  assert q.min() >= kind.min_int and q.max() <= kind.max_int
  # NumPy reference of the groups: G consecutive weights along D (the input axis), or all of D per channel.
  group = kind.group_size or 32
  groups = kernel.reshape(32 // group, group, 4, 8)
  assert scale.shape == (32 // group, 4, 8)
  if kind.symmetric:
    np.testing.assert_allclose(scale, np.abs(groups).max(axis=1) / kind.max_int, rtol=1e-6)
    assert offset is None
  else:
    np.testing.assert_allclose(scale, np.ptp(groups, axis=1) / (2**kind.bits - 1), rtol=1e-5)
  restored = np.asarray(quantize.dequantize(jnp.asarray(q), jnp.asarray(scale), offset)).reshape(groups.shape)
  error = np.abs(restored - groups)
  assert (error <= scale[:, None] / 2 * (1 + 1e-5) + 1e-7).all()
  if not kind.symmetric:  # both extremes of every group are levels
    np.testing.assert_allclose(restored.min(axis=1), groups.min(axis=1), atol=1e-5)
    np.testing.assert_allclose(restored.max(axis=1), groups.max(axis=1), atol=1e-5)


def test_scheme_names_are_checked():
  assert quantize.scheme("int4-g64-asym") == quantize.Scheme("int4-g64-asym", 4, jnp.int4, 64, False)
  for bad in ("int3", "int4-g0", "int8-asym-g4", "fp8"):
    with pytest.raises(ConfigError, match="model.quantize"):
      quantize.scheme(bad)
  with pytest.raises(ConfigError, match="do not divide"):
    quantize.scheme("int4-g5").scale_shape((32, 4, 8), 2)


@pytest.mark.parametrize("name", ("int8", "int4-g8-asym"))
def test_quantization_aware_forward_equals_the_quantized_model(name):
  config = tiny_model_config()
  float_model, qat_model = Decoder(config), Decoder(dataclasses.replace(config, fake_quantize=name))
  quantized = Decoder(dataclasses.replace(config, quantize=name))
  params = params_lib.init_params(float_model, jax.random.key(0))
  tokens = jnp.asarray(lm_batch()["tokens"])
  converted = quantize.convert_params(params, params_lib.abstract_params(quantized), name)
  qat_logits = qat_model.apply({"params": params}, tokens)
  np.testing.assert_allclose(qat_logits, quantized.apply({"params": converted}, tokens), rtol=2e-5, atol=2e-5)
  assert np.abs(qat_logits - float_model.apply({"params": params}, tokens)).max() > 1e-4  # it does quantize


def test_quantization_aware_gradient_is_straight_through():
  """d/dW of a fake-quantized matmul is the gradient at the rounded weights passed to W unchanged (identity)."""
  kind = quantize.scheme("int4-g8")
  rng = np.random.default_rng(1)
  x, w = jnp.asarray(rng.normal(size=(3, 16))), jnp.asarray(rng.normal(size=(16, 5)))
  loss = lambda w: jnp.sum(jnp.tanh(x @ quantize.fake_quantize(w, 1, kind)))
  rounded = quantize.dequantize(*quantize.quantize_array(w, kind.scale_shape(w.shape, 1), kind))
  expected = jax.grad(lambda v: jnp.sum(jnp.tanh(x @ v)))(rounded)
  np.testing.assert_allclose(jax.grad(loss)(w), expected, rtol=1e-6)
