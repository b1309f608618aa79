#!/usr/bin/env bash
# The machine code of a kernel module as the registry compiles it for a GPU, on a machine without
# one: NVRTC and nvdisasm come from PyPI (into target/), the kernel_report example compiles the
# module and prints each kernel's registers and spills, and nvdisasm prints the SASS.
#
#   scripts/kernel-sass.sh MODULE [KERNEL] [--arch 90a]
#
# MODULE is a kernels/*.cu name (paged_attention, softmax, ...); KERNEL limits the SASS to one
# kernel (paged_attention_mma_d128_w4_b2_pl_f16). The table goes to stderr, the SASS to stdout.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
module=${1:?usage: kernel-sass.sh MODULE [KERNEL] [--arch 90a]}
shift
kernel=
if [[ $# -gt 0 && $1 != --* ]]; then
  kernel=$1
  shift
fi

nvdisasm="$("$root/scripts/fetch-pypi-wheel.sh" nvidia-cuda-nvdisasm 13.5.37)/nvidia/cu13/bin/nvdisasm"
chmod +x "$nvdisasm"

cubin=$(mktemp --suffix .cubin)
LD_LIBRARY_PATH="$("$root/scripts/fetch-nvrtc.sh")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo run --quiet --release --manifest-path "$root/Cargo.toml" -p pagoda-kernels --features cuda \
  --example kernel_report -- "$module" --cubin "$cubin" "$@" >&2
if [[ -n $kernel ]]; then
  # One function's section: from its .text label to the next section.
  "$nvdisasm" -c "$cubin" | awk -v name=".text.$kernel:" '
    $1 == name { on = 1; print; next }
    on && /^[[:space:]]*\.(section|text\.)/ { exit }
    on { print }'
else
  "$nvdisasm" -c "$cubin"
fi
rm -f "$cubin"
