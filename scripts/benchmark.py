"""Train-step speed: tokens/s, model TFLOP/s and MFU, against a PyTorch peer measured in the same run.

  python scripts/benchmark.py --config=experiments/pretrain.py:gpt2_124m --config.train.batch_size=16 --peer=torch

Prints one JSON line. jaxlm's step is the real one (`training.steps.jit_train_step`: forward, backward,
AdamW, clipping; sharded over `config.mesh`), fed the task's random batch (`Task.random_batch`: random tokens
of the batch's shapes; the input pipeline is not timed), so every task and model family is timed the same
way. Compile time is reported apart from step time; each timing is the median of `--repeats` runs of
`--steps` steps (more where those take under `--min_repeat_s`) after `--warmup` steps. `tokens_per_sec`
counts every token the step reads: an encoder-decoder's source (encoder) tokens and target (decoder) tokens.

Training FLOPs per token (`token_flops`; forward 2 per multiply-add, backward twice the forward; remat
recomputation not counted), N the parameters of the matrix multiplies a token goes through (attention, MLP,
the MLM transform, the V x D output projection, tied or not; no embedding lookups, norms, biases or pooler),
L layers, T the length of the token's sequence, N_heads H the attention width:
  decoder:  6 N + 12 f L T N_heads H  (causal self-attention: a query sees f = 1/2 of the keys on average)
  encoder:  6 N + 12 L T N_heads H    (bidirectional self-attention over T; the MLM head is in N)
  encoder-decoder, counted per token of each side (S source, T target length):
    source token:  6 (N_encoder + N_cross_kv) + 12 L_enc S N_heads H   (the cross-attention keys and values
                                                                         are projections of source tokens)
    target token:  6 N_decoder + 12 L_dec (f T + S) N_heads H           (causal self-attention + T x S
                                                                         cross-attention; N_decoder has the
                                                                         rest: self/cross queries and outputs,
                                                                         MLP, output projection)
`model_tflops_per_sec` and `mfu` use f = 1/2 (MaxText, llm.c); `mfu_palm` f = 1 (PaLM, nanoGPT: the dense
T x T scores that XLA's attention computes; equal to `mfu` for an encoder). tests/test_benchmark_families.py
checks f = 1 against the matrix multiplies of the jitted loss, counted one by one. The peak is the device's
datasheet dense bf16 peak when known (e.g. 989 TFLOP/s for an H100 SXM) and otherwise the large-matmul rate
measured here in the model's compute dtype (`measured_matmul_tflops`, always reported).

`--peer=torch`: the same architecture and batch in Hugging Face `transformers`, built from the config the model
exports as (GPT-2, Llama, BERT/RoBERTa for masked LM, T5 for span corruption; a model with no Hugging Face
twin is refused with the reason), random weights, the model class's loss on the same scored positions
(refused for tasks other than these pretraining objectives); `torch.compile` unless --nopeer_compile or it
fails, AdamW and clipping, bf16 autocast when the model computes in bf16; `vs_peer` = jaxlm tokens/s over
the peer's.

`--decode` (instead of the train step): KV-cached greedy decoding of random prompts of `--prompt_len`
tokens, `--new_tokens` each (no EOS), at each of `--decode_batch_sizes`, with the config's model (and
its dtype), by `jaxlm.inference.generate.decode` and, with `--peer=torch`, by `transformers`
`generate(use_cache=True, do_sample=False, min_new_tokens=max_new_tokens)` of the same architecture.
Measured the same way for both: `prefill_ms` (one forward of the prompts that fills the cache),
`per_token_ms` ((time for new_tokens - time for 1 new token) / (new_tokens - 1): fixed per-call costs
cancel), `tokens_per_sec` (batch x new_tokens over the whole call); medians of `--repeats` after a
warm-up call. On a CPU shared with other processes use `--torch_threads=1`: PyTorch's OpenMP threads
spinning against other work can make it 100x slower.

Decode variants (`--decode_variants`, e.g. float32,bfloat16,int8; default: the config's dtype): the weights
(and activations) in that dtype, or int8 weight-only kernels (`decode.quantize=int8`, activations in the
config's dtype). Each row gives
`bytes_per_step` (all weights plus every KV-cache slot, read once per generated token) and
`roofline_fraction` = bytes_per_step / per_token time / memory bandwidth (datasheet for known GPUs, else a
measured copy). `--workdir=RUN` decodes the run's trained weights (and its config); with
`--perplexity_batches=N` each variant also reports its perplexity on N batches of the validation split.

`--sweep=seq_len|batch|model` times the train step at each of `--sweep_points` (default SWEEP_POINTS:
sequence 256..4096 with model.max_len raised to fit, batch 1..32, presets tiny..gpt2_350m), with the peer
under `--peer=torch`, prints one JSON line per point and writes `--plot` (PNG): tokens/s, MFU and memory
per device (the device's peak where it keeps statistics, else XLA's buffer assignment of the step).
"""

