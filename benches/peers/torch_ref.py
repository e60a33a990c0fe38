#!/usr/bin/env python3
"""PyTorch reference for `sparsync bench aggregate` and `sparsync bench topk`.

Runs the same workloads on CUDA when available (else CPU) and prints a table plus JSON:

  aggregate: a batch of B sparse updates at 1% density over 2^s parameters (f16 values,
             int32 indices), weighted and added with one `index_add_` (all updates
             concatenated), plus a plain `copy_` of the same bytes for the bandwidth limit.
  topk:      `torch.topk(d.abs(), k)` of 2^s f32 values, then the indices sorted and the values
             gathered (what a Delta needs), plus one `copy_` of the input.

Timing: CUDA events around each repetition after warm-up, median of --reps.

    python3 benches/peers/torch_ref.py --json out.json            # both workloads
    python3 benches/peers/torch_ref.py --workload topk --log2-sizes 20,24,26
"""
import argparse
import json
import statistics
import sys
import time

try:
    import torch
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("PyTorch is not installed: pip install torch")


def timer(dev):
    if dev.type == "cuda":
        def run(fn, reps):
            times = []
            for _ in range(reps):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                fn()
                b.record()
                torch.cuda.synchronize()
                times.append(a.elapsed_time(b) / 1e3)
            return statistics.median(times)
    else:
        def run(fn, reps):
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            return statistics.median(times)
    return run


def aggregate(dev, run, log2_sizes, batches, density, reps):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(0)
    for s in log2_sizes:
        n = 1 << s
        nnz = max(1, int(n * density + 0.999999))
        stride = n // nnz
        for b in batches:
            base = torch.arange(nnz, dtype=torch.int64) * stride
            idx = torch.cat([base + torch.randint(0, stride, (nnz,), generator=g) for _ in range(b)]).to(torch.int32)
            vals = (torch.rand(b * nnz, generator=g) - 0.5).mul(0.01).to(torch.float16)
            w = torch.full((b,), 1.0 / b).repeat_interleave(nnz)
            idx, vals, w = idx.to(dev), vals.to(dev), w.to(dev)
            acc = torch.zeros(n, dtype=torch.float32, device=dev)
            fn = lambda: acc.index_add_(0, idx, vals.float() * w)
            fn()
            t = run(fn, reps)
            entries = b * nnz
            payload = entries * 6
            traffic = payload + 8 * entries
            src = torch.empty(traffic // 2 // 4, dtype=torch.float32, device=dev)
            dst = torch.empty_like(src)
            copy = lambda: dst.copy_(src)
            copy()
            tc = run(copy, reps)
            eff = traffic / t / 1e9
            cgb = traffic / tc / 1e9
            rows.append(dict(engine=f"torch-index_add_-{dev.type}", params=n, batch=b, density=density, entries=entries,
                             traffic_bytes=traffic, scatter_s=t, updates_per_s=b / t, effective_gbps=eff,
                             copy_gbps=cgb, ratio_to_copy=eff / cgb))
    return rows


def topk(dev, run, log2_sizes, densities, reps):
    rows = []
    g = torch.Generator(device="cpu").manual_seed(1)
    for s in log2_sizes:
        n = 1 << s
        d = (torch.randn(n, generator=g) * 1e-3).to(dev)
        dst = torch.empty_like(d)
        copy = lambda: dst.copy_(d)
        copy()
        tc = run(copy, reps)
        for rho in densities:
            k = min(n, int(rho * n + 0.999999))

            def fn():
                _, i = torch.topk(d.abs(), k, sorted=False)
                i, _ = torch.sort(i)
                return d[i].half()

            fn()
            t = run(fn, reps)
            rows.append(dict(engine=f"torch.topk-{dev.type}", n=n, k=k, density=rho, time_s=t,
                             elements_per_s=n / t, copy_s=tc, passes_equivalent=t / tc))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=["aggregate", "topk", "all"], default="all")
    ap.add_argument("--log2-sizes", default=None, help="comma-separated powers of two")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    ap.add_argument("--cpu", action="store_true", help="run on the CPU even when CUDA exists")
    a = ap.parse_args()
    dev = torch.device("cuda" if torch.cuda.is_available() and not a.cpu else "cpu")
    run = timer(dev)
    name = torch.cuda.get_device_name(0) if dev.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {name}")
    out = {"environment": {"torch": torch.__version__, "device": name}}
    if a.workload in ("aggregate", "all"):
        sizes = [int(x) for x in a.log2_sizes.split(",")] if a.log2_sizes else [20, 24]
        out["aggregate"] = aggregate(dev, run, sizes, [1, 16, 64], 0.01, a.reps)
        for r in out["aggregate"]:
            print(f"{r['engine']:>24} 2^{r['params'].bit_length() - 1} batch {r['batch']:>2}: "
                  f"{r['scatter_s'] * 1e3:8.3f} ms  {r['effective_gbps']:7.1f} GB/s  "
                  f"copy {r['copy_gbps']:7.1f} GB/s  {100 * r['ratio_to_copy']:5.1f}% of copy")
    if a.workload in ("topk", "all"):
        sizes = [int(x) for x in a.log2_sizes.split(",")] if a.log2_sizes else [20, 24, 26]
        out["topk"] = topk(dev, run, sizes, [0.001, 0.01], a.reps)
        for r in out["topk"]:
            print(f"{r['engine']:>24} 2^{r['n'].bit_length() - 1} k {r['k']:>8}: {r['time_s'] * 1e3:8.3f} ms  "
                  f"{r['passes_equivalent']:6.2f} copy-passes")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
        print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
