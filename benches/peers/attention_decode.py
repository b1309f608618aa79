"""Decode attention in PyTorch on the shapes of issue 4, the peer of pagoda's paged decode kernel
(crates/pagoda-kernels/benches/cuda_paged_attention.rs): torch SDPA on contiguous K/V, f16, one
query token per sequence, q [B, H, 1, D] and k, v [B, KVH, L, D].

Two ways to give SDPA grouped-query heads, both timed:
  sdpa_gqa       scaled_dot_product_attention(..., enable_gqa=True): the KV heads as they are;
  sdpa_repeat_kv k and v expanded to H heads beforehand (repeat_interleave, not timed), as
                 transformers' repeat_kv does: the kernel then reads H / KVH times the bytes.
SDPA picks its backend itself. Throughput is over the logical K/V bytes, B * L * KVH * D * 2
tensors * 2 bytes, for both: the units of pagoda's bench. The device-to-device copy bandwidth
(read + write) is measured in the same run, for the fraction of copy.

Prints one JSON line per measurement: {"peer", "B", "H", "KVH", "L", "D", "ms", "gbps",
"of_copy"}. Times are medians of CUDA-event timings after warm-up, rotating over copies of K/V
that together exceed L2.

    python3 attention_decode.py [--compare LOG]

With --compare, LOG holds the output of the pagoda bench (its {"bench": "pagoda_decode", ...}
lines); a table of pagoda against each peer, shape by shape, is printed last.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F

SHAPES = [  # (B, H, KVH, L, D)
    (64, 24, 8, 2048, 128),
    (1, 32, 8, 32768, 128),
]
PEERS = ("sdpa_gqa", "sdpa_repeat_kv")
ROTATION_BYTES = 400 << 20
COPY_BYTES = 1 << 30


def median_ms(fn, warmup=5, iters=31):
    for i in range(warmup):
        fn(i)
    torch.cuda.synchronize()
    times = []
    for i in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn(i)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def copy_gbps():
    src = torch.empty(COPY_BYTES, dtype=torch.uint8, device="cuda").fill_(0x5A)
    dst = torch.empty_like(src)
    ms = median_ms(lambda _: dst.copy_(src), iters=11)
    del src, dst
    return 2 * COPY_BYTES / ms / 1e6


def kv_bytes(b, kvh, length, d):
    return b * length * kvh * d * 2 * 2


def measure(copy_rate):
    results = []
    for b, h, kvh, length, d in SHAPES:
        gen = torch.Generator(device="cuda").manual_seed(0)
        nbytes = kv_bytes(b, kvh, length, d)
        copies = max(1, -(-ROTATION_BYTES // nbytes))
        q = torch.randn(b, h, 1, d, dtype=torch.float16, device="cuda", generator=gen)
        kv = [tuple(torch.randn(b, kvh, length, d, dtype=torch.float16, device="cuda", generator=gen)
                    for _ in range(2)) for _ in range(copies)]
        for peer in PEERS:
            row = {"peer": peer, "B": b, "H": h, "KVH": kvh, "L": length, "D": d}
            inputs = kv
            try:
                if peer == "sdpa_repeat_kv":
                    # H / KVH times larger: one expanded copy already exceeds L2 unless the
                    # rotation needs a second.
                    group = h // kvh
                    wanted = 1 if kv_bytes(b, h, length, d) >= ROTATION_BYTES else min(2, len(kv))
                    inputs = [tuple(t.repeat_interleave(group, dim=1) for t in pair) for pair in kv[:wanted]]

                def call(i, inputs=inputs, gqa=peer == "sdpa_gqa"):
                    k, v = inputs[i % len(inputs)]
                    return F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)

                ms = median_ms(call)
                gbps = nbytes / ms / 1e6
                row.update(ms=round(ms, 4), gbps=round(gbps, 1), of_copy=round(gbps / copy_rate, 3))
            except RuntimeError as err:  # out of memory, or a backend that does not take the shape
                row.update(error=str(err).splitlines()[0][:160])
            print(json.dumps(row), flush=True)
            results.append(row)
            del inputs
        del q, kv
        torch.cuda.empty_cache()
    return results


def key(row):
    return (row["B"], row["H"], row["KVH"], row["L"], row["D"])


def compare(log_path, peers, copy_rate):
    ours = {}
    with open(log_path) as log:
        for line in log:
            line = line.strip()
            if not line.startswith("{"):
                continue
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if row.get("bench") == "pagoda_decode":
                ours[key(row)] = row
    theirs = {(p["peer"], key(p)): p for p in peers}
    print(f"\ndecode attention f16, GB/s of K/V read (% of copy); torch copy {copy_rate:.0f} GB/s, "
          "pagoda's own copy probe in its log")
    print(f"{'shape':>26} {'pagoda':>14} {'sdpa gqa':>14} {'ratio':>6} {'sdpa repeat_kv':>15} {'ratio':>6}")
    for shape in SHAPES:
        b, h, kvh, length, d = shape
        label = f"B{b} H{h} KVH{kvh} L{length} D{d}"
        mine = ours.get(shape)
        cells = [f"{mine['gbps']:6.0f} ({100 * mine['of_copy']:4.1f}%)" if mine else f"{'-':>14}"]
        for peer in PEERS:
            other = theirs.get((peer, shape), {})
            width = 14 if peer == "sdpa_gqa" else 15
            if other.get("gbps"):
                cells.append(f"{other['gbps']:{width - 8}.0f} ({100 * other['of_copy']:4.1f}%)")
                cells.append(f"{mine['gbps'] / other['gbps']:6.2f}" if mine else f"{'-':>6}")
            else:
                cells.append(f"{'-':>{width}}")
                cells.append(f"{'-':>6}")
        print(f"{label:>26} " + " ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="a log of the pagoda bench to compare against")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_decode.py: no CUDA device", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    rate = copy_gbps()
    print(json.dumps({"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__,
                      "copy_gbps": round(rate)}))
    peers = measure(rate)
    if args.compare:
        compare(args.compare, peers, rate)
    return 0


if __name__ == "__main__":
    sys.exit(main())
