#!/usr/bin/env python3
"""The Python client's round trip beside the C++ client's (`ringattn bench`) on the same request.

For each data path (auto: each client picks unary or stream by size, over --connections;
stream; shm; cuda_shm: --inputs torch-cuda) it runs `ringattn bench --json` and then the same load
from Python: the same shape, dtype, options, layout, request count and concurrency, inputs as
numpy arrays, torch CPU tensors or torch CUDA tensors. It prints, per path, the latency (p50,
mean) of each client, the service's mean total, and each client's time outside the service
(latency minus the service's total): the difference of the last two is what Python costs.

    python3 python/bench/compare_clients.py --ringattn build/cli/ringattn \\
        --target 127.0.0.1:50051 --seqlen 8192 --heads 8 --heads_k 2 --head_dim 128 \\
        --dtype bf16 --causal --requests 32 --concurrency 1 --inputs torch-cuda [--backward]
    # or let it start the service: --serve "--workers 2 --kernel cuda"

Needs grpcio, protobuf, numpy (and torch for torch inputs; ml_dtypes for bf16 numpy) on the
path, e.g. PYTHONPATH=python:.deps/pyclient. Writes --json with every number.
"""
import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import numpy as np  # noqa: E402

import ringattn  # noqa: E402


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ringattn", default="build/cli/ringattn", help="the ringattn binary")
    p.add_argument("--target", default="127.0.0.1:50051")
    p.add_argument("--serve", default=None,
                   help="start `ringattn serve` with these flags on a free port (e.g. "
                        "'--workers 2 --kernel cuda') instead of using --target")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlen", type=int, default=4096)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--heads_k", type=int, default=0)
    p.add_argument("--head_dim", type=int, default=128)
    p.add_argument("--dtype", default="bf16", choices=("fp32", "fp16", "bf16"))
    p.add_argument("--layout", default="auto")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--backward", action="store_true", help="AttendBackward instead of Attend")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--paths", default="auto,stream,shm")
    p.add_argument("--connections", type=int, default=1,
                   help="both clients' connections (requests past 64 MiB go in parts by heads)")
    p.add_argument("--inputs", default="numpy", choices=("numpy", "torch", "torch-cuda"))
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--json", default=None)
    return p.parse_args()


