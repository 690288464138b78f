"""The causal LM's loss sums (logsumexp - target logit, first-maximum argmax) against NumPy, and their gradient
against the log_softmax / take_along_axis formulation; the CPU allocator setting of jaxlm.runtime."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np

from jaxlm.evaluation import calibration
from jaxlm.tasks import causal_lm


def _logits_with_ties(rng, batch=3, length=7, vocab=11):
  """Random logits where some rows hold their maximum twice, and the target is then the second of the two."""
  logits = rng.normal(size=(batch, length, vocab)).astype(np.float32)
  targets = rng.integers(0, vocab, (batch, length)).astype(np.int32)
  for b, t in [(0, 1), (1, 4), (2, 0)]:
    first, second = 2, 7
    logits[b, t, first] = logits[b, t, second] = logits[b, t].max() + 1.0
    targets[b, t] = second  # jnp.argmax picks the first index of a tie: counted wrong
  targets[0, 2] = int(np.argmax(logits[0, 2]))  # and some rows right
  targets[1, 5] = int(np.argmax(logits[1, 5]))
  return logits, targets


def test_target_sums_equal_numpy_with_ties():
  rng = np.random.default_rng(0)
  logits, targets = _logits_with_ties(rng)
  weights = (rng.random(targets.shape) > 0.2).astype(np.float32)
  _, sums = causal_lm._target_sums(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(weights), train=False)

  x = logits.astype(np.float64)
  log_probs = x - x.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  nll = -np.take_along_axis(log_probs, targets[..., None], -1)[..., 0]
  correct = np.argmax(logits, -1) == targets
  np.testing.assert_allclose(float(sums["loss_sum"]), (nll * weights).sum(), rtol=1e-6)
  assert float(sums["weight"]) == weights.sum()
  assert float(sums["correct"]) == (correct * weights).sum()
  expected_bins = calibration.calibration_bin_sums(
    jnp.asarray(np.exp(log_probs.max(-1)), jnp.float32), jnp.asarray(correct), jnp.asarray(weights), causal_lm.ECE_BINS
  )
  for key, value in expected_bins.items():
    np.testing.assert_allclose(np.asarray(sums[key]), np.asarray(value), rtol=1e-5, atol=1e-6)


def test_target_sums_gradient_equals_log_softmax_take_along_axis():
  rng = np.random.default_rng(1)
  logits, targets = _logits_with_ties(rng, vocab=64)
  weights = jnp.asarray((rng.random(targets.shape) > 0.2).astype(np.float32))

  def reference(logits):
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.take_along_axis(log_probs, jnp.asarray(targets)[..., None], axis=-1)[..., 0] * weights)

  def loss(logits):
    return causal_lm._target_sums(logits, jnp.asarray(targets), weights, train=True)[0]

  np.testing.assert_allclose(jax.grad(loss)(logits), jax.grad(reference)(logits), rtol=1e-5, atol=1e-7)


def _run(code: str, **env) -> str:
  environment = {key: value for key, value in os.environ.items() if key not in ("GLIBC_TUNABLES",)}
  environment.update(env)
  result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, check=True)
  return result.stdout.strip()


def test_keep_freed_host_memory_applies_on_cpu_and_respects_user_malloc_settings():
  code = "from jaxlm import runtime; print(runtime.keep_freed_host_memory())"
  assert _run(code, JAX_PLATFORMS="cpu") == "True"
  assert _run(code, JAX_PLATFORMS="cpu", GLIBC_TUNABLES="glibc.malloc.hugetlb=1") == "False"
