#!/usr/bin/env python3
"""Per-GPU scaling of the service's ring from `ringattn attend` logs (scripts/multi_gpu_run.sh).

Usage: scaling_summary.py LOG_DIR W [SINGLE_GPU_JSONL]

Reads, for each tokens-per-GPU size P found:
  single_fwd_P.log / single_bwd_P.log   one worker on one GPU, sequence P (the reference);
  scaling_P.log / backward_P.log        W workers on W GPUs, sequence W * P.
Each log holds several requests; a backward log holds, per request, the forward's table and
then, after "gradients in", the backward's. Per request the time that counts is the ring time
(ring_ms, the worker's whole ring call) of the rank that waited least for its peers (the other
may have started before the last shard arrived); the first request of each log is a warm-up and
the median of the rest is kept. Causal attention costs W^2 as much over W * P tokens as over P,
spread over W GPUs, so per-GPU throughput / single-GPU throughput = W * t_single / t_ring.
The same ratio from device time (device_ms: the ring's GPU time, without host overhead) shows
how much of the gap the host leaves. With SINGLE_GPU_JSONL (gpu_ring_bench --json on the same
card), the forward ratio is also given against the bare kernel call on P tokens ("vs kernel":
W * t_kernel / t_ring), which has no service or ring overhead at all.
"""
import json
import os
import re
import statistics
import sys

# rank rows backend compute_ms comm_wait_ms ring_ms [device_ms [launch_ms]]
# ("-" for device and launch on CPU workers).
ROW = re.compile(r"^\s+(\d+)\s+(\d+)\s+(\S+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)"
                 r"(?:\s+([\d.]+|-))?(?:\s+([\d.]+|-))?\s*$")


def blocks(path, backward):
    """Per request: (ring_ms, device_ms) of the rank that waited least."""
    if not os.path.exists(path):
        return []
    out = []
    rows = []
    in_backward = False
    collecting = False

    def flush():
        if collecting and rows:
            best = min(rows, key=lambda r: r[1])  # least comm wait
            out.append((best[2], best[3]))

    for line in open(path, errors="replace"):
        if line.startswith("request id"):
            flush()
            rows = []
            collecting = in_backward == backward
            in_backward = False
            continue
        if line.startswith("gradients in"):
            in_backward = True
            continue
        m = ROW.match(line)
        if m and collecting:
            device = float(m.group(7)) if m.group(7) not in (None, "-") else 0.0
            rows.append((int(m.group(1)), float(m.group(5)), float(m.group(6)), device))
    flush()
    return out


def median_after_warmup(values):
    kept = values[1:] if len(values) > 1 else values
    return statistics.median(kept) if kept else None


def main():
    log_dir, world = sys.argv[1], int(sys.argv[2])
    kernel_ms = {}
    if len(sys.argv) > 3 and os.path.exists(sys.argv[3]):
        for line in open(sys.argv[3]):
            row = json.loads(line)
            if row.get("impl") == "single":
                kernel_ms[int(row["seqlen"])] = float(row["wall_ms"])
    sizes = sorted({int(m.group(1)) for f in os.listdir(log_dir)
                    for m in [re.match(r"(?:scaling|backward)_(\d+)\.log$", f)] if m})
    print(f"W = {world}; per-GPU throughput / single-GPU throughput = W * t_single / t_ring")
    print(f"{'pass':8} {'tokens/GPU':>10} {'single ms':>10} {'ring ms':>9} {'ratio':>6} "
          f"{'single dev':>10} {'ring dev':>9} {'dev ratio':>9} {'requests':>8} {'vs kernel':>9}")
    for kind, prefix, single_prefix, backward in (
            ("forward", "scaling", "single_fwd", False),
            ("backward", "backward", "single_bwd", True)):
        for p in sizes:
            ring = blocks(os.path.join(log_dir, f"{prefix}_{p}.log"), backward)
            single = blocks(os.path.join(log_dir, f"{single_prefix}_{p}.log"), backward)
            if not ring or not single:
                continue
            r_ms = median_after_warmup([r for r, _ in ring])
            r_dev = median_after_warmup([d for _, d in ring])
            s_ms = median_after_warmup([r for r, _ in single])
            s_dev = median_after_warmup([d for _, d in single])
            ratio = world * s_ms / r_ms
            dev_ratio = world * s_dev / r_dev if r_dev and s_dev else float("nan")
            vs_kernel = "-"
            if not backward and p in kernel_ms:
                vs_kernel = f"{world * kernel_ms[p] / r_ms:.3f}"
            print(f"{kind:8} {p:>10} {s_ms:>10.3f} {r_ms:>9.3f} {ratio:>6.3f} {s_dev:>10.3f} "
                  f"{r_dev:>9.3f} {dev_ratio:>9.3f} {len(ring):>8} {vs_kernel:>9}")


if __name__ == "__main__":
    main()
