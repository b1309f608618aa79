#!/usr/bin/env bash
# The main job on a fresh machine: fetch SmolLM2-135M-Instruct if absent, build pagoda, and
# generate. Arguments go to `pagoda generate`, e.g.:
#   scripts/smollm2.sh --chat "Write a haiku about pagodas."
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
model=$("$root/scripts/fetch-smollm2.sh")
cargo run --quiet --release --manifest-path "$root/Cargo.toml" -p pagoda-cli -- \
  generate --model "$model" "$@"
