#!/usr/bin/env bash
# The test suite: every crate's tests, the parity tests against Hugging Face transformers and
# the SmolLM2 tests (which need the GGUF file: scripts/fetch-smollm2.sh puts it in models/), then
# pagoda-kernels' tests with the CUDA backend compiled in: without a GPU its GPU tests skip, and
# NVRTC (scripts/fetch-nvrtc.sh) compiles every kernels/*.cu for Hopper.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
export PAGODA_SMOLLM2_GGUF=${PAGODA_SMOLLM2_GGUF:-$("$root/scripts/fetch-smollm2.sh")}
# The real-model tests must run, not skip.
export PAGODA_REQUIRE_MODELS=1
# Release mode: the real-model tests run the 135M model, which is slow unoptimised.
cargo test --release --workspace --manifest-path "$root/Cargo.toml"

# No GPU is needed to compile the kernels, only NVRTC, which must load here.
nvrtc=$("$root/scripts/fetch-nvrtc.sh")
LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" PAGODA_REQUIRE_NVRTC=1 \
    cargo test --release -p pagoda-kernels --features cuda --manifest-path "$root/Cargo.toml"
