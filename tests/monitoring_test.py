#!/usr/bin/env python3
"""The metrics, the alerts and the dashboard against a running service.

    monitoring_test.py PATH/TO/ringattn SOURCE_DIR

Starts `ringattn coordinator --workers=2` and the node-level worker group exactly as the
Kubernetes pods do (deploy/k8s/base/ringattn-node.sh: two CPU workers, each with its /metrics),
sends one Attend and one AttendBackward, and checks what the endpoints serve: the families and
their labels, values against independent counts (FLOPs by the formula, ring bytes by the hops a
2-rank ring makes), `promtool check metrics` on every scrape, `promtool check rules`/`test rules`
on deploy/monitoring/alerts.yml, every metric the dashboard and the alerts name present in the
scrapes, and, where the `prometheus` server is installed, every dashboard and alert expression
evaluated by it against these endpoints. Then the group's supervision: one worker killed ends
the group (the other stopped, exit 1), the group started again re-forms the ring (re-forms 1),
SIGTERM stops it cleanly (exit 0).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request

import yaml

BIN, SRC = sys.argv[1], sys.argv[2]
MON = os.path.join(SRC, "deploy", "monitoring")
NODE_SCRIPT = os.path.join(SRC, "deploy", "k8s", "base", "ringattn-node.sh")
SEQ, HEADS, HEADS_K, HEAD_DIM, WORLD = 256, 4, 2, 64, 2
# Families only a GPU worker serves (CPU workers here); they must be declared in the source.
GPU_ONLY = {"ringattn_worker_gpu_memory_used_bytes", "ringattn_worker_gpu_memory_total_bytes"}

failures = []
procs = []
tmp = tempfile.mkdtemp(prefix="monitoring_test.")


def check(cond, what):
    if not cond:
        failures.append(what)
        print("FAIL: " + what, file=sys.stderr)


def free_ports(n):
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def start(args, log, env=None):
    p = subprocess.Popen(args, stdout=open(os.path.join(tmp, log), "w"), stderr=subprocess.STDOUT,
                         env=env, start_new_session=True)
    procs.append(p)
    return p


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return r.read().decode()


SAMPLE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text):
    """{family: type}, [(name, {labels}, value)]"""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            m = SAMPLE.match(line)
            if m:
                samples.append((m.group(1), dict(LABEL.findall(m.group(2) or "")),
                                float(m.group(3).replace("Nan", "nan"))))
    return types, samples


def value(samples, name, **labels):
    """The one sample of `name` whose labels include `labels`; None when absent."""
    got = [v for n, l, v in samples if n == name and all(l.get(k) == w for k, w in labels.items())]
    return got[0] if len(got) == 1 else None


def wait_for(pred, seconds, what):
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            if pred():
                return True
        except OSError:
            pass
        time.sleep(0.2)
    check(False, f"timed out after {seconds} s waiting for {what}")
    return False


def promtool(*args, stdin=None):
    r = subprocess.run(["promtool", *args], input=stdin, capture_output=True, text=True, cwd=MON,
                       timeout=120)
    return r.returncode, r.stdout + r.stderr


def metric_names(expr):
    """The metric names an expression reads (histogram series to their family)."""
    names = set(re.findall(r"\b(ringattn_[a-z0-9_]+)", expr))
    return {re.sub(r"_(bucket|sum|count)$", "", n) if n.endswith(("_bucket", "_sum", "_count"))
            and not n.endswith("_total") else n for n in names}


def project_version():
    text = open(os.path.join(SRC, "CMakeLists.txt")).read()
    return re.search(r"project\(ringattn VERSION ([0-9.]+)", text).group(1)


def node_group(coordinator_internal, worker_port, metrics_port):
    env = dict(os.environ, RINGATTN_WORKERS_PER_NODE=str(WORLD),
               RINGATTN_COORDINATOR=coordinator_internal, RINGATTN_KERNEL="cpu",
               RINGATTN_LISTEN_HOST="127.0.0.1", POD_IP="127.0.0.1",
               RINGATTN_WORKER_PORT=str(worker_port), RINGATTN_METRICS_PORT=str(metrics_port),
               RINGATTN_BIN=BIN)
    return start(["bash", NODE_SCRIPT], "node.log", env)


def children(pid):
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def main():
    version = project_version()
    public, internal, cmetrics, wport, wmetrics, _ = free_ports(6)
    wmetrics = [wmetrics, wmetrics + 1]
    os.environ["RINGATTN_CLUSTER_SECRET"] = "monitoring-test-secret-0123456789"
    coordinator = start([BIN, "coordinator", f"--workers={WORLD}", f"--listen=127.0.0.1:{public}",
                         f"--internal_listen=127.0.0.1:{internal}",
                         f"--metrics=127.0.0.1:{cmetrics}", "--drain_seconds=1"],
                        "coordinator.log")
    group = node_group(f"127.0.0.1:{internal}", wport, wmetrics[0])

    def ready():
        return value(parse(scrape(cmetrics))[1], "ringattn_ring_ready") == 1
    if not wait_for(ready, 60, "the ring to form"):
        return
    _, s = parse(scrape(cmetrics))
    check(value(s, "ringattn_ring_formations_total") == 1, "one ring formed after a clean start")
    check(value(s, "ringattn_ring_reforms_total") == 0, "no re-form after a clean start")

    # One Attend and one AttendBackward (attend --backward sends both), checked against fp64.
    attend = subprocess.run([BIN, "attend", f"--target=127.0.0.1:{public}", f"--seqlen={SEQ}",
                             f"--heads={HEADS}", f"--heads_k={HEADS_K}", f"--head_dim={HEAD_DIM}",
                             "--dtype=fp32", "--backward", "--timeout=120"],
                            capture_output=True, text=True, timeout=180)
    check(attend.returncode == 0, "attend --backward succeeds:\n" + attend.stdout + attend.stderr)

    texts = {"coordinator": scrape(cmetrics)}
    for i, port in enumerate(wmetrics):
        texts[f"worker{i}"] = scrape(port)
    families, all_samples = {}, {}
    for who, text in texts.items():
        rc, out = promtool("check", "metrics", stdin=text)
        check(rc == 0, f"promtool check metrics on the {who}'s scrape:\n{out}")
        types, samples = parse(text)
        families.update(types)
        all_samples[who] = samples

    # The coordinator's families and labels.
    s = all_samples["coordinator"]
    flops = 4.0 * 1 * HEADS * SEQ * SEQ * HEAD_DIM  # dense, batch 1
    for rpc, multiple in (("Attend", 1.0), ("AttendBackward", 2.5)):
        check(value(s, "ringattn_requests_total", rpc=rpc, code="OK") == 1, f"one OK {rpc}")
        check(value(s, "ringattn_tokens_total", rpc=rpc) == SEQ, f"{rpc}: {SEQ} tokens")
        check(value(s, "ringattn_flops_total", rpc=rpc) == multiple * flops, f"{rpc}: FLOPs")
        for phase in ("queue", "compute", "comm_wait", "ring", "workers", "total"):
            check(value(s, "ringattn_request_phase_seconds_count", rpc=rpc, phase=phase) == 1,
                  f"{rpc}: one {phase} observation under its own rpc label")
    for rpc in ("AttendStream", "AttendBackwardStream"):
        check(value(s, "ringattn_tokens_total", rpc=rpc) == 0, f"{rpc}: no tokens")
    check(families.get("ringattn_request_phase_seconds") == "histogram", "phase histogram")
    for name, want in (("ringattn_world_size", WORLD), ("ringattn_workers_up", WORLD),
                       ("ringattn_ring_ready", 1), ("ringattn_max_queue", 16),
                       ("ringattn_pipeline_depth", 3), ("ringattn_max_queued_bytes", 8 << 30),
                       ("ringattn_queue_depth", 0), ("ringattn_running_requests", 0),
                       ("ringattn_held_bytes", 0), ("ringattn_ring_reforms_total", 0)):
        check(value(s, name) == want, f"{name} is {want}, got {value(s, name)}")
    check(value(s, "ringattn_build_info", component="coordinator", version=version) == 1,
          f"coordinator build_info with version {version}")

    # Each worker's: calls, phases, W steps per call, ring bytes as the hops count them.
    elt = 4  # fp32
    rows = SEQ // WORLD
    block = rows * HEADS_K * HEAD_DIM * elt  # one K (or V) block of one rank
    dkv = 2 * rows * HEADS_K * HEAD_DIM * 4  # one fp32 dK/dV accumulator
    forward_bytes = 2 * block * (WORLD - 1)
    backward_bytes = 2 * block * (WORLD - 1) + dkv * (WORLD - 1) + dkv
    for i in range(WORLD):
        w = all_samples[f"worker{i}"]
        check(value(w, "ringattn_build_info", component="worker", version=version) == 1,
              f"worker {i} build_info")
        check(value(w, "ringattn_worker_info", backend="cpu", transport="gloo") == 1,
              f"worker {i} info")
        for rpc in ("Attend", "AttendBackward"):
            check(value(w, "ringattn_worker_calls_total", rpc=rpc, code="OK") == 1,
                  f"worker {i}: one OK {rpc} call")
            check((value(w, "ringattn_worker_seconds_total", rpc=rpc, phase="ring") or 0) > 0,
                  f"worker {i}: {rpc} ring seconds")
            for part in ("compute", "comm_wait"):
                check(value(w, "ringattn_worker_step_seconds_count", rpc=rpc, part=part) == WORLD,
                      f"worker {i}: {WORLD} {rpc} steps of {part}")
        got = value(w, "ringattn_worker_ring_bytes_sent_total", transport="gloo")
        check(got == forward_bytes + backward_bytes,
              f"worker {i}: ring bytes {got}, want {forward_bytes + backward_bytes}")
        check(not any(n in GPU_ONLY for n, _, _ in w), f"worker {i}: no GPU gauges on a CPU worker")

    # The alerts and the dashboard.
    rc, out = promtool("check", "rules", "alerts.yml")
    check(rc == 0, "promtool check rules alerts.yml:\n" + out)
    rc, out = promtool("test", "rules", "alerts_test.yml")
    check(rc == 0, "promtool test rules alerts_test.yml:\n" + out)
    rc, out = promtool("check", "config", "prometheus.yml")
    check(rc == 0, "promtool check config prometheus.yml:\n" + out)
    alerts = yaml.safe_load(open(os.path.join(MON, "alerts.yml")))
    rule = yaml.safe_load(open(os.path.join(MON, "k8s", "prometheus-rule.yaml")))
    check(rule["spec"]["groups"] == alerts["groups"], "prometheus-rule.yaml's groups are alerts.yml's")
    dashboard = json.load(open(os.path.join(MON, "grafana-dashboard.json")))
    exprs = []
    ids = [p["id"] for p in dashboard["panels"]]
    check(len(ids) == len(set(ids)), "dashboard panel ids are unique")
    for p in dashboard["panels"]:
        if p["type"] == "row":
            continue
        check(p.get("targets"), f"panel '{p['title']}' has queries")
        for t in p.get("targets", []):
            exprs.append((f"panel '{p['title']}'", t["expr"]))
    for r in alerts["groups"][0]["rules"]:
        exprs.append((f"alert {r['alert']}", r["expr"]))
    titles = " ".join(p["title"] for p in dashboard["panels"])
    for needed in ("code", "p99", "TFLOP/s", "Queue", "Workers up", "GPU memory"):
        check(needed in titles, f"a dashboard panel about {needed}")
    worker_source = open(os.path.join(SRC, "worker", "worker_metrics.cc")).read()
    for where, expr in exprs:
        for name in metric_names(expr):
            if name in GPU_ONLY:
                check(f'"{name}"' in worker_source, f"{where}: {name} is declared by the worker")
            else:
                check(name in families, f"{where}: {name} is in no scrape")
    evaluate(exprs, cmetrics, wmetrics)

    # The group's supervision: a worker killed ends the group; started again, the ring re-forms.
    pids = children(group.pid)
    check(len(pids) == WORLD, f"the group runs {WORLD} workers, got {pids}")
    if pids:
        os.kill(pids[-1], signal.SIGKILL)
        try:
            rc = group.wait(timeout=30)
        except subprocess.TimeoutExpired:
            rc = None
        check(rc == 1, f"the group exits 1 when a worker dies, got {rc}")
        check(all(not os.path.exists(f"/proc/{p}") or
                  open(f"/proc/{p}/stat").read().split()[2] == "Z" for p in pids),
              "the group stopped its other workers")
    wait_for(lambda: value(parse(scrape(cmetrics))[1], "ringattn_ring_ready") == 0, 30,
             "the coordinator to notice the ring is down")
    group = node_group(f"127.0.0.1:{internal}", wport, wmetrics[0])
    if wait_for(ready, 60, "the ring to re-form"):
        _, s = parse(scrape(cmetrics))
        check(value(s, "ringattn_ring_formations_total") == 2, "two rings formed")
        check(value(s, "ringattn_ring_reforms_total") == 1, "one re-form")
    group.send_signal(signal.SIGTERM)
    try:
        rc = group.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = None
    check(rc == 0, f"the group exits 0 on SIGTERM, got {rc}")
    check(not children(group.pid), "no worker left after SIGTERM")


def evaluate(exprs, cmetrics, wmetrics):
    """Every expression evaluated by a real Prometheus scraping the endpoints (if installed)."""
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        print("monitoring_test: no prometheus server here; expressions checked by name only")
        return
    (port,) = free_ports(1)
    config = os.path.join(tmp, "prometheus.yml")
    with open(config, "w") as f:
        yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [
            {"job_name": "ringattn", "static_configs": [{"targets": [f"127.0.0.1:{cmetrics}"]}]},
            {"job_name": "ringattn-workers",
             "static_configs": [{"targets": [f"127.0.0.1:{p}" for p in wmetrics]}]}]}, f)
    start([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
           f"--web.listen-address=127.0.0.1:{port}"], "prometheus.log")

    def query(expr):
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as r:
                return json.load(r)
        except urllib.error.HTTPError as e:
            return json.load(e)

    def all_up():
        r = query("up")
        return len(r.get("data", {}).get("result", [])) == 3 and all(
            x["value"][1] == "1" for x in r["data"]["result"])
    if not wait_for(all_up, 60, "prometheus to scrape the three endpoints"):
        return
    time.sleep(3)  # a few samples, for rate()
    present = query('count by (__name__) ({__name__=~"ringattn_.+"})')
    check(present.get("status") == "success", "prometheus answers")
    for where, expr in exprs:
        e = expr.replace("$__rate_interval", "1m")
        r = query(e)
        check(r.get("status") == "success", f"{where}: prometheus evaluates {e!r}: {r.get('error')}")


try:
    main()
finally:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    for p in procs:
        try:
            p.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
    if failures:
        for log in sorted(os.listdir(tmp)):
            if log.endswith(".log"):
                print(f"--- {log} ---\n" + open(os.path.join(tmp, log)).read()[-4000:],
                      file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
if failures:
    print(f"monitoring_test: {len(failures)} failed", file=sys.stderr)
    sys.exit(1)
print("monitoring_test: PASS")
