#!/usr/bin/env bash
# Builds what a GPU machine without Rust needs to test pagoda: every test binary of the crates that
# run on CUDA, the CUDA criterion benches and the `pagoda` CLI, all with `--features cuda` in the
# stripped `bundle` profile, plus the parity reference script, the peer benchmark scripts and the
# runner (OUT/run.sh). See docs/gpu-testing.md.
#
#   scripts/gpu-bundle.sh [OUT]        (OUT defaults to gpu-bundle, which .gitignore ignores)
#
# Layout of OUT:
#   bin.tar.xz           bin/ packed (xz shrinks the binaries to a sixth; run.sh unpacks it):
#     bin/<test target>    test binaries, named by target (lib unit tests: the crate's lib name)
#     bin/bench-<target>   criterion benches that need CUDA
#     bin/pagoda           the CLI
#   manifest.tsv         kind, file name, package and crate directory (relative to the repository
#                        root) of every binary: the runner runs each test with that directory as
#                        its current directory
#   build-root           the repository root at build time, which env!("CARGO_MANIFEST_DIR") in
#                        the tests points into
#   gpu_parity_reference.py, peers/*.py, run.sh
#   bnb-site/            bitsandbytes unpacked (scripts/fetch-bnb-site.sh, or the folder
#                        PAGODA_BNB_SITE names; PAGODA_BNB_SITE= leaves it out)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-gpu-bundle}
case $out in /*) ;; *) out=$root/$out ;; esac
cd "$root"

# The crates whose tests exercise the CUDA backend (pagoda-sched and pagoda-server have no GPU code).
packages=(pagoda-tensor pagoda-kernels pagoda-kv pagoda-models pagoda-engine)
profile=bundle
max_mib=55
peers=${PAGODA_PEERS_DIR:-$root/../shared/peers}

pkg_args=()
for p in "${packages[@]}"; do pkg_args+=(-p "$p"); done

# OUT is emptied first: only when it is a bundle already (or empty), never some other folder.
if [[ -d $out && -n $(ls -A "$out") && ! -f $out/manifest.tsv ]]; then
    echo "gpu-bundle: $out exists and is not a bundle; not overwriting it" >&2
    exit 1
fi
rm -rf "$out"
mkdir -p "$out/bin" "$out/peers"
# bin/ is packed at the end; until then it holds the plain binaries.
manifest=$out/manifest.tsv
: >"$manifest"

# Crate directory (relative to the root) -> package name, from cargo's own metadata.
declare -A package_of
while IFS=$'\t' read -r dir name; do
    package_of[$dir]=$name
done < <(cargo metadata --format-version 1 --no-deps |
    jq -r --arg root "$root/" '.packages[] | [(.manifest_path | ltrimstr($root) | rtrimstr("/Cargo.toml")), .name] | @tsv')

# Reads cargo's JSON messages on stdin and prints "crate dir<TAB>target<TAB>executable" for every
# executable test artifact: lib unit tests and tests/*.rs for kind "test", benches for "bench".
executables() {
    jq -r --arg kind "$1" --arg root "$root/" '
        select(.reason == "compiler-artifact" and .executable != null and .profile.test == true)
        | select(($kind == "bench") == (.target.kind | index("bench") != null))
        | [(.manifest_path | ltrimstr($root) | rtrimstr("/Cargo.toml")), .target.name, .executable] | @tsv'
}

copy_all() { # kind name-prefix
    local kind=$1 prefix=$2 dir target exe name
    while IFS=$'\t' read -r dir target exe; do
        name=$prefix$target
        if [[ -e $out/bin/$name ]]; then
            echo "gpu-bundle: two binaries named $name" >&2
            exit 1
        fi
        cp "$exe" "$out/bin/$name"
        printf '%s\t%s\t%s\t%s\n' "$kind" "$name" "${package_of[$dir]:?no package in $dir}" "$dir" >>"$manifest"
    done
}

echo "gpu-bundle: test binaries (${packages[*]})" >&2
cargo test "${pkg_args[@]}" --features cuda --profile "$profile" --no-run --message-format=json-render-diagnostics |
    executables test | copy_all test ""

# Only the benches that need CUDA: the CPU ones have nothing to learn on the GPU machine.
mapfile -t cuda_benches < <(cargo metadata --format-version 1 --no-deps |
    jq -r '.packages[] | select(.name == "pagoda-kernels") | .targets[]
        | select(.kind | index("bench")) | select((.["required-features"] // []) | index("cuda")) | .name')
bench_args=()
for b in "${cuda_benches[@]}"; do bench_args+=(--bench "$b"); done
echo "gpu-bundle: CUDA benches (${cuda_benches[*]})" >&2
cargo bench -p pagoda-kernels --features cuda --profile "$profile" --no-run --message-format=json-render-diagnostics "${bench_args[@]}" |
    executables bench | copy_all bench bench-

echo "gpu-bundle: pagoda CLI" >&2
cargo build -p pagoda-cli --features cuda --profile "$profile" --message-format=json-render-diagnostics |
    jq -r 'select(.reason == "compiler-artifact" and .executable != null and .target.name == "pagoda") | .executable' |
    while read -r exe; do
        cp "$exe" "$out/bin/pagoda"
        printf 'cli\tpagoda\tpagoda-cli\tcrates/pagoda-cli\n' >>"$manifest"
    done
[[ -x $out/bin/pagoda ]] || { echo "gpu-bundle: the pagoda CLI was not built" >&2; exit 1; }

printf '%s\n' "$root" >"$out/build-root"
cp scripts/gpu_parity_reference.py "$out/"
cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh"
if compgen -G "$peers/*.py" >/dev/null; then
    cp "$peers"/*.py "$out/peers/"
else
    echo "gpu-bundle: no peer scripts in $peers (set PAGODA_PEERS_DIR)" >&2
fi

# bitsandbytes, for the NF4 bit-exactness tests and peers: its Python files and the one CUDA
# library the GPU machine needs (the whole wheel is too large to travel), fetched from PyPI by
# scripts/fetch-bnb-site.sh unless PAGODA_BNB_SITE names such a folder (or is set empty: none).
bnb_site=${PAGODA_BNB_SITE-$("$root/scripts/fetch-bnb-site.sh")}
if [[ -n $bnb_site ]]; then
    cp -r "$bnb_site" "$out/bnb-site"
fi

sort -t $'\t' -k1,1 -k4,4 -k2,2 -o "$manifest" "$manifest"

echo "gpu-bundle: packing bin/ ($(du -sh "$out/bin" | cut -f1))" >&2
tar -C "$out" -cf - bin | xz -6 -T2 >"$out/bin.tar.xz"
rm -r "$out/bin"

bytes=$(du -sb "$out" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "gpu-bundle: $(grep -c '^test' "$manifest") test binaries, $(grep -c '^bench' "$manifest") benches, CLI; $mib MiB in $out" >&2
if ((bytes > max_mib * 1048576)); then
    echo "gpu-bundle: $mib MiB is over the $max_mib MiB budget (the device copies at most 64 MiB with the working tree)" >&2
    exit 1
fi
