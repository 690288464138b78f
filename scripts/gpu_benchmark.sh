#!/usr/bin/env bash
# The GPU measurements of issue 15 in one run, for a machine with an NVIDIA GPU and jax[cuda] installed:
#
#   bash scripts/gpu_benchmark.sh [RESULTS_DIR]        # default: ${OUT:-gpu_results}
#
# 1. Installs what a GPU machine with jax lacks: from the wheels in WHEELS (default .whl; `pip download --no-deps`
#    of the missing packages, installed with --no-deps into /tmp/site, for a machine with no network) when that
#    folder exists, else jaxlm with its dependencies from PyPI. Then checks the Pallas flash kernel against XLA
#    and cuDNN attention on packed rows (scripts/gpu_attention_check.py: errors and times).
# 2. Train step (bfloat16): gpt2_124m at seq 1024 and llama_1b at seq 2048, each with the cuDNN (against the
#    PyTorch peer), Pallas-flash (segment ids) and XLA attention. Goals: causal MFU >= 40% (124M), >= 50% (1B),
#    vs_peer >= 1.
# 3. KV-cached decoding at batch 1 and 64, bfloat16 and int8 weight-only, against the peer's generate(); each
#    row prints roofline_fraction (bytes read per token / time / HBM bandwidth). Goals: 124M at batch 1
#    >= 1,000 tokens/s; 1B >= 50% of the roofline. int8 runs twice: with the runtime's default XLA flags and
#    with XLA's Triton GEMM fusion on, which can fuse the int8 -> bf16 convert into the matmul (without it the
#    dequantized kernel is materialised and int8 reads more bytes, not fewer).
#
# Every result is one JSON line in RESULTS_DIR/*.jsonl; stderr logs next to them; the runs go most important
# first, each under RUN_TIMEOUT seconds, so a run cut short still leaves the earlier results. Sizes can be
# changed with GPT2_BATCH, LLAMA_BATCH, LLAMA_REMAT and STEPS. Budget: about 10 minutes on one H100.
set -uo pipefail
cd "$(dirname "$0")/.."
RESULTS=${1:-${OUT:-gpu_results}}
WHEELS=${WHEELS:-.whl}
RUN_TIMEOUT=${RUN_TIMEOUT:-300}
GPT2_BATCH=${GPT2_BATCH:-16}
LLAMA_BATCH=${LLAMA_BATCH:-8}
LLAMA_REMAT=${LLAMA_REMAT:-save_dots}
STEPS=${STEPS:-10}
mkdir -p "$RESULTS"

# ------------------------------------------------------------------------------------------------- installs
if [[ -d "$WHEELS" ]]; then
  python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    "$WHEELS"/*.whl >&2 || exit 1
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  python -m pip install -e ".[test]" >&2 || exit 1
fi
python -c "import jaxlm, ml_collections, grain, tensorflow_datasets, torch, transformers" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$RESULTS/gpu.txt"
python -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$RESULTS/gpu.txt"

run() {  # run NAME ARGS...: one benchmark, its JSON line(s) appended to NAME.jsonl, under RUN_TIMEOUT seconds
  local name=$1; shift
  echo "== ${name}: $*" >&2
  timeout "$RUN_TIMEOUT" python scripts/benchmark.py "$@" >>"$RESULTS/${name}.jsonl" 2>>"$RESULTS/${name}.log" \
    || echo "!! ${name} failed (see $RESULTS/${name}.log)" >&2
  tail -n 1 "$RESULTS/${name}.jsonl" >&2
}
gpt2=(--config=experiments/pretrain.py:gpt2_124m --config.data.seq_len=1024 --config.train.batch_size="$GPT2_BATCH")
llama=(--config=experiments/pretrain.py:llama_1b --config.data.seq_len=2048 --config.train.batch_size="$LLAMA_BATCH"
       --config.model.remat="$LLAMA_REMAT")
decode=(--decode --decode_batch_sizes=1,64 --decode_variants=bfloat16,int8 --prompt_len=128 --new_tokens=256)

# ------------------------------------------------------------------------ kernels, then steps, most important first
timeout "$RUN_TIMEOUT" python scripts/gpu_attention_check.py >"$RESULTS/attention_check.jsonl" \
  2>"$RESULTS/attention_check.log" || echo "!! attention check failed (see $RESULTS/attention_check.log)" >&2
cat "$RESULTS/attention_check.jsonl" >&2
run train_gpt2_124m "${gpt2[@]}" --config.model.attention=cudnn --steps="$STEPS" --peer=torch
run decode_gpt2_124m --config=experiments/pretrain.py:gpt2_124m "${decode[@]}" --peer=torch
run train_llama_1b "${llama[@]}" --config.model.attention=cudnn --steps="$STEPS" --peer=torch
run train_gpt2_124m "${gpt2[@]}" --config.model.attention=pallas --steps="$STEPS"
run train_llama_1b "${llama[@]}" --config.model.attention=pallas --steps="$STEPS"
run decode_llama_1b --config=experiments/pretrain.py:llama_1b "${decode[@]}" --peer=torch
XLA_FLAGS="${XLA_FLAGS:-} --xla_gpu_enable_triton_gemm=true" run decode_gpt2_124m_triton_gemm \
  --config=experiments/pretrain.py:gpt2_124m "${decode[@]}"
run train_gpt2_124m "${gpt2[@]}" --config.model.attention=xla --steps="$STEPS"
run train_llama_1b "${llama[@]}" --config.model.attention=xla --steps="$STEPS"

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