def start_server(binary, flags):
    log = tempfile.NamedTemporaryFile(prefix="compare_clients_", suffix=".log", delete=False)
    proc = subprocess.Popen([binary, "serve", "--listen=127.0.0.1:0", "--metrics=",
                             *shlex.split(flags)], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    port = None
    while time.monotonic() < deadline and proc.poll() is None:
        text = open(log.name, errors="replace").read()
        m = re.search(r"coordinator listening on port (\d+)", text)
        port = int(m.group(1)) if m else None
        if port and "workers ready" in text:
            return proc, f"127.0.0.1:{port}"
        time.sleep(0.2)
    proc.kill()
    sys.exit("the server did not become ready:\n" + open(log.name, errors="replace").read())


def cpp_bench(a, target, path):
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        cmd = [a.ringattn, "bench", f"--target={target}", f"--batch={a.batch}",
               f"--seqlen={a.seqlen}", f"--heads={a.heads}", f"--heads_k={a.heads_k}",
               f"--head_dim={a.head_dim}", f"--dtype={a.dtype}", f"--layout={a.layout}",
               f"--causal={'true' if a.causal else 'false'}",
               f"--backward={'true' if a.backward else 'false'}",
               f"--requests={a.requests}", f"--concurrency={a.concurrency}",
               f"--timeout={a.timeout}", f"--json={f.name}", f"--connections={a.connections}",
               f"--stream={'true' if path == 'stream' else 'false'}",
               f"--shm={'true' if path == 'shm' else 'false'}",
               f"--cuda_shm={'true' if path == 'cuda_shm' else 'false'}"]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            return {"error": (run.stdout + run.stderr).strip()[-2000:]}
        with open(f.name) as j:
            s = json.load(j)
    return {"p50": s["latency_seconds"]["p50"], "mean": s["latency_seconds"]["mean"],
            "server_total": s["server_mean_seconds"]["total"], "ok": s["ok"],
            "failed": s["failed"]}


def make_inputs(a):
    rng = np.random.default_rng(1)
    hk = a.heads_k or a.heads
    shapes = [(a.batch, a.seqlen, a.heads, a.head_dim)] + [(a.batch, a.seqlen, hk, a.head_dim)] * 2
    xs = [rng.standard_normal(s, dtype=np.float32) for s in shapes]
    if a.inputs == "numpy":
        if a.dtype == "fp16":
            return [x.astype(np.float16) for x in xs], None
        if a.dtype == "bf16":
            try:
                import ml_dtypes
                return [x.astype(ml_dtypes.bfloat16) for x in xs], None
            except ImportError:
                return xs, "bf16"  # float32 arrays converted on the way
        return xs, None
    import torch
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[a.dtype]
    device = "cuda" if a.inputs == "torch-cuda" else "cpu"
    return [torch.from_numpy(x).to(device=device, dtype=dt) for x in xs], None


def python_bench(a, target, path):
    client = ringattn.Client(target, timeout=a.timeout, connections=a.connections,
                             shared_memory=path in ("shm", "cuda_shm"))
    (q, k, v), dtype = make_inputs(a)
    opts = dict(causal=a.causal, layout=a.layout, dtype=dtype,
                path=None if path == "auto" else path)
    if a.backward:
        fwd = client.attend(q, k, v, return_lse=True, **opts)
        call = lambda: client.attend_backward(q, k, v, fwd.out, fwd.lse, fwd.out, **opts)  # noqa
    else:
        call = lambda: client.attend(q, k, v, **opts)  # noqa: E731
    records, errors, lock = [], [], threading.Lock()
    per_thread = [a.requests // a.concurrency + (i < a.requests % a.concurrency)
                  for i in range(a.concurrency)]

    def worker(n):
        try:
            call()  # warm-up: GetInfo, the shared-memory region, the connection
        except ringattn.RingAttnError as e:
            with lock:
                errors.append(str(e))
            return
        barrier.wait()
        for _ in range(n):
            t0 = time.perf_counter()
            try:
                r = call()
            except ringattn.RingAttnError as e:
                with lock:
                    errors.append(str(e))
                continue
            latency = time.perf_counter() - t0
            if a.inputs == "torch-cuda":
                import torch
                torch.cuda.synchronize()
            with lock:
                records.append((latency, r.timings.total_seconds, r.input_copy_seconds,
                                r.output_copy_seconds, r.path))
    barrier = threading.Barrier(sum(1 for n in per_thread if n > 0))
    threads = [threading.Thread(target=worker, args=(n,)) for n in per_thread if n > 0]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    client.close()
    if not records:
        return {"error": "; ".join(errors[:3]) or "no call"}
    lat = sorted(r[0] for r in records)
    return {"p50": lat[max(0, int(np.ceil(0.5 * len(lat))) - 1)], "mean": statistics.mean(lat),
            "server_total": statistics.mean(r[1] for r in records),
            "input_copy": statistics.mean(r[2] for r in records),
            "output_copy": statistics.mean(r[3] for r in records),
            "ok": len(records), "failed": len(errors), "path": records[0][4]}


def main():
    a = parse_args()
    proc = None
    target = a.target
    if a.serve is not None:
        proc, target = start_server(a.ringattn, a.serve)
    results = {}
    try:
        for path in a.paths.split(","):
            results[path] = {"cpp": cpp_bench(a, target, path), "python": python_bench(a, target, path)}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(30)
    what = "AttendBackward" if a.backward else "Attend"
    print(f"{what} b{a.batch} s{a.seqlen} h{a.heads} hk{a.heads_k or a.heads} d{a.head_dim} "
          f"{a.dtype} {'causal' if a.causal else 'full'}, {a.requests} calls, concurrency "
          f"{a.concurrency}, Python inputs: {a.inputs}")
    print(f"{'path':7} {'client':7} {'p50 ms':>9} {'mean ms':>9} {'service ms':>11} "
          f"{'outside ms':>11} {'copies ms':>10}")
    for path, r in results.items():
        for name in ("cpp", "python"):
            s = r[name]
            if "error" in s:
                print(f"{path:7} {name:7} error: {s['error']}")
                continue
            copies = s.get("input_copy", 0) + s.get("output_copy", 0)
            print(f"{path:7} {name:7} {s['p50'] * 1e3:9.3f} {s['mean'] * 1e3:9.3f} "
                  f"{s['server_total'] * 1e3:11.3f} {(s['mean'] - s['server_total']) * 1e3:11.3f} "
                  f"{copies * 1e3:10.3f}" + ("" if name == "cpp" else ""))
        if "error" not in r["cpp"] and "error" not in r["python"]:
            extra = (r["python"]["mean"] - r["python"]["server_total"]) - (
                r["cpp"]["mean"] - r["cpp"]["server_total"])
            print(f"{path:7} python outside the service minus C++'s: {extra * 1e3:.3f} ms "
                  f"(python/cpp mean latency {r['python']['mean'] / r['cpp']['mean']:.3f})")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
