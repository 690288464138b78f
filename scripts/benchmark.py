"""Benchmarks against a PyTorch peer of the same architecture and size, in the same run.

  python scripts/benchmark.py --decode --preset=small --batch_sizes=1,16 --prompt_len=32 --new_tokens=128

`--decode`: KV-cached greedy decoding of random prompts (no EOS, every row runs to
`--new_tokens`) by `jaxlm.inference.generate.decode` against Hugging Face
`transformers` `generate(use_cache=True, do_sample=False)` of a GPT-2 / Llama
model built from the same ModelConfig (random weights, same sizes). Reported per
batch size, the same way for both: prefill latency (one forward of the prompts that
fills the cache), per-token latency ((time of new_tokens - time of 1 new token) /
(new_tokens - 1), so fixed per-call costs cancel) and tokens/s (batch x new_tokens
over the whole call), each the median of `--repeats` timed runs after a warm-up
(compilation) run.
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers

from jaxlm import configs
from jaxlm.inference import generate
from jaxlm.inference.decode import CachedDecoder, DecodeSettings
from jaxlm.models.config import ModelConfig
from jaxlm.models.transformer import Decoder


def torch_peer(config: ModelConfig, dtype: torch.dtype) -> torch.nn.Module:
  """A `transformers` causal LM with the architecture and sizes of `config` (random weights)."""
  if config.position == "learned":
    peer_config = transformers.GPT2Config(
        vocab_size=config.vocab_size, n_embd=config.embed_dim, n_layer=config.num_layers, n_head=config.num_heads,
        n_inner=config.mlp_dim, n_positions=config.max_len, layer_norm_epsilon=config.norm_eps,
        activation_function="gelu_new", tie_word_embeddings=config.tie_embeddings)
    model = transformers.GPT2LMHeadModel(peer_config)
  else:
    peer_config = transformers.LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.embed_dim, intermediate_size=config.mlp_dim,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.kv_heads, head_dim=config.dim_per_head, max_position_embeddings=config.max_len,
        rms_norm_eps=config.norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_embeddings,
        attention_bias=config.use_bias, mlp_bias=config.use_bias)
    model = transformers.LlamaForCausalLM(peer_config)
  return model.to(dtype).eval()


def _median_seconds(run, repeats: int) -> float:
  run()  # warm-up: compilation, allocations
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _row(name: str, batch: int, new_tokens: int, prefill: float, one_token: float, total: float) -> dict:
  return {"impl": name, "batch": batch, "prefill_ms": 1e3 * prefill,
          "per_token_ms": 1e3 * (total - one_token) / max(new_tokens - 1, 1), "tokens_per_s": batch * new_tokens / total}


def decode_benchmark(config: ModelConfig, batch_sizes: list[int], prompt_len: int, new_tokens: int,
                     repeats: int) -> list[dict]:
  """jaxlm and the `transformers` peer, batch size by batch size, in this process."""
  model = Decoder(config)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, prompt_len), jnp.int32)))["params"]
  step_model = CachedDecoder(model)
  prefill = jax.jit(lambda params, tokens, start: step_model.prefill(params, tokens, start, prompt_len + new_tokens))
  peer = torch_peer(config, torch.bfloat16 if config.param_dtype == "bfloat16" else torch.float32)
  rows = []
  for batch in batch_sizes:
    tokens = np.random.default_rng(batch).integers(4, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    start = np.zeros(batch, np.int32)

    def jax_generate(count):
      settings = DecodeSettings(max_new_tokens=count)
      return jax.block_until_ready(generate.decode(step_model, params, tokens, start, jax.random.key(0), settings))

    times = [_median_seconds(run, repeats) for run in (lambda: jax.block_until_ready(prefill(params, tokens, start)),
                                                       lambda: jax_generate(1), lambda: jax_generate(new_tokens))]
    rows.append(_row("jaxlm", batch, new_tokens, *times))

    input_ids = torch.from_numpy(tokens.astype(np.int64))
    mask = torch.ones_like(input_ids)

    def peer_prefill():
      with torch.inference_mode():
        return peer(input_ids, attention_mask=mask, use_cache=True)

    def peer_generate(count):
      with torch.inference_mode():
        return peer.generate(input_ids, attention_mask=mask, max_new_tokens=count, min_new_tokens=count,
                             do_sample=False, use_cache=True, pad_token_id=0, eos_token_id=None)

    times = [_median_seconds(run, repeats) for run in (peer_prefill, lambda: peer_generate(1),
                                                       lambda: peer_generate(new_tokens))]
    rows.append(_row("torch+transformers", batch, new_tokens, *times))
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--decode", action="store_true", help="benchmark KV-cached greedy decoding")
  parser.add_argument("--preset", default="small", help=f"model preset: {sorted(configs.MODEL_PRESETS)}")
  parser.add_argument("--dtype", default="float32", help="weights and activations: float32 or bfloat16")
  parser.add_argument("--batch_sizes", default="1,16", help="comma-separated batch sizes")
  parser.add_argument("--prompt_len", type=int, default=32, help="prompt tokens per row")
  parser.add_argument("--new_tokens", type=int, default=128, help="tokens generated per row")
  parser.add_argument("--repeats", type=int, default=3, help="timed runs per measurement (median reported)")
  parser.add_argument("--torch_threads", type=int, default=0,
                      help="PyTorch intra-op threads; 0 = its default. On a CPU shared with other processes, 1 avoids "
                           "OpenMP threads spinning against each other (100x slower at 2 threads on 2 busy cores)")
  args = parser.parse_args()
  if not args.decode:
    parser.error("choose a benchmark: --decode")
  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
  config = ModelConfig.from_config(configs.model_config_dict(args.preset, dtype=args.dtype, param_dtype=args.dtype))
  print(f"# decode: preset {args.preset} ({args.dtype}), prompt {args.prompt_len} + {args.new_tokens} new tokens, "
        f"jax {jax.__version__} on {jax.devices()[0].platform}, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), transformers {transformers.__version__}")
  rows = decode_benchmark(config, [int(b) for b in args.batch_sizes.split(",")], args.prompt_len, args.new_tokens,
                          args.repeats)
  print(f"{'impl':<20} {'batch':>5} {'prefill ms':>11} {'per-token ms':>13} {'tokens/s':>10}")
  for row in rows:
    print(f"{row['impl']:<20} {row['batch']:>5} {row['prefill_ms']:>11.2f} {row['per_token_ms']:>13.3f} "
          f"{row['tokens_per_s']:>10.1f}")
  for batch in sorted({row["batch"] for row in rows}):
    ours, peer = (row["tokens_per_s"] for row in rows if row["batch"] == batch)
    print(f"batch {batch}: jaxlm / peer tokens/s = {ours / peer:.2f}x")


if __name__ == "__main__":
  main()
