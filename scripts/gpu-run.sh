#!/usr/bin/env bash
# Runs a pagoda GPU bundle (scripts/gpu-bundle.sh) on a machine with an NVIDIA GPU and no Rust.
# The bundle holds this script as run.sh; start it from the root of a copy of the repository:
#
#   bash gpu-bundle/run.sh [--quick] [--dry] [--benches] [--keep-bin]
#
#   (default)   every test binary, each with its crate directory as current directory; then
#               random-weight checkpoints of the real Pythia-2.8B and Llama-3.2-3B configs (and of
#               their tiny versions) with float32 transformers logits, written by
#               gpu_parity_reference.py into /tmp/parity, and the gpu_parity test over them
#   --quick     the tiny parity models only (seconds instead of minutes)
#   --dry       rehearsal on a machine without a GPU: implies --quick, leaves PAGODA_REQUIRE_GPU
#               unset (GPU tests skip), builds the references on the CPU and runs the parity check
#               on the CPU (PAGODA_PARITY_ON_CPU=1)
#   --benches   also the CUDA criterion benches, in a short measurement
#   --keep-bin  leave the unpacked binaries in bin/ beside this script
#
# It prints each step as it ends, then the failing steps' output tails, the parity lines, and last
# a table of step, result and seconds. Every log goes to $PAGODA_GPU_LOGS (default
# /tmp/pagoda-gpu-logs), and as logs.tar.gz into $OUT when that is set. Exit status: 0 when every
# step passed. PAGODA_GPU_RUN_BUDGET (seconds, default 480) bounds the whole run: steps that would
# start after it are reported as not run, and each step's timeout is cut to what is left.
set -uo pipefail

bundle=$(cd "$(dirname "$0")" && pwd)
quick=0 dry=0 benches=0 keep_bin=0
for arg in "$@"; do
    case $arg in
        --quick) quick=1 ;;
        --dry) dry=1 quick=1 ;;
        --benches) benches=1 ;;
        --keep-bin) keep_bin=1 ;;
        -h | --help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "run.sh: unknown argument $arg (see --help)" >&2; exit 2 ;;
    esac
done

repo=$PWD
if [[ ! -f $repo/Cargo.toml || ! -d $repo/crates ]]; then
    repo=$(cd "$bundle/.." && pwd)
fi
if [[ ! -f $repo/Cargo.toml || ! -d $repo/crates ]]; then
    echo "run.sh: start it from the repository root (no Cargo.toml and crates/ in $PWD)" >&2
    exit 2
fi
cd "$repo" || exit 2

# Tests find their fixtures through env!("CARGO_MANIFEST_DIR"): an absolute path of the machine
# that built them. Where the copy lives elsewhere, that path is made to lead here.
build_root=$(cat "$bundle/build-root" 2>/dev/null || true)
if [[ -n $build_root && $build_root != "$repo" ]]; then
    if [[ ! -e $build_root ]]; then
        mkdir -p "$(dirname "$build_root")" && ln -s "$repo" "$build_root" &&
            echo "run.sh: linked $build_root -> $repo (fixture paths compiled into the tests)"
    elif [[ $(cd "$build_root" && pwd -P) != $(pwd -P) ]]; then
        echo "run.sh: warning: $build_root exists and is not this repository; tests reading fixtures may fail" >&2
    fi
fi

export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
export RUST_BACKTRACE=1
if ((dry)); then
    unset PAGODA_REQUIRE_GPU
    export PAGODA_PARITY_ON_CPU=1
    ref_device=cpu
else
    export PAGODA_REQUIRE_GPU=1
    unset PAGODA_PARITY_ON_CPU
    ref_device=cuda
fi
PAGODA_KERNEL_CACHE=$(mktemp -d /tmp/pagoda-kernel-cache.XXXXXX)
export PAGODA_KERNEL_CACHE
logs=${PAGODA_GPU_LOGS:-/tmp/pagoda-gpu-logs}
rm -rf "$logs"
mkdir -p "$logs"
parity_dir=${PAGODA_GPU_PARITY_OUT:-/tmp/parity}

