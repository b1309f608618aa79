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
library="libbitsandbytes_cuda$cuda.so"
if [ ! -f "$dest/bitsandbytes/$library" ]; then
  wheel=$("$root/scripts/fetch-pypi-wheel.sh" bitsandbytes "$version" \
    --python-version 3.12 --platform manylinux_2_24_x86_64)
  [ -f "$wheel/bitsandbytes/$library" ] ||
    { echo "fetch-bnb-site: bitsandbytes $version has no $library" >&2; exit 1; }
  rm -rf "$dest"
  mkdir -p "$dest"
  cp -r "$wheel/bitsandbytes" "$wheel"/bitsandbytes-*.dist-info "$dest/"
  find "$dest/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name "$library" \
    ! -name libbitsandbytes_cpu.so -delete
fi
echo "$dest"
