"""Train-step speed: tokens/s, model TFLOP/s and MFU, against a PyTorch peer measured in the same run.

  python scripts/benchmark.py --config=experiments/pretrain.py:gpt2_124m --config.train.batch_size=16 --peer=torch

Prints one JSON line. jaxlm's step is the real one (`training.steps.jit_train_step`: forward, backward,
AdamW, clipping; sharded over `config.mesh`), fed random tokens of `data.seq_len` (the input pipeline is
not timed). Compile time is reported apart from step time; each timing is the median of `--repeats`
runs of `--steps` steps after `--warmup` steps.

FLOPs per token (remat recomputation not counted):
  causal (MaxText, llm.c):  6 N + 6 L T N_heads H   -> `model_tflops_per_sec`, `mfu`
  non-causal (PaLM, nanoGPT): 6 N + 12 L T N_heads H -> `mfu_palm`
with N the parameters of the matrix multiplies (attention, MLP and the V x D output projection; no
embedding lookups, norms or biases). The peak is the device's datasheet dense bf16 peak when known
(e.g. 989 TFLOP/s for an H100 SXM) and otherwise the large-matmul rate measured here in the model's
compute dtype (`measured_matmul_tflops`, always reported).

`--peer=torch`: the same architecture and batch in Hugging Face `transformers` (GPT-2 or Llama built from
the config, random weights; `torch.compile` unless --nopeer_compile or it fails), AdamW and clipping,
bf16 autocast when the model computes in bf16; `vs_peer` = jaxlm tokens/s over the peer's.

`--decode` (instead of the train step): KV-cached greedy decoding of random prompts of `--prompt_len`
tokens, `--new_tokens` each (no EOS), at each of `--decode_batch_sizes`, with the config's model (and
its dtype), by `jaxlm.inference.generate.decode` and, with `--peer=torch`, by `transformers`
`generate(use_cache=True, do_sample=False, min_new_tokens=max_new_tokens)` of the same architecture.
Measured the same way for both: `prefill_ms` (one forward of the prompts that fills the cache),
`per_token_ms` ((time for new_tokens - time for 1 new token) / (new_tokens - 1): fixed per-call costs
cancel), `tokens_per_sec` (batch x new_tokens over the whole call); medians of `--repeats` after a
warm-up call. On a CPU shared with other processes use `--torch_threads=1`: PyTorch's OpenMP threads
spinning against other work can make it 100x slower.
"""

import json
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxlm import runtime  # noqa: E402  (sets XLA flags before jax starts)

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/quickstart.py", "Experiment config (model, batch, mesh).",
                                          lock_config=True)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_PEER = flags.DEFINE_enum("peer", "none", ["none", "torch"], "Also time a PyTorch implementation of the same model.")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", True, "torch.compile the peer (falls back to eager on failure).")
_DECODE = flags.DEFINE_bool("decode", False, "Time KV-cached decoding instead of the train step.")
_DECODE_BATCH_SIZES = flags.DEFINE_list("decode_batch_sizes", ["1", "16"], "--decode: batch sizes to time.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "--decode: prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "--decode: tokens generated per row.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads; 0 = its default.")

# Datasheet dense bf16 peaks (FLOP/s) by device kind prefix.
DATASHEET_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
}


def datasheet_peak(device_kind: str) -> float | None:
  for prefix, flops in DATASHEET_PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return flops
  return None


def matmul_params(params) -> int:
  """N: parameters that take part in matrix multiplies, counting the output projection (tied or not)."""
  import jax

  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(key, "key", "") for key in path]
    if names[-1] == "kernel" or names[:2] == ["token_embed", "embedding"]:
      total += leaf.size
  return total


def flops_per_token(model_config, params, seq_len: int) -> tuple[float, float]:
  """(causal, non-causal) training FLOPs per token."""
  n = matmul_params(params)
  attention = model_config.num_layers * seq_len * model_config.num_heads * model_config.head_dim
  return 6 * n + 6 * attention, 6 * n + 12 * attention


