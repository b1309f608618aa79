"""NF4 matmul in bitsandbytes on the Llama-3.2-3B layer shapes of shared/BENCH.md, the peer of
pagoda's crates/pagoda-kernels/benches/cuda_nf4.rs, and the reference data of pagoda's bit-exactness
tests.

    python3 nf4_matmul.py --dump DIR      # bitsandbytes' quantization and decoding, for the tests
    python3 nf4_matmul.py [--compare LOG] # timings; with LOG (the pagoda bench's output), a table
    python3 nf4_matmul.py --ncu CSV --profile-log LOG [--copy-gbps X]
                                          # kernel times of the bench's PAGODA_NF4_PROFILE=1 mode

--dump writes DIR/nf4_dump.safetensors: for each case, random weights as bitsandbytes' quantize_4bit
packs them (codes, absmax, and the nested state when double-quantized) and what its dequantize_4bit
makes of them in f32, f16 and bf16 (crates/pagoda-kernels/tests/cuda_nf4.rs compares these bit for
bit), plus its 8-bit dynamic code; and DIR/linear4bit.safetensors, the state_dict of bnb.nn.Linear4bit
layers (double-quantized or not) under the key names transformers saves, with their decoded weights
(crates/pagoda-models/tests/nf4.rs loads them).

Timings: bnb.matmul_4bit (what Linear4bit.forward runs, NF4, blocks of 64, double-quantized scales,
f16 compute) and torch.nn.functional.linear in f16 (cuBLAS), each rotating over enough weight copies
to exceed the L2 cache, median of CUDA-event timings of 20-call runs after warm-up; eager launches,
and inside a recorded CUDA graph where the call can be recorded. One JSON line per measurement:
{"peer": "bnb_nf4" | "torch_f16", "k", "n", "m", "us", "graph_us"}.
"""
import argparse
import copy
import json
import os

import torch

SHAPES = [(3072, 5120), (3072, 16384), (8192, 3072), (3072, 3072)]  # (k, n): q/k/v, gate/up, down, o
ROWS = [1, 4, 16, 64]
ROTATION_BYTES = 200 << 20
CALLS = 20


def weights(n, k, dtype, seed):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, generator=gen, device="cuda", dtype=torch.float32) * 0.02
    flat = w.view(-1)
    flat[::37] *= 20.0  # outliers
    flat[-min(64, flat.numel()):] = 0.0  # a block of zeros
    return w.to(dtype)


