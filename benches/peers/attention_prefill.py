"""Attention prefill in PyTorch on the shapes of shared/BENCH.md, the peers of pagoda's flash kernel
(crates/pagoda-kernels/benches/cuda_flash_attention.rs): torch SDPA restricted to its flash backend
(FlashAttention-2) and to its cuDNN backend, f16, contiguous [B, H, S, D] tensors.

Prints one JSON line per measurement: {"peer": "sdpa_flash" | "sdpa_cudnn", "B", "H", "S", "D",
"causal", "ms", "tflops"}; FLOPs are 4 * B * H * S^2 * D, halved when causal. Times are medians of
CUDA-event timings after warm-up.

    python3 attention_prefill.py [--compare LOG]

With --compare, LOG holds the output of the pagoda bench (its {"bench": "pagoda_flash", ...} lines);
a table of pagoda against each peer, shape by shape, is printed last.
"""
import argparse
import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # (B, H, S, D, causal)
    (4, 32, 4096, 128, True),
    (4, 32, 4096, 128, False),
    (4, 32, 4096, 80, True),
    (1, 32, 16384, 128, True),
]
BACKENDS = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def flops(b, h, s, d, causal):
    full = 4 * b * h * s * s * d
    return full / 2 if causal else full


def median_ms(fn, warmup=5, iters=21):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def measure():
    results = []
    for b, h, s, d, causal in SHAPES:
        # Random normal inputs (never zeros), one set per shape.
        gen = torch.Generator(device="cuda").manual_seed(0)
        q, k, v = (torch.randn(b, h, s, d, dtype=torch.float16, device="cuda", generator=gen) for _ in range(3))
        for name, backend in BACKENDS.items():
            row = {"peer": name, "B": b, "H": h, "S": s, "D": d, "causal": causal}
            try:
                with sdpa_kernel(backend):
                    ms = median_ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
                row.update(ms=round(ms, 3), tflops=round(flops(b, h, s, d, causal) / ms / 1e9, 1))
            except RuntimeError as err:  # a backend that does not take the shape on this GPU
                row.update(error=str(err).splitlines()[0][:160])
            print(json.dumps(row), flush=True)
            results.append(row)
        del q, k, v
        torch.cuda.empty_cache()
    return results


def key(row):
    return (row["B"], row["H"], row["S"], row["D"], bool(row["causal"]))


def compare(log_path, peers):
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
            if row.get("bench") == "pagoda_flash":
                ours[key(row)] = row
    theirs = {(p["peer"], key(p)): p for p in peers}
    print("\nattention prefill f16, TFLOP/s (pagoda / peer = ratio)")
    print(f"{'shape':>28} {'pagoda':>8} {'sdpa flash':>11} {'ratio':>6} {'cudnn':>8} {'ratio':>6}")
    for b, h, s, d, causal in SHAPES:
        k = (b, h, s, d, causal)
        label = f"B{b} H{h} S{s} D{d} {'causal' if causal else 'full'}"
        mine = ours.get(k, {}).get("tflops")
        cells = [f"{mine:8.1f}" if mine else f"{'-':>8}"]
        for peer in BACKENDS:
            other = theirs.get((peer, k), {}).get("tflops")
            ratio = f"{mine / other:6.2f}" if mine and other else f"{'-':>6}"
            width = 11 if peer == "sdpa_flash" else 8
            cells.append(f"{other:{width}.1f}" if other else f"{'-':>{width}}")
            cells.append(ratio)
        print(f"{label:>28} " + " ".join(cells))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", help="a log of the pagoda bench to compare against")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("attention_prefill.py: no CUDA device", file=sys.stderr)
        return 1
    props = torch.cuda.get_device_properties(0)
    print(json.dumps({"gpu": props.name, "sms": props.multi_processor_count, "torch": torch.__version__}))
    peers = measure()
    if args.compare:
        compare(args.compare, peers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