def time_steps(run_step, steps: int, warmup: int, repeats: int, synchronize) -> float:
  """Median seconds per step of `run_step()` over `repeats` runs of `steps` steps."""
  for _ in range(warmup):
    run_step()
  synchronize()
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    for _ in range(steps):
      run_step()
    synchronize()
    timings.append((time.perf_counter() - start) / steps)
  return statistics.median(timings)


def measured_matmul_flops(dtype) -> float:
  """FLOP/s of a large square matmul on the first device (best of 5), the ceiling a model can reach."""
  import jax
  import jax.numpy as jnp

  size = 8192 if jax.default_backend() in ("gpu", "tpu") else 1024
  a = jax.random.normal(jax.random.key(0), (size, size), dtype)
  matmul = jax.jit(lambda x, y: x @ y)
  matmul(a, a).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    for _ in range(10):
      out = matmul(a, a)
    out.block_until_ready()
    best = min(best, (time.perf_counter() - start) / 10)
  return 2 * size**3 / best


def benchmark_jaxlm(config, steps: int, warmup: int, repeats: int) -> dict:
  import jax
  import numpy as np

  from jaxlm import sharding
  from jaxlm.experiment import Experiment
  from jaxlm.models import params as params_lib
  from jaxlm.training import optim, steps as steps_lib
  from jaxlm.training import state as state_lib

  experiment = Experiment.from_config(config)
  model_config, model, task, mesh = experiment.model_config, experiment.model, experiment.task, experiment.mesh
  optimizer, schedule, _ = optim.optimizer_for(config.train, task.new_params)
  batch_size, seq_len = config.train.batch_size, config.data.seq_len
  abstract, shardings = state_lib.state_shardings(model, optimizer, mesh)
  state = state_lib.create_train_state(experiment.init_params(), optimizer, shardings, mesh)
  train_step = steps_lib.jit_train_step(model=model, task=task, optimizer=optimizer, schedule=schedule,
                                        dropout_rng=jax.random.key(1), grad_accum_steps=config.train.grad_accum_steps,
                                        state_sharding=shardings, mesh=mesh)
  eval_step = steps_lib.jit_eval_step(model=model, task=task, param_sharding=shardings.params, mesh=mesh)
  rng = np.random.default_rng(0)
  host_batch = {"tokens": rng.integers(4, model_config.vocab_size, (batch_size, seq_len), dtype=np.int32),
                "segment_ids": np.ones((batch_size, seq_len), np.int32),
                "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch_size, seq_len)).copy()}
  batch = {key: jax.device_put(value, sharding.batch_sharding(mesh)) for key, value in host_batch.items()}

  with sharding.mesh_context(mesh):
    start = time.perf_counter()
    train_step = train_step.lower(abstract, batch).compile()
    compile_s = time.perf_counter() - start
    eval_step = eval_step.lower(abstract.params, batch).compile()

  def train():
    nonlocal state
    state, _ = train_step(state, batch)

  def synchronize():
    jax.block_until_ready(state)

  step_time = time_steps(train, steps, warmup, repeats, synchronize)
  forward = {}
  forward_time = time_steps(lambda: forward.update(out=eval_step(state.params, batch)), steps, warmup, repeats,
                            lambda: jax.block_until_ready(forward["out"]))

  causal, palm = flops_per_token(model_config, state.params, seq_len)
  tokens_per_sec = batch_size * seq_len / step_time
  device = jax.devices()[0]
  measured = measured_matmul_flops(model_config.compute_dtype)
  peak = datasheet_peak(device.device_kind)
  peak_per_run = (peak or measured) * mesh.size
  memory = device.memory_stats() or {}
  return {
      "backend": jax.default_backend(), "device_kind": device.device_kind, "devices": mesh.size,
      "mesh": dict(mesh.shape), "params": params_lib.count(state.params),
      "matmul_params": matmul_params(state.params), "batch_size": batch_size, "seq_len": seq_len,
      "dtype": model_config.dtype, "remat": model_config.remat, "attention": model_config.attention,
      "compile_s": round(compile_s, 3), "step_time_s": step_time, "tokens_per_sec": tokens_per_sec,
      "forward_step_time_s": forward_time, "forward_tokens_per_sec": batch_size * seq_len / forward_time,
      "model_tflops_per_sec": causal * tokens_per_sec / 1e12,
      "mfu": causal * tokens_per_sec / peak_per_run, "mfu_palm": palm * tokens_per_sec / peak_per_run,
      "peak_tflops_per_device": (peak or measured) / 1e12,
      "peak_source": "datasheet bf16 dense" if peak else "measured matmul",
      "measured_matmul_tflops": measured / 1e12,
      "peak_memory_gib": memory["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in memory else None,
  }


def hf_model(model_config):
  """The `transformers` model of the same architecture as a jaxlm ModelConfig (random weights)."""
  import transformers

  m = model_config
  if m.position == "learned" and m.norm == "layernorm" and m.mlp == "gelu":
    config = transformers.GPT2Config(
        vocab_size=m.vocab_size, n_positions=m.max_len, n_embd=m.embed_dim, n_layer=m.num_layers, n_head=m.num_heads,
        n_inner=m.mlp_dim, activation_function="gelu_new", layer_norm_epsilon=m.norm_eps, resid_pdrop=m.dropout_rate,
        embd_pdrop=m.dropout_rate, attn_pdrop=0.0, tie_word_embeddings=m.tie_embeddings)
    return transformers.GPT2LMHeadModel(config)
  if m.position == "rotary" and m.norm == "rmsnorm" and m.mlp == "swiglu":
    config = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.embed_dim, intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_heads, num_key_value_heads=m.num_kv_heads, head_dim=m.head_dim,
        max_position_embeddings=m.max_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
        tie_word_embeddings=m.tie_embeddings, attention_bias=m.use_bias, mlp_bias=m.use_bias)
    return transformers.LlamaForCausalLM(config)
  raise ValueError(f"No transformers peer for position={m.position}, norm={m.norm}, mlp={m.mlp}: the peer covers "
                   "GPT-2 (learned, layernorm, gelu) and Llama (rotary, rmsnorm, swiglu).")


def benchmark_torch(config, steps: int, warmup: int, repeats: int, compile_model: bool) -> dict:
  import torch

  from jaxlm.experiment import validate

  model_config = validate(config)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  model = hf_model(model_config).to(device)
  model.config.attn_implementation = "sdpa"
  train = config.train
  optimizer = torch.optim.AdamW(model.parameters(), lr=train.learning_rate, betas=(train.b1, train.b2), eps=train.eps,
                                weight_decay=train.weight_decay)
  tokens = torch.randint(4, model_config.vocab_size, (train.batch_size, config.data.seq_len), device=device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=model_config.dtype == "bfloat16")

  def loss_fn(ids):
    with autocast:
      return model(input_ids=ids, labels=ids).loss

  compiled = False
  if compile_model:
    try:
      compiled_loss = torch.compile(loss_fn)
      start = time.perf_counter()
      compiled_loss(tokens).backward()
      compile_s = time.perf_counter() - start
      loss_fn, compiled = compiled_loss, True
    except Exception as error:  # noqa: BLE001 -- any compiler failure means "measure eager"
      print(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); timing eager.", file=sys.stderr)
  optimizer.zero_grad(set_to_none=True)

  def step():
    loss_fn(tokens).backward()
    if train.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  step_time = time_steps(step, steps, warmup, repeats, synchronize)
  result = {"peer": f"transformers {type(model).__name__} (torch {torch.__version__}, {device}, "
                    f"{'torch.compile' if compiled else 'eager'}, {torch.get_num_threads()} threads)",
            "peer_step_time_s": step_time,
            "peer_tokens_per_sec": train.batch_size * config.data.seq_len / step_time}
  if compiled:
    result["peer_compile_s"] = round(compile_s, 3)
  return result


# ---------------------------------------------------------------------------------------------------------------------
# Decoding (--decode)


def median_seconds(run, repeats: int) -> float:
  """Median wall time of `run()` (which must block until done) over `repeats` calls after one warm-up call."""
  run()
  timings = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    timings.append(time.perf_counter() - start)
  return statistics.median(timings)


def decode_row(batch: int, new_tokens: int, prefill_s: float, one_token_s: float, total_s: float) -> dict:
  return {"batch": batch, "prefill_ms": 1e3 * prefill_s,
          "per_token_ms": 1e3 * (total_s - one_token_s) / max(new_tokens - 1, 1),
          "tokens_per_sec": batch * new_tokens / total_s}


def benchmark_decode_jaxlm(config, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int) -> list:
  import jax
  import numpy as np

  from jaxlm.experiment import Experiment
  from jaxlm.inference import generate
  from jaxlm.inference.decode import CachedDecoder, DecodeSettings
  from jaxlm.models import params as params_lib

  model = Experiment.from_config(config).model
  params = params_lib.init_params(model, jax.random.key(0))  # on one device, like the peer
  step_model = CachedDecoder(model)
  prefill = jax.jit(lambda params, tokens, start: step_model.prefill(params, tokens, start, prompt_len + new_tokens))
  rows = []
  for batch in batch_sizes:
    tokens = np.random.default_rng(batch).integers(4, model.config.vocab_size, (batch, prompt_len), dtype=np.int32)
    start = np.zeros(batch, np.int32)

    def decode(count):
      settings = DecodeSettings(max_new_tokens=count)
      jax.block_until_ready(generate.decode(step_model, params, tokens, start, jax.random.key(0), settings))

    rows.append(decode_row(batch, new_tokens, median_seconds(lambda: jax.block_until_ready(
        prefill(params, tokens, start)), repeats), median_seconds(lambda: decode(1), repeats),
        median_seconds(lambda: decode(new_tokens), repeats)))
  return rows


def benchmark_decode_torch(config, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int) -> list:
  import torch

  from jaxlm.experiment import validate

  model_config = validate(config)
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  dtype = torch.bfloat16 if model_config.dtype == "bfloat16" else torch.float32
  model = hf_model(model_config).to(device=device, dtype=dtype).eval()
  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  rows = []
  for batch in batch_sizes:
    ids = torch.randint(4, model_config.vocab_size, (batch, prompt_len), device=device)
    mask = torch.ones_like(ids)

    @torch.inference_mode()
    def prefill():
      model(input_ids=ids, attention_mask=mask, use_cache=True)
      synchronize()

    @torch.inference_mode()
    def decode(count):
      model.generate(ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count, do_sample=False,
                     use_cache=True, pad_token_id=0, eos_token_id=None)
      synchronize()

    rows.append(decode_row(batch, new_tokens, median_seconds(prefill, repeats),
                           median_seconds(lambda: decode(1), repeats), median_seconds(lambda: decode(new_tokens),
                                                                                      repeats)))
  return rows


def decode_main(config) -> dict:
  import jax

  batch_sizes = [int(size) for size in _DECODE_BATCH_SIZES.value]
  args = (config, batch_sizes, _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value)
  result = {"mode": "decode", "backend": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
            "dtype": config.model.dtype, "prompt_len": _PROMPT_LEN.value, "new_tokens": _NEW_TOKENS.value,
            "jaxlm": benchmark_decode_jaxlm(*args)}
  if _PEER.value == "torch":
    import torch
    import transformers

    result["peer"] = (f"transformers {transformers.__version__} generate (torch {torch.__version__}, "
                      f"{torch.get_num_threads()} threads)")
    result["peer_rows"] = benchmark_decode_torch(*args)
    result["vs_peer"] = {row["batch"]: row["tokens_per_sec"] / peer["tokens_per_sec"]
                         for row, peer in zip(result["jaxlm"], result["peer_rows"])}
  return result


def main(argv):
  del argv
  config = _CONFIG.value
  if _TORCH_THREADS.value:
    import torch

    torch.set_num_threads(_TORCH_THREADS.value)
  if _DECODE.value:
    print(json.dumps(decode_main(config)), flush=True)
    return
  result = benchmark_jaxlm(config, _STEPS.value, _WARMUP.value, _REPEATS.value)
  if _PEER.value == "torch":
    result.update(benchmark_torch(config, _STEPS.value, _WARMUP.value, _REPEATS.value, _PEER_COMPILE.value))
    result["vs_peer"] = result["tokens_per_sec"] / result["peer_tokens_per_sec"]
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  runtime.set_recommended_xla_flags()
  app.run(main)
