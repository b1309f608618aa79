#!/usr/bin/env bash
# The GPU benchmarks of issue 3, pagoda and its peers in one run on one GPU, from the repository
# root of a machine that has the bundle (scripts/gpu-bundle.sh) and PyTorch + transformers:
#   bash benches/gpu-bench.sh [BUNDLE=gpu-bundle] [MODELS=/tmp/parity]
# Prints one JSON line per measurement, then a short table.
#   - the card's copy bandwidth (PyTorch) and torch.softmax on the BENCH.md shapes;
#   - pagoda's fused softmax (criterion, GB/s);
#   - flash-attention prefill on the BENCH.md shapes (TFLOP/s), beside torch SDPA's flash (FA2)
#     and cuDNN backends (benches/peers/attention_prefill.py);
#   - W1 decode, batch 1, prompt 128, 256 new tokens, fp16: pagoda (`pagoda bench decode`, with
#     its own copy-bandwidth floor; decode steps replayed as CUDA graphs, and with --eager host
#     launches) and HF transformers eager and static cache + torch.compile;
#   - W1 in NF4: `pagoda bench decode --quantize nf4`, and HF + bitsandbytes when the bundle
#     carries bitsandbytes unpacked in bnb-site/;
#   - W2, 64 requests x (128 prompt, 256 new tokens), and batch sizes 1 to 256: `pagoda bench
#     throughput` against its decode floor, and HF continuous batching (generate_batch).
# PARTS (third argument, default all) picks sections, comma-separated: softmax, flash,
# decode-attention, nf4-kernels (or kernels for those four), w1, nf4, w2; a whole run takes longer
# than one device call may, so it can be split.
# The models are Pythia-2.8B and Llama-3.2-3B from their real configs with random weights, made
# by scripts/gpu_parity_reference.py if MODELS does not hold them yet.
set -uo pipefail
bundle=${1:-gpu-bundle}
models=${2:-/tmp/parity}
parts=${3:-kernels,w1,nf4,w2}
parts=${parts//kernels/softmax,flash,decode-attention,nf4-kernels}
want() { [[ ",$parts," == *",$1,"* ]]; }
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PAGODA_KERNEL_CACHE=${PAGODA_KERNEL_CACHE:-/tmp/pagoda-kernels}
log=$(mktemp)
[ -d "$bundle/bin" ] || tar -C "$bundle" -xJf "$bundle/bin.tar.xz"
run() { # timeout-seconds command...
  local limit=$1; shift
  echo "+ $*" >&2
  timeout "$limit" "$@" 2>&1 | tee -a "$log" | grep -E '^\{|TB/s|GB/s|time:|thrpt:' || echo "(failed or timed out: $*)" | tee -a "$log"
}

# The models only for the parts that run them: the kernel parts need none, and writing them
# takes minutes of device time.
if want w1 || want nf4 || want w2; then
  for m in pythia-2.8b llama-3.2-3b; do
    if [ ! -f "$models/$m/config.json" ]; then
      run 300 python3 "$bundle/gpu_parity_reference.py" --out "$models" --models "$m"
    fi
  done
fi

want softmax && run 120 python3 "$bundle/peers/kernels_and_generate.py" hw softmax
for b in "$bundle"/bin/bench-cuda_softmax; do
  want softmax && [ -x "$b" ] && run 180 "$b" --bench --warm-up-time 1 --measurement-time 2
done
flash_log=$(mktemp)
if want flash && [ -x "$bundle/bin/bench-cuda_flash_attention" ]; then
  echo "+ bench-cuda_flash_attention" >&2
  timeout 240 "$bundle/bin/bench-cuda_flash_attention" --bench --warm-up-time 1 --measurement-time 2 \
    > "$flash_log" 2>&1 || echo "(failed or timed out: bench-cuda_flash_attention)"
  grep -E '^\{' "$flash_log" | tee -a "$log"
  timeout 240 python3 benches/peers/attention_prefill.py --compare "$flash_log" 2>&1 | tee -a "$log" | tail -6
fi
# Paged decode attention beside SDPA; NF4 products beside cuBLAS f16 and bitsandbytes.
for pair in "decode-attention cuda_paged_attention attention_decode.py" "nf4-kernels cuda_nf4 nf4_matmul.py"; do
  read -r part bench peer <<<"$pair"
  if want "$part" && [ -x "$bundle/bin/bench-$bench" ]; then
    bench_log=$(mktemp)
    echo "+ bench-$bench" >&2
    timeout 240 "$bundle/bin/bench-$bench" --bench --warm-up-time 1 --measurement-time 2 \
      > "$bench_log" 2>&1 || echo "(failed or timed out: bench-$bench)"
    grep -E '^\{' "$bench_log" | tee -a "$log"
    PYTHONPATH="$bundle/bnb-site:${PYTHONPATH:-}" timeout 240 python3 "benches/peers/$peer" \
      --compare "$bench_log" 2>&1 | tee -a "$log" | tail -12
  fi
done
for m in pythia-2.8b llama-3.2-3b; do
  for launches in "" --eager; do
    want w1 && run 180 "$bundle/bin/pagoda" bench decode --model "$models/$m" --device cuda --dtype f16 \
      --prompt-len 128 --new-tokens 256 --warmup 1 --reps 3 $launches
  done
done
for m in pythia-2.8b llama-3.2-3b; do
  want w1 && run 300 python3 "$bundle/peers/hf_decode.py" --model "$m" --modes fp16_eager,fp16_static_compile \
    --reps 2 --warmup 1
done
for m in pythia-2.8b llama-3.2-3b; do
  want nf4 && run 180 "$bundle/bin/pagoda" bench decode --model "$models/$m" --device cuda --dtype f16 \
    --quantize nf4 --prompt-len 128 --new-tokens 256 --warmup 1 --reps 3
done
if want nf4 && [ -d "$bundle/bnb-site" ]; then
  for m in pythia-2.8b llama-3.2-3b; do
    PYTHONPATH="$bundle/bnb-site:${PYTHONPATH:-}" run 300 python3 "$bundle/peers/hf_decode.py" \
      --model "$m" --modes nf4_sdpa --reps 1 --warmup 1
  done
fi
# W2: 64 requests x (128 prompt, 256 new tokens) through the engine, and throughput as the batch
# grows; HF continuous batching (generate_batch) on the same workload.
for m in pythia-2.8b llama-3.2-3b; do
  want w2 && run 240 "$bundle/bin/pagoda" bench throughput --model "$models/$m" --device cuda --dtype f16 \
    --batch-sizes 1,8,32,64,128,256 --prompt-len 128 --new-tokens 256 --plots "${OUT:-/tmp}/w2-$m"
done
if want w2; then
  for m in pythia-2.8b llama-3.2-3b; do
    run 300 python3 "$bundle/peers/hf_decode.py" --model "$m" --modes fp16_cb
  done
fi

# On the device machine, the whole log comes back through $OUT.
if [ -n "${OUT:-}" ]; then cp "$log" "$OUT/gpu-bench.log"; fi
echo "== W1 decode (fp16, prompt 128, 256 new tokens)"
python3 - "$log" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    try:
        r = json.loads(line)
    except ValueError:
        continue
    if r.get("bench") == "decode":
        launches = "graphs" if r.get("cuda_graphs") else "eager"
        if r.get("quantize"):
            launches = "nf4"
        print("pagoda %-6s %-8s TTFT %7.2f ms  TPOT %6.3f ms  %7.1f tok/s  floor %.3f ms  %.1f%% of floor"
              % (launches, r["architecture"], r["ttft_ms"], r["tpot_ms"], r["tok_s"], r["floor_tpot_ms"], 100 * r["fraction_of_floor"]))
    elif r.get("bench") == "throughput":
        print("pagoda W2 %-8s %4d requests  %8.1f tok/s  TPOT %6.2f ms  TTFT %7.1f ms  %.1f%% of decode floor  preemptions %d"
              % (r["architecture"], r["requests"], r["output_tok_s"], r["tpot_ms"] or 0, r["ttft_median_ms"] or 0,
                 100 * (r["fraction_of_decode_floor"] or 0), r["preemptions_total"]))
    elif r.get("mode") == "fp16_cb":
        print("HF W2 generate_batch %-13s %s requests  %s tok/s  TPOT %s ms  errors %s"
              % (r["model"], r.get("requests"), r.get("tok_s"), r.get("tpot_ms_median"), r.get("errors", r.get("error"))))
    elif "decode_tok_s" in r:
        print("HF %-20s %-13s TTFT %7.2f ms  TPOT %6.3f ms  %7.1f tok/s"
              % (r["mode"], r["model"], r["ttft_ms"], r["tpot_ms"], r["decode_tok_s"]))
    elif r.get("what") in ("softmax", "d2d_copy"):
        print("torch", json.dumps(r))
PY
