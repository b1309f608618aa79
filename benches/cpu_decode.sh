#!/usr/bin/env bash
# CPU decode of SmolLM2-135M-Instruct (GGUF Q4_1): pagoda beside llama.cpp, same file, same prompt,
# same number of new tokens, greedy, EOS ignored, in one run.
#   benches/cpu_decode.sh [NEW_TOKENS] [RUNS]
# Needs llama-cpp-python for the peer (CMAKE_ARGS="-DGGML_NATIVE=ON" pip install llama-cpp-python).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
new_tokens=${1:-128}
runs=${2:-3}
prompt="The capital of France is"
model=$("$root/scripts/fetch-smollm2.sh")
cargo build --quiet --release --manifest-path "$root/Cargo.toml" -p pagoda-cli
pagoda="$root/target/release/pagoda"

"$pagoda" generate --model "$model" --max-tokens 8 --ignore-eos "$prompt" >/dev/null 2>&1  # warm-up
# f32: the GGUF blocks dequantized exactly, as transformers does; f16: half the bytes per token.
for dtype in f32 f16; do
  rates=()
  for _ in $(seq "$runs"); do
    line=$("$pagoda" generate --model "$model" --dtype "$dtype" --max-tokens "$new_tokens" --ignore-eos "$prompt" 2>&1 >/dev/null | tail -n 1)
    rates+=("$(sed -E 's/.*decode ([0-9.]+) tok\/s.*/\1/' <<<"$line")")
  done
  median=$(printf '%s\n' "${rates[@]}" | sort -n | sed -n "$(( (runs + 1) / 2 ))p")
  echo "{\"engine\": \"pagoda\", \"weights\": \"$dtype\", \"new_tokens\": $new_tokens, \"runs\": [$(IFS=,; echo "${rates[*]}")], \"decode_tok_s\": $median}"
done
python3 "$root/benches/cpu_decode_llamacpp.py" --gguf "$model" --threads "$(nproc)" --new-tokens "$new_tokens" --runs "$runs"
