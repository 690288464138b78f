"""Generation: token arrays (`decode`) and texts (`generate`).

`decode` compiles prefill + one strategy into one program; `generate` takes
texts in and gives texts out: it tokenizes and left-pads the prompts, decodes
(sharded over `mesh` when given, with the training mesh and rules) and returns
texts, token ids, per-token log-probabilities and scores. A trained run's
model, params and tokenizer come from `jaxlm.Experiment` (`Experiment.generate`).

Shape legend: B batch (prompts), P padded prompt length.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import multihost_utils

from jaxlm import sharding
from jaxlm.data import pipeline
from jaxlm.data.tokenizer import Tokenizer
from jaxlm.inference import beam_search
from jaxlm.inference.decode import DecodeOutput, DecodeSettings, StepModel, sample_loop, step_model

PROMPT_ALIGN = 8  # padded prompt lengths are multiples of this, so that similar prompts share a compilation


@functools.partial(jax.jit, static_argnames=("step_model", "settings", "pad_id"))
def decode(
  step_model: StepModel,
  params,
  prompts: jax.Array,
  start: jax.Array,
  rng: jax.Array,
  settings: DecodeSettings,
  eos_id: jax.Array | int = -1,
  pad_id: int = 0,
) -> DecodeOutput:
  """Prefill, then decode with `settings.strategy`, as one compiled program.

  prompts: [B, P] int32, row b left-padded (its tokens in slots start[b]:P); start: [B] int32;
  eos_id ends a row (-1: none, every row runs to max_new_tokens).
  """
  length = prompts.shape[1] + settings.max_new_tokens
  logits, cache = step_model.prefill(params, prompts, start, length)
  if settings.strategy == "beam":
    return beam_search.beam_search(step_model, params, logits, cache, settings, eos_id, pad_id)
  return sample_loop(step_model, params, logits, cache, rng, settings, eos_id, pad_id)


def left_pad(
  prompts: list[list[int]], pad_id: int, rows: int | None = None, align: int = PROMPT_ALIGN
) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> (prompts [B, P] left-padded with pad_id, start [B]); extra rows up to `rows` hold prompt 0."""
  rows = rows or len(prompts)
  prompts = prompts + [prompts[0]] * (rows - len(prompts))
  length = -(-max(len(ids) for ids in prompts) // align) * align
  array = np.full((rows, length), pad_id, np.int32)
  for row, ids in enumerate(prompts):
    array[row, length - len(ids) :] = ids
  return array, np.asarray([length - len(ids) for ids in prompts], np.int32)


@dataclasses.dataclass
class Generation:
  """One prompt's result."""

  text: str  # the generated continuation (special tokens dropped)
  tokens: list[int]  # generated token ids, EOS included if produced
  log_probs: list[float]  # model log-probability of each token
  score: float  # sum of log_probs (beam search: over length ** length_penalty)


def generate(
  model: nn.Module,
  params,
  tokenizer: Tokenizer,
  prompts: list[str],
  settings: DecodeSettings = DecodeSettings(),  # noqa: B008 (frozen dataclass: the defaults)
  *,
  rng: jax.Array | None = None,
  mesh=None,
  **overrides,
) -> list[Generation]:
  """Continues each prompt, framed as the model was trained (`pipeline.frame_prompt`: after bos; an encoder-decoder
  reads it in its encoder, with eos after it if `model.config.encoder_eos`, and its decoder starts with
  `model.config.decoder_start_id`), e.g. `generate(model, params, tokenizer, ["def "], top_k=40,
  strategy="sample", rng=jax.random.key(0))`; `overrides` replace fields of `settings`.

  With a `mesh`, `params` must be laid out on it (as in training) and the batch and cache are sharded by
  the training rules; without one everything runs where `params` live.
  """
  settings = dataclasses.replace(settings, **overrides)
  if settings.strategy == "sample" and rng is None:
    raise ValueError("strategy='sample' needs an explicit PRNG key: pass rng=jax.random.key(seed).")
  if not prompts:
    raise ValueError("generate needs at least one prompt.")
  model_config = model.config
  prompt_ids = [
    pipeline.frame_prompt(tokenizer, tokenizer.encode(prompt), model_config.encoder_eos) for prompt in prompts
  ]
  longest = max(len(ids) for ids in prompt_ids) + settings.max_new_tokens
  if longest > model_config.max_len:
    raise ValueError(
      f"the longest prompt + max_new_tokens = {longest} tokens exceeds model.max_len="
      f"{model_config.max_len}; shorten the prompt or lower decode.max_new_tokens."
    )
  rows = len(prompts)
  if mesh is not None:  # every data-parallel shard gets the same number of rows
    shards = sharding.data_parallel_size(mesh)
    rows = -(-rows // shards) * shards
  tokens, start = left_pad(prompt_ids, tokenizer.pad_id, rows)
  start_id = -1  # a decoder continues its prompt; an encoder-decoder's decoder starts with its start token
  if model_config.family == "encoder_decoder":
    start_id = pipeline.decoder_start_id(tokenizer, model_config.decoder_start_id)
  rng = jax.random.key(0) if rng is None else rng
  run = functools.partial(
    decode,
    step_model(model, start_id),
    params,
    settings=settings,
    eos_id=tokenizer.eos_id,
    pad_id=tokenizer.pad_id,
  )
  if mesh is None:
    output = jax.device_get(run(tokens, start, rng))
  else:
    batch_sharding = sharding.batch_sharding(mesh)
    rows_sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*batch_sharding.spec[:1]))
    tokens = jax.make_array_from_callback(tokens.shape, batch_sharding, lambda index: tokens[index])
    start = jax.make_array_from_callback(start.shape, rows_sharding, lambda index: start[index])
    with sharding.mesh_context(mesh):
      output = multihost_utils.process_allgather(run(tokens, start, rng), tiled=True)
  results = []
  for row in range(len(prompts)):
    length = int(output.lengths[row])
    ids = output.tokens[row, :length].tolist()
    results.append(
      Generation(
        text=tokenizer.decode(ids),
        tokens=ids,
        log_probs=output.log_probs[row, :length].tolist(),
        score=float(output.scores[row]),
      )
    )
  return results
