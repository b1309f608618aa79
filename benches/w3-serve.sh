#!/usr/bin/env bash
# W3 of shared/BENCH.md on a GPU machine, from the repository root, with the GPU bundle
# (scripts/gpu-bundle.sh) unpacked by its run.sh --keep-bin or by benches/gpu-bench.sh:
#   bash benches/w3-serve.sh [BUNDLE=gpu-bundle] [MODELS=/tmp/parity] [RATES=5] [SECONDS=300] [OUT=.]
# Serves Llama-3.2-3B (random weights of the real config, f16) with `pagoda serve`, replays Poisson
# arrivals of W3 requests at each rate with `pagoda bench serve` (streaming, prompts 64-1024 and
# outputs 32-512 tokens, seed 0), and writes w3.json and the plots latency.png and timeline.png
# into OUT/w3. Prints one JSON line per rate, then the server's /metrics counters.
set -uo pipefail
bundle=${1:-gpu-bundle}
models=${2:-/tmp/parity}
rates=${3:-5}
seconds=${4:-300}
out=${5:-${OUT:-.}}/w3
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
export PAGODA_KERNEL_CACHE=${PAGODA_KERNEL_CACHE:-/tmp/pagoda-kernels}
[ -d "$bundle/bin" ] || tar -C "$bundle" -xJf "$bundle/bin.tar.xz"
model=$models/llama-3.2-3b
if [ ! -f "$model/config.json" ]; then
  python3 "$bundle/gpu_parity_reference.py" --out "$models" --models llama-3.2-3b >/dev/null
fi
mkdir -p "$out"
port=8321
"$bundle/bin/pagoda" serve --model "$model" --device cuda --dtype f16 --max-context-tokens 2048 \
  --port "$port" >"$out/server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null' EXIT
get() { python3 -c 'import sys, urllib.request; sys.stdout.write(urllib.request.urlopen(sys.argv[1]).read().decode())' "$1"; }
for _ in $(seq 180); do
  get "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
  sleep 1
done
"$bundle/bin/pagoda" bench serve --url "http://127.0.0.1:$port" --rate "$rates" --duration "$seconds" \
  --seed 0 --out "$out/w3.json" --plots "$out"
get "http://127.0.0.1:$port/metrics" | grep -E '^pagoda_' | grep -v _bucket | head -40
