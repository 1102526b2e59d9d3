"""Host against device time of the engine's decoding steps, from a Chrome trace of ``bench/profile_gpu.py --trace``
(issue #29). For each ``mecpe.decode.forward`` range: its host wall time, the part of it inside PyTorch operators
(the rest is Python between them), the operators and kernels it issued, and on the GPU side the kernels' busy time
within the step's GPU range. A step whose host time is several times its kernel time is bound by issuing work, not
by doing it. Prints a table; ``--json`` writes the rows.

    python bench/trace_steps.py bench/results/2026-12-06-decode-h100/trace-bs256.json.gz
"""

from __future__ import annotations

import argparse
import bisect
import gzip
import json
import statistics
from collections import Counter

RANGE = "mecpe.decode.forward"


def _union(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for s, t in sorted(intervals):
        s = max(s, end)
        if t > s:
            total += t - s
            end = t
    return total


def steps(events: list[dict]) -> list[dict]:
    host = sorted((e for e in events if e.get("name") == RANGE and e.get("ph") == "X"
                   and e.get("cat") == "user_annotation"), key=lambda e: e["ts"])
    dev = sorted((e for e in events if e.get("name") == RANGE and e.get("ph") == "X"
                  and e.get("cat") == "gpu_user_annotation"), key=lambda e: e["ts"])
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("cpu_op", "cuda_runtime")),
                 key=lambda e: e["ts"])
    kernels = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"), key=lambda e: e["ts"])
    op_ts, k_ts = [e["ts"] for e in ops], [e["ts"] for e in kernels]
    rows = []
    for k, h in enumerate(host):
        t0, t1 = h["ts"], h["ts"] + h["dur"]
        inside = [e for e in ops[bisect.bisect_left(op_ts, t0):bisect.bisect_right(op_ts, t1)]
                  if e["tid"] == h["tid"] and e["ts"] + e["dur"] <= t1]
        row = {"step": k, "host_ms": h["dur"] / 1e3,
               "in_ops_ms": _union([(e["ts"], e["ts"] + e["dur"]) for e in inside]) / 1e3,
               "ops": sum(e["cat"] == "cpu_op" for e in inside),
               "launches": sum(e["cat"] == "cuda_runtime" and "Launch" in e["name"] for e in inside)}
        if k < len(dev):
            g0, g1 = dev[k]["ts"], dev[k]["ts"] + dev[k]["dur"]
            ks = [e for e in kernels[bisect.bisect_left(k_ts, g0):bisect.bisect_right(k_ts, g1)]
                  if e["ts"] + e["dur"] <= g1]
            top = Counter()
            for e in ks:
                top[e["name"][:50]] += e["dur"]
            row.update(gpu_range_ms=dev[k]["dur"] / 1e3, kernels=len(ks), kernel_ms=sum(e["dur"] for e in ks) / 1e3,
                       top_kernel=top.most_common(1)[0][0] if top else "", top_kernel_ms=top.most_common(1)[0][1] / 1e3
                       if top else 0.0)
        rows.append(row)
    return rows


def decode_events(events: list[dict]) -> list[dict]:
    """The events ``steps`` reads: the decoding ranges, and the operators and runtime calls inside their host side
    and the kernels inside their GPU side (a full trace is ~3x larger)."""
    keep_keys = ("ph", "cat", "name", "ts", "dur", "tid", "pid")
    spans = {c: sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == RANGE and e.get("ph") == "X"
                       and e.get("cat") == c) for c in ("user_annotation", "gpu_user_annotation")}

    def within(e, wins):
        k = bisect.bisect_right(wins, (e["ts"], float("inf"))) - 1
        return k >= 0 and e["ts"] + e.get("dur", 0) <= wins[k][1]

    out = []
    for e in events:
        if e.get("ph") != "X":
            continue
        cat = e.get("cat")
        if (e.get("name") == RANGE or (cat in ("cpu_op", "cuda_runtime") and within(e, spans["user_annotation"]))
                or (cat == "kernel" and within(e, spans["gpu_user_annotation"]))):
            out.append({k: e[k] for k in keep_keys if k in e})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("trace")
    ap.add_argument("--json", default=None)
    ap.add_argument("--decode-only", default=None, help="write the trace's decoding steps alone (.json.gz): their "
                    "ranges and the operators, runtime calls and kernels inside them, fields this script reads")
    args = ap.parse_args(argv)
    opener = gzip.open if args.trace.endswith(".gz") else open
    with opener(args.trace, "rt") as fh:
        data = json.load(fh)
    events = data["traceEvents"] if isinstance(data, dict) else data
    if args.decode_only:
        with gzip.open(args.decode_only, "wt") as fh:
            json.dump({"traceEvents": decode_events(events)}, fh)
    rows = steps(events)
    if not rows:
        raise SystemExit(f"{args.trace}: no {RANGE} ranges (a trace of a batch with a cause stage is needed)")
    print(f"{'step':>4} {'host ms':>8} {'in ops':>7} {'ops':>6} {'launch':>6} {'GPU rng':>8} {'kernels':>7} "
          f"{'busy ms':>8}  top kernel (ms)")
    for r in rows:
        print(f"{r['step']:>4} {r['host_ms']:>8.1f} {r['in_ops_ms']:>7.1f} {r['ops']:>6} {r['launches']:>6} "
              f"{r.get('gpu_range_ms', 0):>8.1f} {r.get('kernels', 0):>7} {r.get('kernel_ms', 0):>8.1f}  "
              f"{r.get('top_kernel', '')} ({r.get('top_kernel_ms', 0):.1f})")
    med = {k: statistics.median(r.get(k, 0) for r in rows) for k in ("host_ms", "in_ops_ms", "kernel_ms")}
    print(f"median per step: host {med['host_ms']:.1f} ms (in operators {med['in_ops_ms']:.1f}, Python between "
          f"them {med['host_ms'] - med['in_ops_ms']:.1f}), GPU kernels {med['kernel_ms']:.1f} ms: host / kernels "
          f"{med['host_ms'] / med['kernel_ms']:.1f}x (times under the profiler, which slows the host)")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"trace": args.trace, "median": med, "steps": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
