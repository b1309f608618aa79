#!/usr/bin/env bash
# Puts bitsandbytes under target/bnb-site/ for the GPU bundle, unless it is there already, and
# prints that folder. The GPU machine has no bitsandbytes and no network, and the whole wheel
# (a library per CUDA version) is too large to travel, so the folder keeps the package's Python
# files and the one CUDA library its PyTorch loads: PAGODA_BNB_CUDA, default 130 (PyTorch
# 2.11+cu130). scripts/gpu-bundle.sh copies the folder into the bundle as bnb-site/.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
version=0.50.2
cuda=${PAGODA_BNB_CUDA:-130}
dest="$root/target/bnb-site/$version-cuda$cuda"
if [ ! -f "$dest/bitsandbytes/libbitsandbytes_cuda$cuda.so" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --platform manylinux_2_24_x86_64 --dest "$work" "bitsandbytes==$version" >&2
  rm -rf "$dest"
  mkdir -p "$dest"
  python3 -m zipfile -e "$work"/bitsandbytes-*.whl "$dest"
  lib="$dest/bitsandbytes/libbitsandbytes_cuda$cuda.so"
  [ -f "$lib" ] || { echo "fetch-bnb-site: bitsandbytes $version has no CUDA $cuda library" >&2; exit 1; }
  find "$dest/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "libbitsandbytes_cuda$cuda.so" \
    ! -name libbitsandbytes_cpu.so -delete
fi
echo "$dest"