def dump(out_dir):
    import bitsandbytes.functional as F
    from safetensors.torch import save_file

    os.makedirs(out_dir, exist_ok=True)
    cases = [  # name, (n, k), dtype, blocksize, nested
        ("f16_b64", (67, 192), torch.float16, 64, False),
        ("f16_b64_nested", (67, 192), torch.float16, 64, True),
        ("bf16_b64_nested", (300, 256), torch.bfloat16, 64, True),
        ("f32_b128", (33, 4096), torch.float32, 128, False),
        ("f16_b64_odd", (7, 99), torch.float16, 64, False),
        ("f16_b32_nested", (5, 96), torch.float16, 32, True),
        ("bf16_b4096_nested", (16, 8192), torch.bfloat16, 4096, True),
    ]
    tensors = {"dynamic_code": F.create_dynamic_map().float().contiguous()}
    for seed, (name, (n, k), dtype, blocksize, nested) in enumerate(cases):
        w = weights(n, k, dtype, seed)
        try:
            packed, state = F.quantize_4bit(w, blocksize=blocksize, compress_statistics=nested, quant_type="nf4")
        except Exception as err:  # a block size this build does not take
            print(json.dumps({"dump": name, "skipped": str(err)[:160]}))
            continue
        tensors[f"{name}.input"] = w.cpu()
        tensors[f"{name}.packed"] = packed.flatten().cpu()
        tensors[f"{name}.absmax"] = state.absmax.cpu()
        tensors[f"{name}.blocksize"] = torch.tensor([blocksize], dtype=torch.int32)
        if nested:
            tensors[f"{name}.nested_absmax"] = state.state2.absmax.float().cpu()
            tensors[f"{name}.nested_code"] = state.state2.code.float().cpu()
            tensors[f"{name}.nested_blocksize"] = torch.tensor([state.state2.blocksize], dtype=torch.int32)
            tensors[f"{name}.offset"] = state.offset.float().reshape(1).cpu()
        for dt, suffix in [(torch.float32, "f32"), (torch.float16, "f16"), (torch.bfloat16, "bf16")]:
            as_dt = copy.copy(state)
            as_dt.dtype = dt
            tensors[f"{name}.dequant_{suffix}"] = F.dequantize_4bit(packed, as_dt).reshape(n, k).cpu()
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "nf4_dump.safetensors"))

    import bitsandbytes as bnb

    layers = {}
    for prefix, nested in [("nested", True), ("plain", False)]:
        n, k = 67, 192
        lin = bnb.nn.Linear4bit(k, n, bias=True, compute_dtype=torch.float16, compress_statistics=nested, quant_type="nf4")
        w = weights(n, k, torch.float16, 100 + nested)
        lin.load_state_dict({"weight": w.cpu(), "bias": torch.linspace(-1, 1, n, dtype=torch.float16)})
        lin = lin.cuda()
        for key, value in lin.state_dict().items():
            layers[f"{prefix}.{key}"] = value.detach().cpu().clone()
        decoded = F.dequantize_4bit(lin.weight.data, lin.weight.quant_state)
        layers[f"{prefix}.expected_weight"] = decoded.reshape(n, k).cpu()
    save_file({k: v.contiguous() for k, v in layers.items()}, os.path.join(out_dir, "linear4bit.safetensors"))
    print(json.dumps({"dump": out_dir, "cases": len(cases), "linear4bit_keys": sorted(layers)}))


