#!/usr/bin/env python3
"""Summary of a device check (scripts/device/check.sh): check.json and summary.txt.

    summarize.py RAW OUT    (RAW: the steps' own files; OUT: where the summary goes)

Reads steps.tsv (name, status, seconds) and the JSON each step wrote; ratios to PyTorch are
taken from the same run (torch.json). Exit status 1 when a step failed."""
import json
import os
import sys


def load(out, name):
    try:
        with open(os.path.join(out, name)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def main():
    raw, dest = sys.argv[1], sys.argv[2]
    out = raw
    steps = []
    with open(os.path.join(out, "steps.tsv")) as f:
        for line in f:
            name, status, secs = line.rstrip("\n").split("\t")
            steps.append(dict(step=name, status=status, seconds=int(secs)))
    adapter = load(out, "adapter.json") or {}
    agg = (load(out, "aggregate.json") or {}).get("aggregate", [])
    topk = (load(out, "topk.json") or {}).get("topk", [])
    torch = load(out, "torch.json") or {}
    e2e = [r for f in ("e2e.json", "e2e-fast.json")
           for r in ((load(out, f) or {}).get("e2e") or {}).get("rows", [])]
    t_agg = {(r["params"], r["batch"]): r for r in torch.get("aggregate", [])}
    t_topk = {(r["n"], r["k"]): r for r in torch.get("topk", [])}

    lines = []
    o = adapter.get("opened")
    if o:
        lines.append(f"adapter: {o['name']} | {o['backend']} | {o['device_type']} | driver {o['driver']} "
                     f"{o['driver_info']} | f16 {o['shader_f16']} | timestamps {o.get('timestamps')}")
    else:
        lines.append(f"adapter: none ({adapter.get('error', 'see adapter.txt')})")
    if torch:
        lines.append(f"peer: torch {torch['environment']['torch']} on {torch['environment']['device']}")
    try:
        with open(os.path.join(out, "machine.txt")) as f:
            lines += ["machine: " + l for l in f.read().splitlines() if l.strip()]
    except OSError:
        pass
    lines.append("")
    lines.append("steps: " + ", ".join(f"{s['step']} {s['status']} ({s['seconds']} s)" for s in steps))
    lines.append("")

    copies = (load(out, "copy.json") or {}).get("copy", [])
    if copies:
        lines.append("device copy (read + written bytes / time)")
        for r in copies:
            lines.append(f"  {r['bytes'] / 2**20:8.0f} MiB in buffers of {r['piece_bytes'] / 2**20:6.0f} MiB: "
                         f"{r['time_s'] * 1e3:8.3f} ms {r['gbps']:8.1f} GB/s ({r['timing']})")
        lines.append("")
    agg_rows = []
    if agg:
        lines.append("aggregate (1% density; kernels = the step's kernels alone (sum and apply), step = "
                     "staging + upload + kernels, waited; GB/s counts payload + 8 B per entry, as torch's)")
        lines.append(f"{'engine':>28} {'params':>6} {'batch':>5} {'kernels ms':>10} {'step ms':>9} "
                     f"{'upd/s':>10} {'GB/s':>7} {'of copy':>8} {'torch ms':>9} {'torch/ours':>10} {'disp':>4} {'timing':>6} "
                     f"{'bounds ms':>9} {'blocks ms':>9}")
        for r in agg:
            t = t_agg.get((r["params"], r["batch"]))
            vs = t["scatter_s"] / r["scatter_s"] if t else None
            agg_rows.append(dict(r, torch_scatter_s=t["scatter_s"] if t else None, torch_over_ours=vs))
            lines.append(f"{r['engine']:>28} 2^{r['params'].bit_length() - 1:<4} {r['batch']:>5} "
                         f"{r['scatter_s'] * 1e3:10.3f} {r['step_s'] * 1e3:9.3f} {r['updates_per_s']:10.0f} "
                         f"{r['effective_gbps']:7.1f} {100 * r['ratio_to_copy']:7.1f}% "
                         + (f"{t['scatter_s'] * 1e3:9.3f} {vs:10.2f}" if t else f"{'-':>9} {'-':>10}")
                         + f" {r.get('dispatches_per_step', 0):4.1f} {r.get('timing', '-'):>6}"
                         + f" {(r.get('bounds_s') or float('nan')) * 1e3:9.3f} {(r.get('blocks_s') or float('nan')) * 1e3:9.3f}")
        lines.append("")
    topk_rows = []
    if topk:
        lines.append("top-k (exact; steady state; copy-passes = time / one device copy of the input, same run; "
                     "passes = full reads of the input per selection)")
        lines.append(f"{'engine':>12} {'n':>6} {'k':>8} {'ms':>9} {'wall ms':>8} {'copy-passes':>11} {'cold':>6} "
                     f"{'passes':>6} {'torch ms':>9} {'torch passes':>12} {'torch/ours':>10}")
        for r in topk:
            t = t_topk.get((r["n"], r["k"]))
            vs = t["time_s"] / r["time_s"] if t else None
            topk_rows.append(dict(r, torch_time_s=t["time_s"] if t else None, torch_over_ours=vs))
            lines.append(f"{r['engine']:>12} 2^{r['n'].bit_length() - 1:<4} {r['k']:>8} {r['time_s'] * 1e3:9.3f} "
                         f"{r.get('wall_s', r['time_s']) * 1e3:8.3f} {r['passes_equivalent']:11.2f} "
                         f"{r.get('cold_passes_equivalent', float('nan')):6.2f} {r.get('input_passes', float('nan')):6.2f} "
                         + (f"{t['time_s'] * 1e3:9.3f} {t['passes_equivalent']:12.2f} {vs:10.2f}"
                            if t else f"{'-':>9} {'-':>12} {'-':>10}"))
        lines.append("")
    if e2e:
        lines.append("e2e (server and load generator processes on loopback; raw = loopback TCP, same run)")
        lines.append(f"{'engine':>18} {'clients':>7} {'params':>6} {'upd/s':>8} {'MB/s in':>8} {'raw MB/s':>9} "
                     f"{'of raw':>7} {'p50 ms':>7} {'busy':>5}  largest stages")
        for r in e2e:
            # The coordinator's stages (src/bench/e2e.rs COORDINATOR_STAGES), not the sessions'.
            coord = {"policy", "wal", "upload", "aggregate", "topk", "encode", "fanout"}
            share = sorted(((k, v) for k, v in r["stage_share"].items() if k in coord), key=lambda kv: -kv[1])[:3]
            raw = r.get("raw_tcp_mb_per_s")
            fr = r.get("fraction_of_raw")
            lines.append(f"{r['engine'].split(' on ')[0]:>18} {r['clients']:>7} 2^{r['params'].bit_length() - 1:<4} "
                         f"{r['updates_per_s']:8.0f} {r['mb_in_per_s']:8.1f} "
                         + (f"{raw:9.0f} {100 * fr:6.1f}%" if raw and fr is not None else f"{'-':>9} {'-':>7}")
                         + f" {r['delta_latency_s']['p50'] * 1e3:7.1f} {100 * r['coordinator_busy']:4.0f}%  "
                         + ", ".join(f"{k} {100 * v:.0f}%" for k, v in share))
        lines.append("")

    ok_status = {"0", "not-installed", "not-requested"}
    failed = [s["step"] for s in steps if s["status"] not in ok_status]
    lines.append("RESULT: " + ("all steps passed" if not failed else "FAILED: " + ", ".join(failed)))
    text = "\n".join(lines) + "\n"
    with open(os.path.join(dest, "summary.txt"), "w") as f:
        f.write(text)
    with open(os.path.join(dest, "check.json"), "w") as f:
        json.dump(dict(adapter=adapter, steps=steps, copy=copies, torch_environment=torch.get("environment"),
                       aggregate=agg_rows, topk=topk_rows, e2e=e2e, failed=failed), f, indent=1)
    print(text)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
