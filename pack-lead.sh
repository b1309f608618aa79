#!/usr/bin/env bash
# Packs the lead's targeted GPU binaries into /work/main/gpu-bundle/lead.
set -euo pipefail
out=/work/main/gpu-bundle/lead
rm -rf $out/bin $out/bin.tar.xz; mkdir -p $out/bin
jq -r 'select(.reason=="compiler-artifact" and .executable!=null and .profile.test==true) | [.target.name,.executable]|@tsv' /tmp/lead-tests.json | while IFS=$'\t' read n e; do cp "$e" $out/bin/$n; done
jq -r 'select(.reason=="compiler-artifact" and .executable!=null) | [.target.name,.executable]|@tsv' /tmp/lead-bench.json | while IFS=$'\t' read n e; do cp "$e" $out/bin/bench-$n; done
cp /work/lead-target/bundle/pagoda $out/bin/pagoda
cp /work/lead/scripts/gpu_parity_reference.py $out/
echo /work/lead > $out/build-root
tar -C $out -cf - bin | xz -6 -T2 > $out/bin.tar.xz; rm -r $out/bin
du -sh $out