def median_us(fn, graph):
    """Median time per call of `fn` over runs of CALLS calls, eager or replayed from a graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    if graph:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            for _ in range(CALLS):
                fn()
        run = g.replay
    else:

        def run():
            for _ in range(CALLS):
                fn()

    run()
    torch.cuda.synchronize()
    times = []
    for _ in range(11):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1000.0 / CALLS)
    times.sort()
    return times[len(times) // 2]


def rotating(items):
    state = {"i": 0}

    def next_item():
        state["i"] = (state["i"] + 1) % len(items)
        return items[state["i"]]

    return next_item


def measure():
    """Every peer on every shape, eager first; graphs after, since a refused capture can leave
    the CUDA context unusable for what follows."""
    import bitsandbytes as bnb
    import bitsandbytes.functional as F

    cases = []
    for k, n in SHAPES:
        dense = [weights(n, k, torch.float16, c) for c in range(max(2, -(-ROTATION_BYTES // (2 * n * k))))]
        quantized = []
        for c in range(max(2, -(-ROTATION_BYTES // (n * k // 2)))):
            packed, state = F.quantize_4bit(dense[c % len(dense)], blocksize=64, compress_statistics=True, quant_type="nf4")
            quantized.append((packed, state))
        next_dense, next_quantized = rotating(dense), rotating(quantized)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.float16)

            def bnb_call(x=x, next_quantized=next_quantized):
                # One weight with its own quantization state.
                packed, state = next_quantized()
                return bnb.matmul_4bit(x, packed.t(), quant_state=state)

            def f16_call(x=x, next_dense=next_dense):
                return torch.nn.functional.linear(x, next_dense())

            for peer, fn in [("torch_f16", f16_call), ("bnb_nf4", bnb_call)]:
                cases.append(({"peer": peer, "k": k, "n": n, "m": m}, fn))
    results = []
    for row, fn in cases:
        row["us"] = round(median_us(fn, False), 3)
    capturable = {"torch_f16": True, "bnb_nf4": True}
    for row, fn in cases:
        row["graph_us"] = None
        if capturable[row["peer"]]:
            try:
                row["graph_us"] = round(median_us(fn, True), 3)
            except Exception as err:  # not capturable: not tried again
                capturable[row["peer"]] = False
                row["graph_error"] = str(err).splitlines()[0][:120]
        print(json.dumps(row), flush=True)
        results.append(row)
    return results


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
            if row.get("bench") == "pagoda_nf4":
                ours[(row["k"], row["n"], row["m"])] = row
    theirs = {(r["k"], r["n"], r["m"], r["peer"]): r for r in peers}
    print("\n== NF4 x f16 (pagoda: graph-replayed; peers: eager / graph, us per call)")
    print(
        f"{'k x n':>12} {'m':>3} {'pagoda us':>10} {'% copy':>7} {'bnb us':>14} {'torch f16 us':>14} "
        f"{'vs bnb':>7} {'vs f16':>7} {'vs our f16':>10}"
    )
    for (k, n, m), row in sorted(ours.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2])):
        bnb_row, f16_row = theirs.get((k, n, m, "bnb_nf4")), theirs.get((k, n, m, "torch_f16"))

        def fmt(r):
            if r is None:
                return "-"
            g = r.get("graph_us")
            return f"{r['us']:.1f}/{g:.1f}" if g else f"{r['us']:.1f}/-"

        def best(r):
            return min(v for v in (r["us"], r.get("graph_us")) if v) if r else None

        b, f = best(bnb_row), best(f16_row)
        ours_us = row["nf4_us"]
        ours_f16 = min(row["f16_linear_us"], row["cublas_us"])
        print(
            f"{k:>5} x {n:<5} {m:>3} {ours_us:>10.2f} {100 * row['nf4_gbps'] / row['copy_gbps']:>6.1f}% "
            f"{fmt(bnb_row):>14} {fmt(f16_row):>14} "
            f"{(b / ours_us if b else float('nan')):>6.2f}x {(f / ours_us if f else float('nan')):>6.2f}x "
            f"{ours_f16 / ours_us:>9.2f}x"
        )


def ncu_table(csv_path, log_path, copy_gbps):
    """Kernel durations Nsight Compute measured for the bench's profile mode: its log announces
    each group of launches in order, the CSV lists one gpu__time_duration per launch in order."""
    import csv

    groups = []
    with open(log_path) as log:
        for line in log:
            line = line.strip()
            if line.startswith("{") and '"profile"' in line:
                groups.append(json.loads(line))
    with open(csv_path) as f:
        lines = [l for l in f if l.startswith('"')]
    scale = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}
    durations = [
        float(row["Metric Value"].replace(",", "")) * scale.get(row["Metric Unit"], 1.0)
        for row in csv.DictReader(lines)
        if row.get("Metric Name") == "gpu__time_duration.sum"
    ]
    print(f"\n== NF4 kernels alone (Nsight Compute gpu__time_duration, median of 3; copy {copy_gbps} GB/s)")
    print(f"{'k x n':>12} {'m':>3} {'us':>8} {'GB/s':>7} {'% copy':>7}")
    at = 0
    for g in groups:
        times = sorted(durations[at:at + g["launches"]])
        at += g["launches"]
        if not times:
            break
        us = times[len(times) // 2]
        rate = g["nf4_bytes"] / us / 1e3
        row = dict(g, kernel_us=round(us, 3), gbps=round(rate, 1))
        print(json.dumps(row))
        print(f"{g['k']:>5} x {g['n']:<5} {g['m']:>3} {us:>8.2f} {rate:>7.0f} "
              f"{100 * rate / copy_gbps if copy_gbps else float('nan'):>6.1f}%")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dump", help="write bitsandbytes' reference data to this directory and exit")
    parser.add_argument("--compare", help="the pagoda bench's output, to tabulate against")
    parser.add_argument("--ncu", help="Nsight Compute CSV of the bench's profile mode")
    parser.add_argument("--profile-log", help="the bench's stdout in profile mode")
    parser.add_argument("--copy-gbps", type=float, default=0.0, help="copy bandwidth, read + write")
    args = parser.parse_args()
    if args.ncu:
        ncu_table(args.ncu, args.profile_log, args.copy_gbps)
        return
    if args.dump:
        dump(args.dump)
        return
    results = measure()
    if args.compare:
        compare(args.compare, results)


if __name__ == "__main__":
    main()
