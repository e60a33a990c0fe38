#!/usr/bin/env python3
"""Flower's FedAvg aggregation (`flwr.server.strategy.aggregate.aggregate`, NumPy on the CPU)
on dense f32 client updates: the peer the CPU engine's `sparsync bench aggregate` rows are
compared with (client updates per second, same machine, same minutes).

    python3 benches/peers/flower_ref.py --json out.json     # 64 × 2^20 and 16 × 2^24
"""
import argparse
import json
import statistics
import sys
import time

try:
    import numpy as np
    from flwr.server.strategy.aggregate import aggregate
except ImportError:  # pragma: no cover - reported to the user
    sys.exit("Flower is not installed: pip install flwr")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="20x64,24x16", help="log2(params)xclients, comma-separated")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    for case in a.cases.split(","):
        s, c = (int(v) for v in case.split("x"))
        n = 1 << s
        results = [([rng.standard_normal(n, dtype=np.float32) * 1e-3], 32) for _ in range(c)]
        aggregate(results)
        times = []
        for _ in range(a.reps):
            t = time.perf_counter()
            aggregate(results)
            times.append(time.perf_counter() - t)
        med = statistics.median(times)
        rows.append(dict(engine="flower-fedavg", params=n, clients=c, time_s=med, updates_per_s=c / med))
        print(f"flower FedAvg 2^{s} × {c} clients: {med * 1e3:9.2f} ms  {c / med:10.0f} client updates/s")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"flower": rows}, f, indent=1)


if __name__ == "__main__":
    main()
