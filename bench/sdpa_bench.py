#!/usr/bin/env python3
"""PyTorch SDPA (flash and cuDNN backends) at the reference shapes (docs/performance.md): the external reference that
ringattn's GPU kernels are quoted against. Run on the same card in the same job as ours.

Prints one table row per (shape, backend) and writes JSON lines with --json PATH.
FLOPs: 4*b*h*s*s*d, halved for causal (as the published FlashAttention figures do); fwd+bwd counted as 3.5x forward.
"""
import argparse
import json
import sys

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [  # b, s, h, d, causal
    (1, 8192, 32, 128, False), (1, 8192, 32, 128, True),
    (1, 32768, 32, 128, False), (1, 32768, 32, 128, True),
    (1, 16384, 16, 64, False), (1, 16384, 16, 64, True),
    (4, 4096, 32, 128, False), (4, 4096, 32, 128, True),
]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}


def median_ms(fn, warmup=3, iters=20):
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
        end.synchronize()
        times.append(start.elapsed_time(end))
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="")
    ap.add_argument("--backward", action="store_true", help="also time fwd+bwd")
    args = ap.parse_args()
    dev = torch.cuda.get_device_name()
    print(f"device: {dev}  torch {torch.__version__}")
    rows = []
    for b, s, h, d, causal in SHAPES:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4.0 * b * h * s * s * d * (0.5 if causal else 1.0)
        for name, backend in BACKENDS.items():
            row = {"device": dev, "impl": f"sdpa_{name}", "b": b, "s": s, "h": h, "d": d,
                   "causal": causal}
            try:
                with sdpa_kernel(backend):
                    ms = median_ms(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=causal))
                    row["fwd_ms"] = ms
                    row["fwd_tflops"] = flops / ms * 1e-9
                    if args.backward:
                        qg, kg, vg = (t.detach().requires_grad_() for t in (q, k, v))
                        do = torch.randn_like(q)

                        def fwd_bwd():
                            o = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)
                            o.backward(do)
                        ms2 = median_ms(fwd_bwd, iters=10)
                        row["fwdbwd_ms"] = ms2
                        row["fwdbwd_tflops"] = 3.5 * flops / ms2 * 1e-9
            except RuntimeError as e:  # backend not available for this shape
                row["error"] = str(e).splitlines()[0]
            rows.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
    print(f"\n{'b':>2} {'s':>6} {'h':>3} {'d':>4} {'causal':>6} {'impl':>12} {'fwd TFLOP/s':>12}"
          f" {'f+b TFLOP/s':>12}")
    for r in rows:
        print(f"{r['b']:>2} {r['s']:>6} {r['h']:>3} {r['d']:>4} {str(r['causal']):>6} "
              f"{r['impl']:>12} {r.get('fwd_tflops', float('nan')):>12.1f}"
              f" {r.get('fwdbwd_tflops', float('nan')):>12.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
