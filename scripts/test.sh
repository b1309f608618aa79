#!/usr/bin/env bash
# The test suite: every crate's tests, the parity tests against Hugging Face transformers and
# the SmolLM2 tests (which need the GGUF file: scripts/fetch-smollm2.sh puts it in models/).
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PAGODA_SMOLLM2_GGUF=${PAGODA_SMOLLM2_GGUF:-$("$root/scripts/fetch-smollm2.sh")}
# The real-model tests must run, not skip.
export PAGODA_REQUIRE_MODELS=1
# Release mode: the real-model tests run the 135M model, which is slow unoptimised.
cargo test --release --workspace --manifest-path "$root/Cargo.toml"
