#!/usr/bin/env python3
"""Turns the JSON lines of `ringattn_compare` (results.jsonl) into the comparison report.

Writes, next to the results unless --out says otherwise:
  report.md     one table per metric group: correctness (forward, error vs ranks, gradients),
                performance (latency, throughput), memory, the ring's steps, what did not run
  summary.json  the same numbers keyed by case / implementation / world size, plus the checks
  *.png         throughput vs sequence length per implementation, error vs world size
                (needs matplotlib; without it the report says so and the rest is written)

Exits 1 when a tolerance is breached: the seed's (output max abs error < 1e-2, gradient
< 5e-2, bf16 and every other dtype) checked here again from the numbers, and the tool's own
stricter per-dtype checks as recorded in each row; also when an implementation failed or
nothing ran. Exits 2 on unreadable input. Standard library only, besides matplotlib.
"""
import argparse
import collections
import json
import math
import os
import sys

SEED_OUT_MAX_ABS = 1e-2   # SEED.md: output error < 1e-2 (bfloat16)
SEED_GRAD_MAX_ABS = 5e-2  # SEED.md: gradient error < 5e-2


def load(path):
    meta, cases, runs, summary = {}, [], [], {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{number}: not JSON: {e}")
            kind = row.get("type")
            if kind == "meta":
                meta = row
            elif kind == "case":
                cases.append(row)
            elif kind == "run":
                runs.append(row)
            elif kind == "summary":
                summary = row
    return meta, cases, runs, summary


# ---- Formatting ---------------------------------------------------------------------------------

def fmt(x, spec=".3g"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    return format(x, spec)


def fmt_pct(x):
    return "—" if x is None else f"{100 * x:+.1f}%"


def table(headers, rows):
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    for r in rows:
        out.append("| " + " | ".join(str(c) for c in r) + " |")
    return "\n".join(out) + "\n"


def world_str(r):
    return "—" if r.get("world") is None else str(r["world"])


# ---- Checks -------------------------------------------------------------------------------------

def seed_failures(r):
    """The seed's bounds, applied from the numbers (independently of the tool's own check)."""
    out = []
    e = r.get("errors") or {}
    if e.get("against", "none") == "none":
        return out
    if r["pass"] == "fwd" and "out" in e:
        m = e["out"]["max_abs"]
        if m is None or m >= SEED_OUT_MAX_ABS or e["out"].get("nan", 0):
            out.append(f"out max_abs {fmt(m)} >= {SEED_OUT_MAX_ABS} (seed)")
    if r["pass"] == "bwd":
        for g in ("dq", "dk", "dv"):
            if g in e:
                m = e[g]["max_abs"]
                if m is None or m >= SEED_GRAD_MAX_ABS or e[g].get("nan", 0):
                    out.append(f"{g} max_abs {fmt(m)} >= {SEED_GRAD_MAX_ABS} (seed)")
    return out


def row_key(r):
    return f"{r['case']}/{r['impl']}/W{world_str(r)}/{r['pass']}"


# ---- Sections -----------------------------------------------------------------------------------

def section_header(meta, summary, ok, failures):
    lines = ["# ringattn implementation comparison", ""]
    lines.append(f"- case set: `{meta.get('case_set', '?')}`; command: `{meta.get('command', '')}`")
    lines.append(f"- machine: {meta.get('machine', '?')}")
    lines.append(f"- result: **{'PASS' if ok else 'FAIL'}** — {summary.get('runs', 0)} runs, "
                 f"{summary.get('passed', 0)} passed, {summary.get('failed', 0)} failed, "
                 f"{summary.get('unchecked', 0)} unchecked, {summary.get('errors', 0)} errors, "
                 f"{summary.get('not_available', 0)} not available, "
                 f"{summary.get('unsupported', 0)} unsupported")
    lines.append("")
    if failures:
        lines.append("## Failures")
        lines.append("")
        for key, why in failures:
            lines.append(f"- `{key}`: {why}")
        lines.append("")
    return "\n".join(lines) + "\n"


def section_implementations(meta):
    rows = []
    for i in meta.get("implementations", []):
        status = "available" if i["available"] else f"not available: {i['reason']}"
        rows.append([f"`{i['name']}`", i["placement"], "ring" if i["ring"] else "single device",
                     "yes" if i.get("backward") else "no", status, i["description"]])
    return "## Implementations\n\n" + table(
        ["name", "where", "kind", "backward", "status", "what it is"], rows)


def section_method(meta, cases):
    lines = ["## Method", ""]
    lines.append(f"- latency: {meta.get('latency_method', '')}")
    lines.append(f"- FLOPs: {meta.get('flops_method', '')}")
    for m in meta.get("memory_methods", []):
        lines.append(f"- memory, {m}")
    lines.append(f"- errors: against the fp64 CPU reference where the case's forward FLOPs are "
                 f"under {fmt(meta.get('reference_flop_limit'))}, otherwise against the baseline "
                 f"(the first single-device implementation that ran the case)")
    skipped = [c for c in cases if c.get("reference") != "fp64"]
    for c in skipped:
        lines.append(f"  - `{c['case']}`: {c.get('reference_note', 'reference skipped')}")
    seed = meta.get("seed_tolerances", {})
    lines.append(f"- seed tolerances (SEED.md, all dtypes): output max abs error < "
                 f"{fmt(seed.get('out_max_abs', SEED_OUT_MAX_ABS))}, gradients < "
                 f"{fmt(seed.get('grad_max_abs', SEED_GRAD_MAX_ABS))}")
    lines.append("")
    rows = []
    for t in meta.get("tolerances", []):
        rows.append([t["dtype"], fmt(t["out"]["max_abs"]), fmt(t["out"]["rel_l2"]),
                     fmt(t["lse"]["max_abs"]), fmt(t["lse"]["rel_l2"]),
                     fmt(t["grad"]["max_abs"]), fmt(t["grad"]["rel_l2"])])
    lines.append("The tool's own bounds, against fp64 or (when the reference is skipped) the "
                 "baseline:")
    lines.append("")
    lines.append(table(["dtype", "out max abs", "out rel L2", "lse max abs", "lse rel L2",
                        "grad max abs", "grad rel L2"], rows))
    lines.append("")
    lines.append("A gradient's max abs bound is taken times max(1, max |reference|) of that tensor "
                 "(gradients are not of unit scale; rel L2 is scale-free).")
    return "\n".join(lines) + "\n"


def section_correctness(fwd):
    rows = []
    for r in fwd:
        e = r.get("errors", {})
        o, l = e.get("out", {}), e.get("lse", {})
        rows.append([r["case"], f"`{r['impl']}`", world_str(r), r["dtype"],
                     e.get("against", "—"), fmt(o.get("max_abs")), fmt(o.get("mean_abs")),
                     fmt(o.get("rel_l2")), fmt(l.get("max_abs")), fmt(l.get("rel_l2")),
                     r.get("check", "—")])
    return "## Correctness: forward output and LSE\n\n" + table(
        ["case", "implementation", "W", "dtype", "against", "out max abs", "out mean abs",
         "out rel L2", "lse max abs", "lse rel L2", "check"], rows)


def section_error_vs_world(fwd):
    """Output relative L2 error per world size, one row per (case, ring implementation)."""
    worlds = sorted({r["world"] for r in fwd if r.get("ring")})
    groups = collections.OrderedDict()
    for r in fwd:
        if r.get("ring"):
            groups.setdefault((r["case"], r["impl"], r["errors"].get("against")), {})[
                r["world"]] = r["errors"].get("out", {}).get("rel_l2")
    if not groups:
        return ""
    rows = [[c, f"`{i}`", a] + [fmt(g.get(w)) for w in worlds]
            for (c, i, a), g in groups.items()]
    return ("## Correctness: output error vs ring size (relative L2)\n\n"
            "The ring merges fp32 partial results and rounds once, so the error should not grow "
            "with W.\n\n" + table(["case", "implementation", "against"] +
                                  [f"W={w}" for w in worlds], rows))


def section_gradients(bwd, not_run):
    lines = ["## Correctness: gradients", ""]
    if bwd:
        rows = []
        for r in bwd:
            e = r.get("errors", {})
            cells = []
            for g in ("dq", "dk", "dv"):
                cells += [fmt(e.get(g, {}).get("max_abs")), fmt(e.get(g, {}).get("rel_l2"))]
            rows.append([r["case"], f"`{r['impl']}`", world_str(r), r["dtype"],
                         e.get("against", "—")] + cells + [r.get("check", "—")])
        lines.append(table(["case", "implementation", "W", "dtype", "against", "dq max abs",
                            "dq rel L2", "dk max abs", "dk rel L2", "dv max abs", "dv rel L2",
                            "check"], rows))
    missing = grouped_not_run([r for r in not_run if r["pass"] == "bwd"])
    if missing:
        lines.append("Gradients not computed:")
        lines.append("")
        lines.append(table(["implementation", "status", "W", "why", "cases"], missing))
    if not bwd and not missing:
        lines.append("No backward was requested.")
    return "\n".join(lines) + "\n\n"


def grouped_not_run(rows):
    """One table row per (implementation, status, reason): the world sizes and cases it hit."""
    groups = collections.OrderedDict()
    for r in rows:
        key = (r["impl"], r["status"], r.get("message", ""))
        g = groups.setdefault(key, (set(), set()))
        if r.get("world") is not None:
            g[0].add(r["world"])
        g[1].add(r["case"])
    return [[f"`{impl}`", status.replace("_", " "),
             ", ".join(str(w) for w in sorted(worlds)) or "all", why, ", ".join(sorted(cases))]
            for (impl, status, why), (worlds, cases) in groups.items()]


def baselines(rows):
    """The baseline row of each (case, pass)."""
    return {(r["case"], r["pass"]): r for r in rows if r.get("is_baseline")}


def speed_vs_baseline(r, base):
    """The baseline's p50 over this row's, by the same clock: a CUDA-event-timed baseline is
    taken at its host wall time (synchronised, launch included) against a host-timed row."""
    b = base.get((r["case"], r["pass"]))
    p50 = r.get("latency_s", {}).get("p50")
    if not b or not p50:
        return None
    ref = b["latency_s"]["p50"]
    if b.get("timer") != r.get("timer") and b.get("wall_p50_s"):
        ref = b["wall_p50_s"]
    return ref / p50


def first_rings(rows):
    """The first ring that ran each (case, pass, W): the reference ring the others are held
    against (the seed compares its DSL ring with the native one; in the gpu preset this is
    ring_cudnn, the ring with the vendor kernel)."""
    first = {}
    for r in rows:
        if r.get("ring"):
            first.setdefault((r["case"], r["pass"], r["world"]), r)
    return first


def speed_vs_ring(r, rings):
    ref = rings.get((r["case"], r["pass"], r.get("world")))
    if not r.get("ring") or ref is None or ref is r:
        return None
    return ref["latency_s"]["p50"] / r["latency_s"]["p50"], ref["impl"]


def ratio_str(x):
    return "—" if x is None else f"{x[0]:.2f}x ({x[1]})"


def section_performance(fwd, bwd):
    base = baselines(fwd + bwd)
    rings = first_rings(fwd + bwd)
    rows = []
    for r in fwd + bwd:
        lat = r.get("latency_s", {})
        speed = speed_vs_baseline(r, base)
        vs_ring = speed_vs_ring(r, rings)
        rows.append([r["case"], f"`{r['impl']}`", r["pass"], world_str(r),
                     fmt(lat.get("p50", 0) * 1e3, ".3f"), fmt(lat.get("p99", 0) * 1e3, ".3f"),
                     fmt(r.get("wall_p50_s", lat.get("p50", 0)) * 1e3, ".3f"),
                     fmt(r.get("tflops"), ".3f"), per_gpu_tflops(r),
                     fmt(r.get("tokens_per_s"), ".4g"),
                     "—" if speed is None else f"{speed:.2f}x", ratio_str(vs_ring),
                     r.get("timer", "")])
    return "## Performance: latency and throughput\n\n" + (
        "`vs baseline` is the baseline's p50 over this p50 (above 1: faster), by the same clock: "
        "against a host-timed ring a CUDA-event-timed baseline counts at its wall p50. "
        "`wall p50` is host time around the call, synchronised (a CPU ring's includes its "
        "scatter and gather of the whole sequence). `vs first ring` holds a ring against the "
        "first ring that ran at the same W (the seed's DSL-vs-native ratio). `TFLOP/s per GPU` "
        "divides by the GPUs the run occupied: W for a ring with a GPU per rank (ring_nccl_*), "
        "1 for one GPU (in-process rings included).\n\n") + table(
        ["case", "implementation", "pass", "W", "p50 ms", "p99 ms", "wall p50 ms", "TFLOP/s",
         "TFLOP/s per GPU", "tokens/s", "vs baseline", "vs first ring", "timer"], rows)


def section_scaling(fwd, bwd):
    """Rings with a GPU per rank against the single-GPU call of the same kernel on the whole
    sequence: per-GPU throughput ratio = t_single / (W * t_ring), forward, backward and the two
    together (the issue's scaling figure; the reference Python ring keeps 0.85 forward, 0.90
    fwd+bwd)."""
    rows_all = fwd + bwd
    single = {}
    for r in rows_all:
        if not r.get("ring"):
            single[(r["case"], r["pass"], r["impl"])] = r
    rows = []
    seen = set()
    for r in rows_all:
        if not r.get("ring") or (r.get("gpus") or 0) < 2 or not r["impl"].startswith("ring_nccl_"):
            continue
        key = (r["case"], r["impl"], r["world"])
        if key in seen:
            continue
        seen.add(key)
        peer = "single_" + r["impl"][len("ring_nccl_"):]
        w = r["world"]

        def p50(row):
            return row.get("latency_s", {}).get("p50") if row else None

        ring_f = next((x for x in fwd if (x["case"], x["impl"], x["world"]) == key), None)
        ring_b = next((x for x in bwd if (x["case"], x["impl"], x["world"]) == key), None)
        sf, sb = single.get((r["case"], "fwd", peer)), single.get((r["case"], "bwd", peer))
        ratios = []
        for ring_row, single_row in ((ring_f, sf), (ring_b, sb)):
            t_r, t_s = p50(ring_row), p50(single_row)
            ratios.append(t_s / (w * t_r) if t_r and t_s else None)
        both = None
        if all(p50(x) for x in (ring_f, ring_b, sf, sb)):
            both = (p50(sf) + p50(sb)) / (w * (p50(ring_f) + p50(ring_b)))
        rows.append([r["case"], f"`{r['impl']}`", str(w), f"`{peer}`"] +
                    ["—" if x is None else f"{x:.2f}" for x in ratios + [both]])
    if not rows:
        return ""
    return "## Scaling: per-GPU throughput against one GPU\n\n" + (
        "For each ring with a GPU per rank, t_single / (W × t_ring): the single-GPU call of the "
        "same kernel on the whole sequence (p50 by CUDA events) against the ring (p50 by the host "
        "around every rank's call, so launch and thread hand-off count against the ring). 1.0 is "
        "perfect scaling; the reference Python ring keeps 0.85 forward and 0.90 fwd+bwd.\n\n") + table(
        ["case", "ring", "W", "against", "fwd", "bwd", "fwd+bwd"], rows)


def per_gpu_tflops(r):
    """Throughput over the GPUs the run occupied; none for a host run."""
    if not r.get("gpus"):
        return "—"
    return fmt(r.get("tflops_per_gpu"), ".3f")


def peak_mib(r):
    peak = r.get("memory", {}).get("peak_bytes")
    return None if peak is None or peak < 0 else peak / 2**20


def per_rank_mib(r):
    """A ring over several GPUs: its largest GPU's figure; otherwise the peak over W (in-process
    ranks share one process and GPU)."""
    per_gpu = r.get("memory", {}).get("per_gpu_bytes")
    if per_gpu:
        return max(per_gpu) / 2**20
    peak = peak_mib(r)
    return None if peak is None else peak / (r.get("world") or 1)


def section_memory(fwd, bwd):
    rings = first_rings(fwd + bwd)
    rows = []
    for r in fwd + bwd:
        m = r.get("memory", {})
        peak = peak_mib(r)
        per_rank = per_rank_mib(r)
        ref = rings.get((r["case"], r["pass"], r.get("world")))
        vs_ring = None
        if r.get("ring") and ref is not None and ref is not r and peak and peak_mib(ref):
            vs_ring = f"{fmt_pct(peak / peak_mib(ref) - 1)} ({ref['impl']})"
        rows.append([r["case"], f"`{r['impl']}`", r["pass"], world_str(r), m.get("space", ""),
                     fmt(peak, ".2f"), fmt(per_rank, ".2f"),
                     fmt_pct(m.get("overhead_vs_baseline")), vs_ring or "—"])
    return "## Memory: peak\n\n" + (
        "All ranks of an in-process ring share this process (and GPU), so `peak` is their sum "
        "and `per rank` that sum over W; for a ring with a GPU per rank (ring_nccl_*) `peak` is "
        "the sum over its GPUs and `per rank` the largest GPU's. Overhead is against the baseline in the same memory space, and for a "
        "ring against the first ring at the same W (the seed's < 20% target); see Method for "
        "what is counted.\n\n") + table(
        ["case", "implementation", "pass", "W", "space", "peak MiB", "per rank MiB",
         "overhead vs baseline", "overhead vs first ring"], rows)


def section_ring(rows_in):
    rows = []
    for r in rows_in:
        rs = r.get("ring_steps")
        if not rs or r.get("world", 1) < 2:
            continue
        steps = " · ".join(f"{s['compute_mean_s'] * 1e3:.2f}/{s['comm_wait_mean_s'] * 1e3:.2f}"
                           for s in rs["steps"])
        rows.append([r["case"], f"`{r['impl']}`", r["pass"], r["world"],
                     fmt(rs["compute_s"] * 1e3, ".3f"), fmt(rs["comm_wait_s"] * 1e3, ".3f"),
                     fmt(100 * rs["hidden_share"], ".1f") + "%", steps])
    if not rows:
        return ""
    return "## Ring: compute, communication wait, hidden share\n\n" + (
        "Per timed call, summed over ranks and steps; hidden share = 1 - sum(comm wait) / "
        "sum(step time). The last column is each step's mean compute / comm wait in ms "
        "(mean over ranks and calls).\n\n") + table(
        ["case", "implementation", "pass", "W", "compute ms", "comm wait ms", "hidden",
         "steps (ms)"],
        rows)


def section_not_run(not_run, errors):
    """Forward runs that did not happen (the gradients section lists the backward's) and every
    error."""
    lines = grouped_not_run([r for r in not_run if r["pass"] == "fwd"])
    for r in errors:
        lines.append([f"`{r['impl']}`", f"error ({r['pass']})", world_str(r),
                      r.get("message", ""), r["case"]])
    if not lines:
        return ""
    return "## Not run\n\n" + table(["implementation", "status", "W", "why", "cases"], lines)


# ---- Plots --------------------------------------------------------------------------------------

def shape_without_seqlen(r):
    return (r["batch"], r["heads"], r["heads_k"], r["head_dim"], r["dtype"], r["causal"],
            tuple(r["window"]), r["softcap"], r["alibi"])


def plot_throughput(fwd, out_dir, plt):
    """One figure per shape that appears at several sequence lengths."""
    files = []
    by_shape = collections.defaultdict(list)
    for r in fwd:
        by_shape[shape_without_seqlen(r)].append(r)
    for shape, rows in by_shape.items():
        if len({r["seqlen"] for r in rows}) < 2:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines = collections.defaultdict(list)
        for r in rows:
            lines[(r["impl"], r["world"])].append((r["seqlen"], r["tflops"]))
        for (impl, world), pts in sorted(lines.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=f"{impl} W={world}")
        b, h, hk, d, dt, causal = shape[:6]
        title = f"b{b} h{h}/{hk} d{d} {dt}{' causal' if causal else ''}"
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length")
        ax.set_ylabel("TFLOP/s")
        ax.set_title(f"Throughput vs sequence length: {title}")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        name = f"throughput_{'_'.join(str(x) for x in shape[:6])}.png".replace(" ", "")
        fig.tight_layout()
        fig.savefig(os.path.join(out_dir, name), dpi=120)
        plt.close(fig)
        files.append(name)
    return files


def plot_error_vs_world(fwd, out_dir, plt):
    """Ring output error against fp64 by world size (against the baseline when no case had the
    fp64 reference; a W=1 ring matching the baseline exactly is then left out of the log plot)."""
    rings = [r for r in fwd if r.get("ring") and r["errors"].get("out")]
    rows = [r for r in rings if r["errors"].get("against") == "fp64_reference"]
    against = "fp64 reference"
    if not rows:
        rows = [r for r in rings if r["errors"]["out"]["rel_l2"]]
        against = "baseline"
    if not rows:
        return []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lines = collections.defaultdict(list)
    for r in rows:
        lines[(r["case"], r["impl"])].append((r["world"], r["errors"]["out"]["rel_l2"]))
    for (case, impl), pts in sorted(lines.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{impl}: {case}")
    ax.set_yscale("log")
    ax.set_xticks(sorted({r["world"] for r in rows}))
    ax.set_xlabel("world size W (ranks)")
    ax.set_ylabel("output relative L2 error")
    ax.set_title(f"Output error vs ring size (against the {against})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    name = "error_vs_world.png"
    fig.savefig(os.path.join(out_dir, name), dpi=120)
    plt.close(fig)
    return [name]


# ---- Summary JSON -------------------------------------------------------------------------------

def summary_json(meta, cases, runs, summary, ok, failures, plots):
    results = {}
    for r in runs:
        entry = {"status": r["status"], "check": r.get("check")}
        if r["status"] == "ok":
            e = r.get("errors", {})
            entry.update({
                "against": e.get("against"),
                "errors": {k: e[k] for k in ("out", "lse", "dq", "dk", "dv") if k in e},
                "latency_p50_s": r["latency_s"]["p50"], "latency_p99_s": r["latency_s"]["p99"],
                "tflops": r.get("tflops"), "tokens_per_s": r.get("tokens_per_s"),
                "gpus": r.get("gpus"), "tflops_per_gpu": r.get("tflops_per_gpu"),
                "peak_bytes": r.get("memory", {}).get("peak_bytes"),
                "per_gpu_bytes": r.get("memory", {}).get("per_gpu_bytes"),
                "memory_overhead_vs_baseline": r.get("memory", {}).get("overhead_vs_baseline"),
            })
            if r.get("ring_steps"):
                entry["hidden_share"] = r["ring_steps"]["hidden_share"]
        else:
            entry["message"] = r.get("message")
        results[row_key(r)] = entry
    return {"ok": ok, "case_set": meta.get("case_set"), "machine": meta.get("machine"),
            "summary": summary, "failures": [{"run": k, "why": w} for k, w in failures],
            "cases": cases, "results": results, "plots": plots}


# ---- Main ---------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", help="results.jsonl, or the directory holding it")
    ap.add_argument("--out", default="", help="output directory (default: beside the results)")
    ap.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    args = ap.parse_args()
    path = args.results
    if os.path.isdir(path):
        path = os.path.join(path, "results.jsonl")
    if not os.path.exists(path):
        print(f"report.py: no results at {path}", file=sys.stderr)
        return 2
    out_dir = args.out or os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    meta, cases, runs, summary = load(path)

    ok_rows = [r for r in runs if r["status"] == "ok"]
    fwd = [r for r in ok_rows if r["pass"] == "fwd"]
    bwd = [r for r in ok_rows if r["pass"] == "bwd"]
    not_run = [r for r in runs if r["status"] in ("not_available", "unsupported")]
    errors = [r for r in runs if r["status"] == "error"]

    failures = []
    for r in ok_rows:
        for why in r.get("failures", []):
            failures.append((row_key(r), why))
        for why in seed_failures(r):
            if not any(k == row_key(r) and "seed" in w for k, w in failures):
                failures.append((row_key(r), why))
    for r in errors:
        failures.append((row_key(r), f"error: {r.get('message', '')}"))
    ok = bool(ok_rows) and not failures and bool(summary) and summary.get("ok", False)
    if not summary:
        failures.append(("results", "no summary line: the run did not finish"))

    plots, plot_note = [], ""
    if args.no_plots:
        plot_note = "Plots skipped (--no-plots)."
    else:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
            plots = plot_throughput(fwd, out_dir, plt) + plot_error_vs_world(fwd, out_dir, plt)
        except ImportError:
            plot_note = ("Plots need matplotlib (`python3 -m pip install matplotlib numpy`); "
                         "this report was written without them.")

    md = [section_header(meta, summary, ok, failures), section_implementations(meta),
          section_method(meta, cases), section_correctness(fwd), section_error_vs_world(fwd),
          section_gradients(bwd, not_run), section_performance(fwd, bwd),
          section_scaling(fwd, bwd),
          section_memory(fwd, bwd), section_ring(fwd + bwd), section_not_run(not_run, errors)]
    md.append("## Plots\n\n" + (plot_note + "\n" if plot_note else "") +
              "".join(f"![{p}]({p})\n" for p in plots))
    with open(os.path.join(out_dir, "report.md"), "w") as f:
        f.write("\n".join(s for s in md if s))
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary_json(meta, cases, runs, summary, ok, failures, plots), f, indent=1)
    print(f"report: {os.path.join(out_dir, 'report.md')} ({'PASS' if ok else 'FAIL'}, "
          f"{len(failures)} failures, {len(plots)} plots)")
    for key, why in failures:
        print(f"  FAIL {key}: {why}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