budget=${PAGODA_GPU_RUN_BUDGET:-480}
start=$SECONDS
names=() results=() times=() notes=()

echo "== $(date -u +%FT%TZ) pagoda GPU run in $repo (quick=$quick dry=$dry benches=$benches)"
nvidia-smi -L 2>&1 || echo "(nvidia-smi: no GPU listed)"

# step NAME TIMEOUT DIR COMMAND...: runs COMMAND in DIR under a timeout, logs it, records the result.
step() {
    local name=$1 limit=$2 dir=$3
    shift 3
    local left=$((budget - (SECONDS - start))) log=$logs/$name.log
    if ((left < 5)); then
        names+=("$name") results+=("not run") times+=("-") notes+=("run budget of ${budget}s spent")
        echo "-- $name: not run (budget spent)"
        return 1
    fi
    ((limit > left)) && limit=$left
    local t0=$EPOCHREALTIME rc
    (cd "$dir" && timeout --kill-after=10 "$limit" "$@") >"$log" 2>&1
    rc=$?
    local secs
    secs=$(awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }')
    local result=pass note=""
    if ((rc == 124 || rc == 137)); then
        result=TIMEOUT note="over ${limit}s"
    elif ((rc != 0)); then
        result=FAIL note="exit $rc"
    fi
    # libtest summaries: "test result: ok. 12 passed; 0 failed; 1 ignored; ..."
    local counts
    counts=$(grep -Eo '[0-9]+ (passed|failed|ignored);' "$log" | awk '{ n[$2] += $1 } END {
        if (length(n)) printf "%d passed%s%s", n["passed;"], n["failed;"] ? ", " n["failed;"] " failed" : "",
            n["ignored;"] ? ", " n["ignored;"] " ignored" : "" }')
    local skips
    skips=$(grep -c 'skipped:' "$log")
    [[ -n $counts ]] && note="${note:+$note, }$counts"
    ((skips > 0)) && note="${note:+$note, }$skips skipped"
    names+=("$name") results+=("$result") times+=("$secs") notes+=("$note")
    echo "-- $name: $result in ${secs}s ${note:+($note)}"
    [[ $result == pass ]]
}

# The binaries travel packed (gpu-bundle.sh) and are unpacked beside it, into bin/; removed at the
# end unless --keep-bin (then later scripts of the same command, benches/gpu-bench.sh, find them).
# Left behind here, they would push the bundle over the size that may travel.
bins=$bundle/bin
rm -rf "$bins"
((keep_bin)) || trap 'rm -rf "$bins"' EXIT
if command -v xz >/dev/null; then
    tar -C "$bundle" -xJf "$bundle/bin.tar.xz"
else
    python3 -m tarfile -e "$bundle/bin.tar.xz" "$bundle"
fi || { echo "run.sh: cannot unpack $bundle/bin.tar.xz" >&2; exit 2; }
mapfile -t manifest <"$bundle/manifest.tsv"

# 0. Where the bundle carries bitsandbytes (bnb-site/, see gpu-bundle.sh), its quantization and
# decoding of the NF4 test cases, which the NF4 tests then compare bit for bit. bitsandbytes
# needs a GPU, so a rehearsal leaves it out.
if [[ -d $bundle/bnb-site ]] && ((!dry)); then
    export PYTHONPATH=$bundle/bnb-site${PYTHONPATH:+:$PYTHONPATH}
    if step bnb-reference 120 . python3 benches/peers/nf4_matmul.py --dump /tmp/pagoda-bnb; then
        export PAGODA_NF4_BNB_DIR=/tmp/pagoda-bnb
    fi
fi

# 1. Every test binary but gpu_parity, which needs the references of step 2.
for line in "${manifest[@]}"; do
    IFS=$'\t' read -r kind name _ dir <<<"$line"
    [[ $kind == test && $name != gpu_parity ]] || continue
    step "$name" 150 "$dir" "$bins/$name" --nocapture
done
step "pagoda-cli" 30 . "$bins/pagoda" --help

