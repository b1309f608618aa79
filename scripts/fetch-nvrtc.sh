#!/usr/bin/env bash
# Puts NVRTC (the CUDA runtime compiler, from the PyPI package `nvidia-cuda-nvrtc`) under
# target/nvrtc/, unless it is there already, and prints the folder holding libnvrtc.so.13. With
# it on LD_LIBRARY_PATH, the kernel registry compiles every kernels/*.cu for Hopper on a machine
# without a GPU or a CUDA toolkit (crates/pagoda-kernels/tests/cuda_registry.rs), which is how
# CI checks the kernels.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=13.5.37
dest="$root/target/nvrtc/$version"
lib="$dest/nvidia/cu13/lib"
if [ ! -f "$lib/libnvrtc.so.13" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" \
    "nvidia-cuda-nvrtc==$version" >&2
  rm -rf "$dest"
  mkdir -p "$dest"
  python3 -m zipfile -e "$work"/nvidia_cuda_nvrtc-*.whl "$dest"
fi
echo "$lib"
