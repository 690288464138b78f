#!/usr/bin/env bash
# The GPU measurements of issue 15 in one run, for a machine with an NVIDIA GPU and jax[cuda] installed:
#
#   bash scripts/gpu_benchmark.sh [RESULTS_DIR]        # default: ${OUT:-gpu_results}
#
# 1. Installs what a bare GPU machine with jax lacks (jaxlm's dependencies, the PyTorch peer), from local
#    wheels when WHEELS (default shared/wheels) holds them, else from PyPI.
# 2. Train step against the PyTorch peer (bfloat16): gpt2_124m at seq 1024 and llama_1b at seq 2048, each with
#    the XLA, cuDNN and Pallas-flash (segment ids) attention. Goals: causal MFU >= 40% (124M), >= 50% (1B),
#    vs_peer >= 1.
# 3. KV-cached decoding at batch 1 and 64, bfloat16 and int8 weight-only, against the peer's generate(); each
#    row prints roofline_fraction (bytes read per token / time / HBM bandwidth). Goals: 124M at batch 1
#    >= 1,000 tokens/s; 1B >= 50% of the roofline. int8 runs twice: with the runtime's default XLA flags and
#    with XLA's Triton GEMM fusion on, which can fuse the int8 -> bf16 convert into the matmul (without it the
#    dequantized kernel is materialised and int8 reads more bytes, not fewer).
#
# Every result is one JSON line in RESULTS_DIR/*.jsonl; stderr logs next to them. Sizes can be changed with
# GPT2_BATCH, LLAMA_BATCH, LLAMA_REMAT and STEPS. Budget: about 10 minutes on one H100 (compiles included).
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_results}}
WHEELS=${WHEELS:-shared/wheels}
GPT2_BATCH=${GPT2_BATCH:-16}
LLAMA_BATCH=${LLAMA_BATCH:-8}
LLAMA_REMAT=${LLAMA_REMAT:-save_dots}
STEPS=${STEPS:-10}
mkdir -p "$RESULTS"

# ------------------------------------------------------------------------------------------------- installs
missing=()
for module in flax optax orbax.checkpoint grain tensorflow_datasets sentencepiece ml_collections absl \
              tensorboardX scipy tqdm matplotlib torch transformers; do
  python -c "import ${module}" 2>/dev/null || missing+=("${module}")
done
if ((${#missing[@]})); then
  echo "installing for: ${missing[*]}" >&2
  if [[ -d "$WHEELS" ]]; then
    pip install --no-index --find-links "$WHEELS" -e ".[test]" >&2 || exit 1
  else
    pip install -e ".[test]" --extra-index-url https://download.pytorch.org/whl/cu124 >&2 || exit 1
  fi
else
  pip install --no-deps -e . >/dev/null 2>&1 || true  # jaxlm itself; its dependencies are all there
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$RESULTS/gpu.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$RESULTS/gpu.txt"

run() {  # run NAME ARGS...: one benchmark, its JSON line(s) appended to NAME.jsonl, a timeout per run
  local name=$1; shift
  echo "== ${name}: $*" >&2
  timeout 900 python scripts/benchmark.py "$@" >>"$RESULTS/${name}.jsonl" 2>>"$RESULTS/${name}.log" \
    || echo "!! ${name} failed (see $RESULTS/${name}.log)" >&2
  tail -n 1 "$RESULTS/${name}.jsonl" >&2
}

# -------------------------------------------------------------------------------------------- train steps
for attention in xla cudnn pallas; do
  run train_gpt2_124m --config=experiments/pretrain.py:gpt2_124m --config.data.seq_len=1024 \
      --config.train.batch_size="$GPT2_BATCH" --config.model.attention="$attention" --steps="$STEPS" --peer=torch
  run train_llama_1b --config=experiments/pretrain.py:llama_1b --config.data.seq_len=2048 \
      --config.train.batch_size="$LLAMA_BATCH" --config.model.remat="$LLAMA_REMAT" \
      --config.model.attention="$attention" --steps="$STEPS" --peer=torch
done

# ----------------------------------------------------------------------------------------------- decoding
for preset in gpt2_124m llama_1b; do
  run "decode_${preset}" --config=experiments/pretrain.py:"$preset" --decode --decode_batch_sizes=1,64 \
      --decode_variants=bfloat16,int8 --prompt_len=128 --new_tokens=256 --peer=torch
  XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=true" run "decode_${preset}_triton_gemm" \
      --config=experiments/pretrain.py:"$preset" --decode --decode_batch_sizes=1,64 --decode_variants=bfloat16,int8 \
      --prompt_len=128 --new_tokens=256
done

# ------------------------------------------------------------------------------------------------ summary
python - "$RESULTS" <<'EOF'
import json, pathlib, sys
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.jsonl")):
  for line in path.read_text().splitlines():
    row = json.loads(line)
    if row.get("mode") == "decode":
      for r in row["jaxlm"]:
        print(f"{path.stem:32s} {r['variant']:9s} batch {r['batch']:3d}: {r['tokens_per_sec']:10.0f} tokens/s, "
              f"roofline {r['roofline_fraction'] or 0:.2f}", f"vs_peer {row.get('vs_peer', {}).get(str(r['batch']))}")
    elif "mfu" in row:
      print(f"{path.stem:32s} attention {row['attention']:6s}: {row['tokens_per_sec']:10.0f} tokens/s, "
            f"MFU {row['mfu']:.3f}, vs_peer {row.get('vs_peer', float('nan')):.2f}, "
            f"memory {row['peak_memory_gib']} GiB (peer {row.get('peer_peak_memory_gib')})")
EOF