# 2. Parity at real sizes against float32 transformers.
rm -rf "$parity_dir"
if ((!quick)); then
    step reference-real 240 . python3 "$bundle/gpu_parity_reference.py" --out "$parity_dir" \
        --device "$ref_device"
fi
step reference-tiny 120 . python3 "$bundle/gpu_parity_reference.py" --out "$parity_dir" --tiny \
    --device "$ref_device"
if compgen -G "$parity_dir/*/reference.safetensors" >/dev/null; then
    export PAGODA_GPU_PARITY_DIR=$parity_dir
    step gpu_parity 300 crates/pagoda-models "$bins/gpu_parity" --nocapture --test-threads=1
    unset PAGODA_GPU_PARITY_DIR
else
    names+=(gpu_parity) results+=("not run") times+=("-") notes+=("no references")
fi

# 3. Benches, briefly.
if ((benches)); then
    for line in "${manifest[@]}"; do
        IFS=$'\t' read -r kind name _ dir <<<"$line"
        [[ $kind == bench ]] || continue
        step "$name" 120 "$dir" "$bins/$name" --bench --warm-up-time 1 --measurement-time 2 --noplot
    done
fi

failed=0
for r in "${results[@]}"; do [[ $r == pass ]] || failed=$((failed + 1)); done

report() {
    # Output tails of what failed (full logs in $logs).
    local i name
    for i in "${!names[@]}"; do
        [[ ${results[$i]} == pass || ${results[$i]} == "not run" ]] && continue
        echo
        echo "== ${names[$i]}: ${results[$i]}, last lines of $logs/${names[$i]}.log"
        grep -v 'parity .* ok$' "$logs/${names[$i]}.log" | tail -n 25
    done

    for name in reference-real reference-tiny; do
        [[ -f $logs/$name.log ]] && { echo; echo "== $name"; grep '^{' "$logs/$name.log"; }
    done
    if [[ -f $logs/gpu_parity.log ]]; then
        echo
        echo "== parity: relative L2 error of each prompt's logits against float32 transformers;"
        echo "   hf: transformers' own largest error in that dtype; argmax: prompts whose last position's argmax agrees"
        # With --nocapture, libtest's "test NAME ... " may precede the first line.
        grep -oE 'parity .* (ok|FAIL)$' "$logs/gpu_parity.log" | awk '
            { key = $2 " " $3 " " $4
              if (!(key in errs)) order[++n] = key
              for (f = 5; f <= NF; f++) { split($f, kv, "="); v[kv[1]] = kv[2] }
              errs[key] = errs[key] " " v["rel_l2"]; bound[key] = v["bound"]
              if (v["hf"] != "-" && v["hf"] + 0 > hf[key] + 0) hf[key] = v["hf"]
              total[key]++; same[key] += (v["last_argmax"] == "same"); bad[key] += ($NF == "FAIL") }
            END { for (i = 1; i <= n; i++) { k = order[i]; split(k, p, " ")
                printf "%-20s %-8s %-7s rel_l2%s  bound %s  hf %s  argmax %d/%d  %s\n", p[1], p[2], p[3], errs[k],
                    bound[k], (k in hf) ? hf[k] : "-", same[k], total[k], bad[k] ? "FAIL" : "ok" } }'
    fi

    echo
    echo "== summary: $((${#names[@]} - failed)) of ${#names[@]} steps passed in $((SECONDS - start)) s (logs: $logs)"
    printf '%-24s %-8s %8s  %s\n' step result seconds notes
    for i in "${!names[@]}"; do
        printf '%-24s %-8s %8s  %s\n' "${names[$i]}" "${results[$i]}" "${times[$i]}" "${notes[$i]}"
    done
}

if [[ -n ${OUT:-} && -d ${OUT:-} ]]; then
    tar -C "$(dirname "$logs")" -czf "$OUT/logs.tar.gz" "$(basename "$logs")" 2>/dev/null
    report | tee "$OUT/summary.txt"
else
    report
fi
rm -rf "$PAGODA_KERNEL_CACHE"
((failed == 0))
