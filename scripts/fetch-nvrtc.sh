#!/usr/bin/env bash
# Fetches NVRTC (the CUDA runtime compiler, PyPI package `nvidia-cuda-nvrtc`) into target/ unless
# it is there already, and prints the folder holding libnvrtc.so.13. With it on LD_LIBRARY_PATH,
# the kernel registry compiles every kernels/*.cu for Hopper on a machine without a GPU or a CUDA
# toolkit (crates/pagoda-kernels/tests/cuda_registry.rs), which is how CI checks the kernels.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
echo "$("$root/scripts/fetch-pypi-wheel.sh" nvidia-cuda-nvrtc 13.5.37)/nvidia/cu13/lib"