import json
import math
import os
import statistics
import sys
import time

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from jaxlm import runtime  # noqa: E402  (sets XLA flags before jax starts)

_CONFIG = config_flags.DEFINE_config_file(
  "config", "experiments/quickstart.py", "Experiment config (model, batch, mesh).", lock_config=True
)
_STEPS = flags.DEFINE_integer("steps", 10, "Timed steps per repeat.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 3, "Timed repeats; the median is reported.")
_MIN_REPEAT_S = flags.DEFINE_float(
  "min_repeat_s", 1.0, "Each timed repeat runs at least about this long: more than --steps steps where they are short."
)
_PEER = flags.DEFINE_enum("peer", "none", ["none", "torch"], "Also time a PyTorch implementation of the same model.")
_PEER_COMPILE = flags.DEFINE_bool("peer_compile", True, "torch.compile the peer (falls back to eager on failure).")
_DECODE = flags.DEFINE_bool("decode", False, "Time KV-cached decoding instead of the train step.")
_DECODE_BATCH_SIZES = flags.DEFINE_list("decode_batch_sizes", ["1", "16"], "--decode: batch sizes to time.")
_PROMPT_LEN = flags.DEFINE_integer("prompt_len", 32, "--decode: prompt tokens per row.")
_NEW_TOKENS = flags.DEFINE_integer("new_tokens", 128, "--decode: tokens generated per row.")
_TORCH_THREADS = flags.DEFINE_integer("torch_threads", 0, "PyTorch intra-op threads; 0 = its default.")
_DECODE_VARIANTS = flags.DEFINE_list(
  "decode_variants",
  [],
  "--decode: weights to time: float32, bfloat16, int8 "
  "(weight-only, activations in the config dtype); default: the config's dtype.",
)
_WORKDIR = flags.DEFINE_string("workdir", "", "--decode: a trained run (its config and weights); '' = random weights.")
_PERPLEXITY_BATCHES = flags.DEFINE_integer(
  "perplexity_batches", 0, "--decode: eval batches of the validation split scored per variant."
)
_SWEEP = flags.DEFINE_enum(
  "sweep",
  "none",
  ["none", "seq_len", "batch", "model"],
  "Time the train step at each point of a sweep; one JSON line per point, then a PNG.",
)
_SWEEP_POINTS = flags.DEFINE_list("sweep_points", [], "--sweep: the points (default: SWEEP_POINTS of the sweep).")
_PLOT = flags.DEFINE_string("plot", "", "--sweep: PNG path; '' = sweep_<sweep>.png.")

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


CAUSAL_FRACTION = 0.5  # a causal query sees half the keys on average (MaxText, llm.c); 1.0 = dense (PaLM)


def datasheet_peak(device_kind: str) -> float | None:
  for prefix, flops in DATASHEET_PEAK_FLOPS.items():
    if device_kind.startswith(prefix):
      return flops
  return None


def matmul_params(params, prefix: str = "") -> int:
  """N: parameters (under the path `prefix`) that take part in a matrix multiply once per token, counting the
  output projection (tied or not); the pooler, which reads one token per row, is left out."""
  import jax

  tied = "lm_head" not in params  # the embedding is also the output projection
  total = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    names = [getattr(key, "key", "") for key in path]
    per_token = names[-1] == "kernel" and names[0] != "pooler" or tied and names[:2] == ["token_embed", "embedding"]
    if per_token and "/".join(names).startswith(prefix):
      total += leaf.size
  return total


def token_flops(model_config, params, lengths: dict, causal_fraction: float = CAUSAL_FRACTION) -> dict:
  """Training FLOPs per token of each token array of the batch ({"tokens": T} and, for an encoder-decoder,
  {"encoder_tokens": S}), with N as in `matmul_params` and `causal_fraction` of the keys seen by a causal
  query (see the module docstring)."""
  m = model_config
  width = m.num_heads * m.head_dim  # N H: the contraction of q.k and the output of p.v, per query
  seq_len = lengths["tokens"]
  if m.family == "decoder":
    return {"tokens": 6 * matmul_params(params) + 12 * causal_fraction * m.num_layers * seq_len * width}
  if m.family == "encoder":
    return {"tokens": 6 * matmul_params(params) + 12 * m.num_layers * seq_len * width}
  source_len = lengths["encoder_tokens"]
  cross_kv = sum(matmul_params(params, f"decoder/layers/cross_attention/{name}/") for name in ("key", "value"))
  source = matmul_params(params, "encoder/") + cross_kv
  return {
    "encoder_tokens": 6 * source + 12 * m.num_layers * source_len * width,
    "tokens": 6 * (matmul_params(params) - source)
    + 12 * m.decoder_layers * (causal_fraction * seq_len + source_len) * width,
  }


def step_tokens(shapes: dict) -> int:
  """Tokens a step reads: decoder (or encoder) tokens plus an encoder-decoder's source tokens."""
  return sum(shapes[key][0] * shapes[key][1] for key in ("tokens", "encoder_tokens") if key in shapes)


def step_flops(model_config, params, shapes: dict, causal_fraction: float = CAUSAL_FRACTION) -> float:
  """Training FLOPs of one step on a batch of `shapes` ({key: (B, T)}): per-token FLOPs times tokens."""
  lengths = {key: shape[1] for key, shape in shapes.items()}
  flops = token_flops(model_config, params, lengths, causal_fraction)
  return sum(shapes[key][0] * shapes[key][1] * per_token for key, per_token in flops.items())


def random_batch(task, rows: int, vocab_size: int) -> dict:
  """The task's random host batch (`Task.random_batch`), checked against the keys its steps compile for."""
  import numpy as np

  batch = task.random_batch(rows, vocab_size, np.random.default_rng(0))
  expected = task.batch_shapes(rows)
  if {key: value.shape for key, value in batch.items()} != expected:
    raise ValueError(f"Task {task.name!r}: random_batch gives {sorted(batch)}, its batches have {expected}.")
  return batch


def time_steps(run_step, steps: int, warmup: int, repeats: int, synchronize, min_seconds: float = 0.0) -> float:
  """Median seconds per step of `run_step()` over `repeats` runs of `steps` steps each; where `steps` steps take
  under `min_seconds`, each run takes as many steps as last about that long (measured by one more run first): a
  few-millisecond step timed over 10 steps is mostly scheduling noise."""
  for _ in range(warmup):
    run_step()
  if warmup:
    synchronize()

  def run(count: int) -> float:
    start = time.perf_counter()
    for _ in range(count):
      run_step()
    synchronize()
    return time.perf_counter() - start

  if min_seconds:
    steps = max(steps, math.ceil(steps * min_seconds / run(steps)))
  return statistics.median(run(steps) / steps for _ in range(repeats))


def measured_matmul_flops(dtype) -> float:
  """FLOP/s of a large square matmul on the first device (best of 5), the ceiling a model can reach."""
  import jax

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


def benchmark_jaxlm(
  config, steps: int, warmup: int, repeats: int, measured: float | None = None, min_repeat_s: float = 0.0
) -> dict:
  """The train step of `config`; `measured` (FLOP/s) is the matmul rate to use as the peak where there is no
  datasheet figure (default: measured here; a sweep measures it once for all its points); `min_repeat_s` as in
  `time_steps`."""
  import jax

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
  train_step = steps_lib.jit_train_step(
    model=model,
    task=task,
    optimizer=optimizer,
    schedule=schedule,
    dropout_rng=jax.random.key(1),
    grad_accum_steps=config.train.grad_accum_steps,
    state_sharding=shardings,
    mesh=mesh,
  )
  eval_step = steps_lib.jit_eval_step(model=model, task=task, param_sharding=shardings.params, mesh=mesh)
  host_batch = random_batch(task, batch_size, model_config.vocab_size)
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

  step_time = time_steps(train, steps, warmup, repeats, synchronize, min_repeat_s)
  forward = {}

  def forward_step():
    # The next call queued, then the previous one awaited: at most two in flight. Forward calls depend on nothing,
    # so without that all of them were queued at once, and on simulated CPU devices that deadlocks XLA:CPU's
    # collectives (the queued calls take a device's in-flight slots; see `steps.evaluate`).
    previous = forward.get("out")
    forward["out"] = eval_step(state.params, batch)
    jax.block_until_ready(previous)

  forward_time = time_steps(
    forward_step,
    steps,
    warmup,
    repeats,
    lambda: jax.block_until_ready(forward["out"]),
    min_repeat_s,
  )

  shapes = {key: value.shape for key, value in host_batch.items()}
  flops, dense_flops = (step_flops(model_config, state.params, shapes, fraction) for fraction in (CAUSAL_FRACTION, 1))
  tokens_per_sec = step_tokens(shapes) / step_time
  device = jax.devices()[0]
  measured = measured or measured_matmul_flops(model_config.compute_dtype)
  peak = datasheet_peak(device.device_kind)
  peak_per_run = (peak or measured) * mesh.size
  memory = device.memory_stats() or {}
  compiled_memory = train_step.memory_analysis()
  return {
    "backend": jax.default_backend(),
    "device_kind": device.device_kind,
    "devices": mesh.size,
    "mesh": dict(mesh.shape),
    "params": params_lib.count(state.params),
    "matmul_params": matmul_params(state.params),
    "batch_size": batch_size,
    "seq_len": seq_len,
    "dtype": model_config.dtype,
    "remat": model_config.remat,
    "attention": model_config.attention,
    "compile_s": round(compile_s, 3),
    "step_time_s": step_time,
    "tokens_per_sec": tokens_per_sec,
    "forward_step_time_s": forward_time,
    "forward_tokens_per_sec": step_tokens(shapes) / forward_time,
    "train_flops_per_step": flops,
    "model_tflops_per_sec": flops / step_time / 1e12,
    "mfu": flops / step_time / peak_per_run,
    "mfu_palm": dense_flops / step_time / peak_per_run,
    "peak_tflops_per_device": (peak or measured) / 1e12,
    "peak_source": "datasheet bf16 dense" if peak else "measured matmul",
    "measured_matmul_tflops": measured / 1e12,
    "peak_memory_gib": memory["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in memory else None,
    # XLA's buffer assignment of the train step per device (arguments + outputs + temporaries, donated state
    # counted once): the peak memory where the device keeps no statistics (CPU).
    "compiled_memory_gib": (
      compiled_memory.argument_size_in_bytes
      + compiled_memory.output_size_in_bytes
      - compiled_memory.alias_size_in_bytes
      + compiled_memory.temp_size_in_bytes
    )
    / 2**30
    if compiled_memory is not None
    else None,
  }


# Dropout keys of each Hugging Face family's config (Llama has no residual dropout).
HF_DROPOUT_KEYS = {
  "gpt2": ("resid_pdrop", "embd_pdrop"),
  "llama": (),
  "bert": ("hidden_dropout_prob",),
  "roberta": ("hidden_dropout_prob",),
  "t5": ("dropout_rate",),
}
PEER_TASKS = ("causal_lm", "masked_lm", "span_corruption")  # objectives the peer computes with the model's own loss


def hf_model(model_config):
  """The `transformers` model of the same architecture as a jaxlm ModelConfig (random weights): the config that
  `jaxlm.interop.hf` exports the model as (GPT-2, Llama, BERT/RoBERTa with the MLM head, T5); a ConfigError
  names what has no Hugging Face equivalent."""
  import transformers

  from jaxlm.interop import hf

  hf_config = hf.export_family(model_config).to_hf_config(model_config)
  hf_config.pop("architectures")
  model_type = hf_config.pop("model_type")
  hf_config.update({key: model_config.dropout_rate for key in HF_DROPOUT_KEYS[model_type]})
  config = transformers.AutoConfig.for_model(model_type, **hf_config)
  auto = {
    "decoder": transformers.AutoModelForCausalLM,
    "encoder": transformers.AutoModelForMaskedLM,
    "encoder_decoder": transformers.AutoModelForSeq2SeqLM,
  }
  return auto[model_config.family].from_config(config)


def peer_inputs(model_config, batch: dict, device) -> dict:
  """The peer's arguments for the jaxlm batch: the same tokens and the same scored positions (causal LM: every
  next token; MLM: the masked tokens; T5: the decoder's next tokens, the source to the encoder)."""
  import numpy as np
  import torch

  def tensor(x):
    return torch.as_tensor(np.asarray(x), dtype=torch.long, device=device)

  if model_config.family == "encoder":
    return dict(input_ids=tensor(batch["tokens"]), labels=tensor(np.where(batch["masked"], batch["targets"], -100)))
  if model_config.family == "encoder_decoder":
    labels = np.roll(batch["tokens"], -1, axis=1)
    return dict(
      input_ids=tensor(batch["encoder_tokens"]), decoder_input_ids=tensor(batch["tokens"]), labels=tensor(labels)
    )
  return dict(input_ids=tensor(batch["tokens"]), labels=tensor(batch["tokens"]))


def benchmark_torch(
  config, steps: int, warmup: int, repeats: int, compile_model: bool, min_repeat_s: float = 0.0
) -> dict:
  import torch

  from jaxlm.experiment import Experiment

  experiment = Experiment.from_config(config)
  model_config = experiment.model_config
  device = "cuda" if torch.cuda.is_available() else "cpu"
  torch.manual_seed(0)
  if device == "cuda":
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
  model = hf_model(model_config).to(device)
  model.config.attn_implementation = "sdpa"
  train = config.train
  optimizer = torch.optim.AdamW(
    model.parameters(),
    lr=train.learning_rate,
    betas=(train.b1, train.b2),
    eps=train.eps,
    weight_decay=train.weight_decay,
  )
  host_batch = random_batch(experiment.task, train.batch_size, model_config.vocab_size)  # jaxlm's batch
  inputs = peer_inputs(model_config, host_batch, device)
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=model_config.dtype == "bfloat16")

  def loss_fn(inputs):
    with autocast:
      return model(**inputs).loss

  compiled = False
  if compile_model:
    try:
      compiled_loss = torch.compile(loss_fn)
      start = time.perf_counter()
      compiled_loss(inputs).backward()
      compile_s = time.perf_counter() - start
      loss_fn, compiled = compiled_loss, True
    except Exception as error:  # noqa: BLE001 -- any compiler failure means "measure eager"
      print(f"torch.compile failed ({type(error).__name__}: {str(error)[:200]}); timing eager.", file=sys.stderr)
  optimizer.zero_grad(set_to_none=True)

  def step():
    loss_fn(inputs).backward()
    if train.grad_clip > 0:
      torch.nn.utils.clip_grad_norm_(model.parameters(), train.grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)

  synchronize = torch.cuda.synchronize if device == "cuda" else (lambda: None)
  step_time = time_steps(step, steps, warmup, repeats, synchronize, min_repeat_s)
  peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
  result = {
    "peer": f"transformers {type(model).__name__} (torch {torch.__version__}, {device}, "
    f"{'torch.compile' if compiled else 'eager'}, {torch.get_num_threads()} threads)",
    "peer_step_time_s": step_time,
    "peer_tokens_per_sec": step_tokens({key: value.shape for key, value in host_batch.items()}) / step_time,
    "peer_peak_memory_gib": peak_memory,
  }
  if compiled:
    result["peer_compile_s"] = round(compile_s, 3)
  return result


# ---------------------------------------------------------------------------------------------------------------------
# Decoding (--decode)


def decode_variant(experiment, params, variant: str):
  """(ModelConfig, model, parameters) of a decode variant, by `Experiment.decoding_model`: "float32" / "bfloat16"
  (weights and activations in that dtype) or "int8" (int8 weight-only kernels, activations in the config's dtype)."""
  if variant == "int8":
    return experiment.decoding_model(params, quantize_scheme="int8")
  return experiment.decoding_model(params, dtype=variant)


def benchmark_decode_jaxlm(
  config,
  variants: list[str],
  batch_sizes: list[int],
  prompt_len: int,
  new_tokens: int,
  repeats: int,
  workdir: str = "",
  perplexity_batches: int = 0,
) -> list:
  """Rows of (variant, batch): decode timings, bytes read per generated token and the roofline fraction; with
  `perplexity_batches`, the variant's perplexity on that many batches of the validation split."""
  import jax
  import numpy as np

  from jaxlm.experiment import Experiment
  from jaxlm.inference import timing
  from jaxlm.inference.decode import CachedDecoder
  from jaxlm.models import params as params_lib
  from jaxlm.models import quantize
  from jaxlm.training import steps as steps_lib

  experiment = Experiment.from_workdir(workdir) if workdir else Experiment.from_config(config)
  device = jax.devices()[0]
  mesh = experiment.mesh
  if workdir:  # trained weights
    float_params = experiment.load_params()
  else:
    float_params = params_lib.init_params(experiment.model, jax.random.key(0), mesh)
  bandwidth, bandwidth_source = memory_bandwidth(device)
  rows = []
  for variant in variants:
    model_config, model, params = decode_variant(experiment, float_params, variant)
    perplexity = None
    if perplexity_batches:  # on the experiment's mesh, as Experiment.evaluate
      eval_step = steps_lib.jit_eval_step(
        model=model, task=experiment.task, mesh=mesh, param_sharding=jax.tree.map(lambda x: x.sharding, params)
      )
      batches = experiment.eval_batches(experiment.config.data.eval_split, perplexity_batches)
      perplexity = experiment.task.summarize(steps_lib.evaluate(eval_step, params, batches, mesh))["perplexity"]
    params = jax.device_put(params, device)  # decoding runs on one device, like the peer
    weight_bytes = quantize.kernel_bytes(params)
    step_model = CachedDecoder(model)
    slots = prompt_len + new_tokens
    for batch in batch_sizes:
      row = timing.time_decode(step_model, params, batch, prompt_len, new_tokens, repeats, model_config.vocab_size)
      # Each step reads every weight once and every cache slot (the cache has prompt_len + new_tokens slots).
      cache_bytes = (
        2
        * model_config.num_layers
        * batch
        * model_config.num_kv_heads
        * slots
        * model_config.head_dim
        * np.dtype(model_config.compute_dtype).itemsize
      )
      step_bytes = weight_bytes + cache_bytes
      row.update(
        variant=variant,
        weight_bytes=weight_bytes,
        bytes_per_step=step_bytes,
        perplexity=perplexity,
        roofline_fraction=step_bytes / (row["per_token_ms"] / 1e3) / bandwidth if bandwidth else None,
        bandwidth_source=bandwidth_source,
      )
      rows.append(row)
  return rows


# Datasheet memory bandwidths (bytes/s) by device kind prefix: the decode roofline.
DATASHEET_BANDWIDTH = {
  "NVIDIA H100 80GB HBM3": 3.35e12,  # H100 SXM
  "NVIDIA H100 PCIe": 2.0e12,
  "NVIDIA H200": 4.8e12,
  "NVIDIA A100-SXM4-80GB": 2.04e12,
  "NVIDIA A100": 1.56e12,
}


def memory_bandwidth(device) -> tuple[float, str]:
  """(bytes/s, source): the datasheet figure of `device`, else a measured copy of a 256 MiB array (read + write)."""
  import jax
  import jax.numpy as jnp

  for prefix, bandwidth in DATASHEET_BANDWIDTH.items():
    if device.device_kind.startswith(prefix):
      return bandwidth, "datasheet"
  x = jax.device_put(jnp.ones((64, 2**20), jnp.float32), device)
  copy = jax.jit(lambda x: x + 1)
  copy(x).block_until_ready()
  best = float("inf")
  for _ in range(5):
    start = time.perf_counter()
    copy(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * x.nbytes / best, "measured copy"


def benchmark_decode_torch(config, batch_sizes: list[int], prompt_len: int, new_tokens: int, repeats: int) -> list:
  import torch

  from jaxlm.experiment import validate
  from jaxlm.inference.timing import decode_row, median_seconds

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
      model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=count,
        min_new_tokens=count,
        do_sample=False,
        use_cache=True,
        pad_token_id=0,
        eos_token_id=None,
      )
      synchronize()

    rows.append(
      decode_row(
        batch,
        new_tokens,
        median_seconds(prefill, repeats),
        median_seconds(lambda: decode(1), repeats),
        median_seconds(lambda: decode(new_tokens), repeats),
      )
    )
  return rows


def decode_main(config) -> dict:
  import jax

  from jaxlm import configs

  if _WORKDIR.value:  # the run's config (its model) for both sides
    config = configs.from_workdir(_WORKDIR.value)
  batch_sizes = [int(size) for size in _DECODE_BATCH_SIZES.value]
  common = (batch_sizes, _PROMPT_LEN.value, _NEW_TOKENS.value, _REPEATS.value)
  result = {
    "mode": "decode",
    "backend": jax.default_backend(),
    "device_kind": jax.devices()[0].device_kind,
    "dtype": config.model.dtype,
    "prompt_len": _PROMPT_LEN.value,
    "new_tokens": _NEW_TOKENS.value,
    "weights": _WORKDIR.value or "random",
    "jaxlm": benchmark_decode_jaxlm(
      config,
      _DECODE_VARIANTS.value or [config.model.dtype],
      *common,
      workdir=_WORKDIR.value,
      perplexity_batches=_PERPLEXITY_BATCHES.value,
    ),
  }
  if _PEER.value == "torch":
    import torch
    import transformers

    result["peer"] = (
      f"transformers {transformers.__version__} generate (torch {torch.__version__}, {torch.get_num_threads()} threads)"
    )
    result["peer_rows"] = benchmark_decode_torch(config, *common)
    same_dtype = [row for row in result["jaxlm"] if row["variant"] == config.model.dtype]
    result["vs_peer"] = {
      row["batch"]: row["tokens_per_sec"] / peer["tokens_per_sec"] for row, peer in zip(same_dtype, result["peer_rows"])
    }
  return result


# ---------------------------------------------------------------------------------------------------------------------
# Scaling sweeps (--sweep)

SWEEP_POINTS = {
  "seq_len": ["256", "512", "1024", "2048", "4096"],
  "batch": ["1", "2", "4", "8", "16", "32"],
  "model": ["tiny", "small", "gpt2_124m", "gpt2_350m"],
}


def sweep_config(config, sweep: str, point: str):
  """`config` with one sweep point applied: data.seq_len (model.max_len raised to fit), train.batch_size, or the
  model preset (its sizes over the config's model section; dtype, remat and attention kept)."""
  from jaxlm import configs

  config = config.copy_and_resolve_references()
  with config.unlocked():
    if sweep == "seq_len":
      config.data.seq_len = int(point)
      config.model.max_len = max(config.model.max_len, int(point))
    elif sweep == "batch":
      config.train.batch_size = int(point)
    else:
      kept = {key: config.model[key] for key in ("dtype", "param_dtype", "remat", "attention")}
      config.model = configs.model_config_dict(point, **kept)
      config.data.seq_len = min(config.data.seq_len, config.model.max_len)
  return config


def sweep_main(config, sweep: str, points: list[str], plot_path: str) -> list[dict]:
  """One JSON line per point (jaxlm and, with --peer=torch, the peer), then the plot."""
  from jaxlm.models.config import DTYPES

  measured = measured_matmul_flops(DTYPES[config.model.dtype])  # one peak for every point
  rows = []
  for point in points:
    point_config = sweep_config(config, sweep, point)
    row = {
      "sweep": sweep,
      "point": point,
      **benchmark_jaxlm(point_config, _STEPS.value, _WARMUP.value, _REPEATS.value, measured, _MIN_REPEAT_S.value),
    }
    if _PEER.value == "torch":
      row.update(
        benchmark_torch(
          point_config, _STEPS.value, _WARMUP.value, _REPEATS.value, _PEER_COMPILE.value, _MIN_REPEAT_S.value
        )
      )
      row["vs_peer"] = row["tokens_per_sec"] / row["peer_tokens_per_sec"]
      row["peer_mfu"] = row["mfu"] / row["vs_peer"]  # same FLOPs per token, same peak
    print(json.dumps(row), flush=True)
    rows.append(row)
  plot_sweep(rows, sweep, plot_path)
  return rows


def plot_sweep(rows: list[dict], sweep: str, path: str) -> None:
  """Tokens/s, MFU and peak memory against the swept quantity, jaxlm and the peer side by side (PNG)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  points = [row["point"] for row in rows]
  memory = [
    row["peak_memory_gib"] if row["peak_memory_gib"] is not None else row["compiled_memory_gib"] for row in rows
  ]
  memory_label = "peak" if rows[0]["peak_memory_gib"] is not None else "compiled (XLA buffers)"
  panels = [
    ("tokens/s", "tokens_per_sec", "peer_tokens_per_sec", None),
    ("MFU (causal)", "mfu", "peer_mfu", None),
    (f"memory per device, GiB ({memory_label})", None, "peer_peak_memory_gib", memory),
  ]
  figure, axes = plt.subplots(1, 3, figsize=(15, 4))
  for axis, (title, key, peer_key, values) in zip(axes, panels):
    axis.plot(points, values if values is not None else [row[key] for row in rows], "o-", label="jaxlm")
    peer = [row.get(peer_key) for row in rows]
    if any(value is not None for value in peer):
      axis.plot(points, [value if value is not None else float("nan") for value in peer], "s--", label="peer")
    axis.set_title(title)
    axis.set_xlabel(sweep)
    axis.grid(alpha=0.3)
    axis.legend()
  first = rows[0]
  figure.suptitle(f"{first['device_kind']} ({first['backend']}, devices: {first['devices']}), {first['dtype']}")
  figure.tight_layout()
  figure.savefig(path, dpi=100)
  print(json.dumps({"plot": os.path.abspath(path)}), flush=True)


def main(argv):
  del argv
  config = _CONFIG.value
  if _TORCH_THREADS.value:
    import torch

    torch.set_num_threads(_TORCH_THREADS.value)
  if _PEER.value == "torch" and config.task not in PEER_TASKS:
    raise app.UsageError(f"--peer=torch times the objectives {PEER_TASKS} (task={config.task!r}): use --peer=none.")
  if _DECODE.value:
    print(json.dumps(decode_main(config)), flush=True)
    return
  if _SWEEP.value != "none":
    sweep_main(
      config,
      _SWEEP.value,
      _SWEEP_POINTS.value or SWEEP_POINTS[_SWEEP.value],
      _PLOT.value or f"sweep_{_SWEEP.value}.png",
    )
    return
  result = benchmark_jaxlm(config, _STEPS.value, _WARMUP.value, _REPEATS.value, min_repeat_s=_MIN_REPEAT_S.value)
  if _PEER.value == "torch":
    result.update(
      benchmark_torch(config, _STEPS.value, _WARMUP.value, _REPEATS.value, _PEER_COMPILE.value, _MIN_REPEAT_S.value)
    )
    result["vs_peer"] = result["tokens_per_sec"] / result["peer_tokens_per_sec"]
  print(json.dumps(result), flush=True)


if __name__ == "__main__":
  runtime.set_recommended_xla_flags()
  runtime.keep_freed_host_memory()
  app.run(main)
