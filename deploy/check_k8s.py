#!/usr/bin/env python3
"""Renders every Kubernetes layout under deploy/ and checks what it would apply.

    check_k8s.py [DEPLOY_DIR]

Each layout (k8s, k8s-one-node, k8s-cpu, k8s-multi-node, k8s-trust, monitoring/k8s) is
rendered with `kubectl kustomize`; then, offline (no cluster, no schema): the world size the
coordinator is started with (its command run by /bin/sh with the rendered topology) equals the
worker pods x the workers per pod, and the pods' GPUs, metrics ports and the worker group
(StatefulSet, or a LeaderWorkerSet restarted as a group) follow the topology; every pod meets
Pod Security "restricted"; /dev/shm is a sized memory emptyDir; every image is pinned to the
release; the grace periods and preStop hooks cover the coordinator's --drain_seconds; the
disruption budgets, network policies, Services and the Prometheus Operator's monitors select
what they should. Exit 0 when all hold, 1 listing what does not, 77 without kubectl (skipped).
Needs PyYAML.
"""
import os
import re
import shutil
import subprocess
import sys

import yaml

DEPLOY = os.path.abspath(sys.argv[1] if len(sys.argv) > 1 else os.path.dirname(__file__))
LAYOUTS = ["k8s", "k8s-one-node", "k8s-cpu", "k8s-multi-node", "k8s-trust"]
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                   "persistentVolumeClaim", "projected", "secret"}
METRICS_PORT = 9470
errors = []


def check(cond, what):
    if not cond:
        errors.append(what)
    return cond


def render(layout):
    r = subprocess.run(["kubectl", "kustomize", os.path.join(DEPLOY, layout)],
                       capture_output=True, text=True, timeout=120)
    if not check(r.returncode == 0, f"{layout}: kubectl kustomize failed:\n{r.stderr}"):
        return []
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def project_version():
    text = open(os.path.join(DEPLOY, "..", "CMakeLists.txt")).read()
    return re.search(r"project\(ringattn VERSION ([0-9.]+)", text).group(1)


def one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    return found[0] if len(found) == 1 else None


def selects(selector, labels):
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def sleep_seconds(container):
    cmd = container.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", [])
    return int(cmd[-1]) if len(cmd) == 2 and cmd[0].endswith("sleep") else 0


def flag(args, name):
    for a in args:
        if a.startswith(f"--{name}="):
            return a.split("=", 1)[1]
    return None


def check_restricted(where, pod):
    spec = pod["spec"]
    sc = spec.get("securityContext", {})
    check(sc.get("runAsNonRoot") is True, f"{where}: runAsNonRoot")
    check(sc.get("runAsUser", 1) != 0, f"{where}: runAsUser is not root")
    check(sc.get("seccompProfile", {}).get("type") in ("RuntimeDefault", "Localhost"),
          f"{where}: seccompProfile RuntimeDefault")
    for host in ("hostIPC", "hostNetwork", "hostPID"):
        check(not spec.get(host), f"{where}: no {host}")
    for v in spec.get("volumes", []):
        kinds = set(v) - {"name"}
        check(kinds <= ALLOWED_VOLUMES, f"{where}: volume {v['name']} of a kind 'restricted' refuses")
    for c in spec.get("containers", []) + spec.get("initContainers", []):
        csc = c.get("securityContext", {})
        cw = f"{where} container {c['name']}"
        check(csc.get("allowPrivilegeEscalation") is False, f"{cw}: allowPrivilegeEscalation false")
        check(not csc.get("privileged"), f"{cw}: not privileged")
        caps = csc.get("capabilities", {})
        check("ALL" in caps.get("drop", []), f"{cw}: drops ALL capabilities")
        check(set(caps.get("add", [])) <= {"NET_BIND_SERVICE"}, f"{cw}: adds no capability")
        check(csc.get("runAsUser", 1) != 0, f"{cw}: runAsUser is not root")
        for p in c.get("ports", []):
            check("hostPort" not in p, f"{cw}: no hostPort")


def check_layout(layout, docs, version):
    topos = [d for d in docs if d["kind"] == "ConfigMap"
             and d["metadata"]["name"].startswith("ringattn-topology")]
    if not check(len(topos) == 1, f"{layout}: one ringattn-topology ConfigMap"):
        return
    topo = topos[0]
    nodes = int(topo["data"]["RINGATTN_NODES"])
    per_node = int(topo["data"]["RINGATTN_WORKERS_PER_NODE"])
    world = nodes * per_node

    # The coordinator: world size from its command, run as the container would run it.
    dep = one(docs, "Deployment", "ringattn-coordinator")
    if not check(dep is not None, f"{layout}: the coordinator Deployment"):
        return
    cpod = dep["spec"]["template"]
    check_restricted(f"{layout} coordinator", cpod)
    coord = cpod["spec"]["containers"][0]
    check(any(e.get("configMapRef", {}).get("name") == topo["metadata"]["name"]
              for e in coord.get("envFrom", [])), f"{layout}: the coordinator reads the topology")
    cmd = coord.get("command", [])
    if check(len(cmd) >= 3 and cmd[:2] == ["/bin/sh", "-c"], f"{layout}: coordinator command"):
        script = cmd[2].replace("exec ringattn", "echo", 1)
        out = subprocess.run(["/bin/sh", "-c", script, *cmd[3:], *coord.get("args", [])],
                             capture_output=True, text=True, env=dict(topo["data"])).stdout.split()
        check(out[:1] == ["coordinator"], f"{layout}: the command runs `ringattn coordinator`")
        check(f"--workers={world}" in out,
              f"{layout}: coordinator started with --workers={world} (nodes {nodes} x "
              f"{per_node}), got {out}")
    args = coord.get("args", [])
    drain = float(flag(args, "drain_seconds") or 30)
    c_sleep = sleep_seconds(coord)
    c_grace = cpod["spec"].get("terminationGracePeriodSeconds", 30)
    check(c_sleep > 0, f"{layout}: the coordinator has a preStop sleep")
    check(c_grace >= c_sleep + drain + 5,
          f"{layout}: coordinator grace {c_grace} s < preStop {c_sleep} + drain {drain} + 5")

    # The workers: a StatefulSet of `nodes` pods, or one LeaderWorkerSet group of them.
    sts = one(docs, "StatefulSet", "ringattn-worker")
    lws = one(docs, "LeaderWorkerSet", "ringattn-worker")
    check((sts is None) != (lws is None), f"{layout}: the workers are a StatefulSet or a LeaderWorkerSet")
    if sts is not None:
        check(sts["spec"]["replicas"] == nodes, f"{layout}: StatefulSet replicas == nodes {nodes}")
        pod = sts["spec"]["template"]
        check(sts["spec"].get("podManagementPolicy") == "Parallel", f"{layout}: Parallel pods")
    elif lws is not None:
        t = lws["spec"]["leaderWorkerTemplate"]
        check(t["size"] == nodes, f"{layout}: LeaderWorkerSet size == nodes {nodes}")
        check(lws["spec"]["replicas"] == 1, f"{layout}: one LeaderWorkerSet group (one ring)")
        check(t.get("restartPolicy") == "RecreateGroupOnPodRestart",
              f"{layout}: the group is recreated when a pod restarts")
        check("leaderTemplate" not in t, f"{layout}: the leader is a worker like the others")
        pod = t["workerTemplate"]
    else:
        return
    check_restricted(f"{layout} workers", pod)
    w = pod["spec"]["containers"][0]
    env = {e["name"]: e.get("value") for e in w.get("env", [])}
    gpus = w.get("resources", {}).get("limits", {}).get("nvidia.com/gpu")
    if env.get("RINGATTN_KERNEL") == "cpu":
        check(gpus is None, f"{layout}: CPU workers ask for no GPU")
    else:
        check(gpus == per_node, f"{layout}: a worker pod takes {per_node} GPUs, got {gpus}")
    check(any(e.get("configMapRef", {}).get("name") == topo["metadata"]["name"]
              for e in w.get("envFrom", [])), f"{layout}: the workers read the topology")
    ports = {p["name"]: p["containerPort"] for p in w.get("ports", [])}
    want = {f"metrics-{i}": METRICS_PORT + i for i in range(per_node)}
    check(ports == want, f"{layout}: metrics ports {want}, got {ports}")
    scripts = [d for d in docs if d["kind"] == "ConfigMap"
               and d["metadata"]["name"].startswith("ringattn-node-script")]
    src = open(os.path.join(DEPLOY, "k8s", "base", "ringattn-node.sh")).read()
    check(len(scripts) == 1 and scripts[0]["data"].get("ringattn-node.sh") == src,
          f"{layout}: the node script ConfigMap holds ringattn-node.sh")
    mounts = {m["mountPath"]: m["name"] for m in w.get("volumeMounts", [])}
    vols = {v["name"]: v for v in pod["spec"].get("volumes", [])}
    script_vol = vols.get(mounts.get("/etc/ringattn/node"), {})
    check(script_vol.get("configMap", {}).get("name") == (scripts[0]["metadata"]["name"] if scripts else None),
          f"{layout}: the node script is mounted at /etc/ringattn/node")
    check(w.get("command") == ["/bin/bash", "/etc/ringattn/node/ringattn-node.sh"],
          f"{layout}: the worker container runs the node script")
    shm = vols.get(mounts.get("/dev/shm"), {}).get("emptyDir", {})
    check(shm.get("medium") == "Memory" and shm.get("sizeLimit"),
          f"{layout}: /dev/shm is a memory emptyDir with a size limit")
    w_sleep = sleep_seconds(w)
    w_grace = pod["spec"].get("terminationGracePeriodSeconds", 30)
    check(w_sleep >= c_sleep + drain,
          f"{layout}: workers' preStop {w_sleep} s < coordinator's preStop + drain {c_sleep + drain}")
    check(w_grace >= w_sleep + 5, f"{layout}: workers' grace {w_grace} s < preStop {w_sleep} + 5")
    labels = pod["metadata"]["labels"]
    anti = pod["spec"].get("affinity", {}).get("podAntiAffinity", {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution", [])
    check(any(t.get("topologyKey") == "kubernetes.io/hostname" and selects(t["labelSelector"], labels)
              for t in anti), f"{layout}: one worker pod per node")

    # Images pinned to the release.
    for d in docs:
        spec = d.get("spec", {})
        for tpl in (spec.get("template"), spec.get("leaderWorkerTemplate", {}).get("workerTemplate")):
            for c in (tpl or {}).get("spec", {}).get("containers", []):
                image = c["image"]
                check("@sha256:" in image or image.rsplit(":", 1)[-1] == version,
                      f"{layout}: image {image} is not pinned to the release {version}")

    # Disruption budgets, policies, Services.
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"]
    check(any(selects(p["spec"]["selector"], labels) for p in pdbs),
          f"{layout}: a PodDisruptionBudget covers the worker pods")
    check(any(selects(p["spec"]["selector"], cpod["metadata"]["labels"]) for p in pdbs),
          f"{layout}: a PodDisruptionBudget covers the coordinator")
    wpol = one(docs, "NetworkPolicy", "ringattn-worker")
    if check(wpol is not None, f"{layout}: the workers' NetworkPolicy"):
        open_ports = [(p["port"], p.get("endPort", p["port"])) for r in wpol["spec"]["ingress"]
                      if "from" not in r for p in r.get("ports", [])]
        check(all(any(lo <= port <= hi for lo, hi in open_ports) for port in want.values()),
              f"{layout}: the workers' metrics ports are reachable for scraping")
    svc = one(docs, "Service", "ringattn-coordinator")
    check(svc is not None and any(p["name"] == "metrics" for p in svc["spec"]["ports"]),
          f"{layout}: the coordinator Service has a metrics port")
    return per_node


def check_monitors(docs, max_per_node):
    sm = one(docs, "ServiceMonitor", "ringattn-coordinator")
    pm = one(docs, "PodMonitor", "ringattn-workers")
    rule = one(docs, "PrometheusRule", "ringattn")
    check(sm and pm and rule, "monitoring/k8s: ServiceMonitor, PodMonitor and PrometheusRule")
    if not (sm and pm):
        return
    base = render("k8s")
    svc = one(base, "Service", "ringattn-coordinator")
    check(selects(sm["spec"]["selector"], svc["metadata"]["labels"]),
          "ServiceMonitor selects the coordinator Service")
    check({e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]},
          "ServiceMonitor's ports are the Service's")
    pod = one(base, "StatefulSet", "ringattn-worker")["spec"]["template"]
    check(selects(pm["spec"]["selector"], pod["metadata"]["labels"]), "PodMonitor selects the workers")
    names = {e["port"] for e in pm["spec"]["podMetricsEndpoints"]}
    check({f"metrics-{i}" for i in range(max_per_node)} <= names,
          f"PodMonitor scrapes metrics-0..{max_per_node - 1}")


def main():
    if shutil.which("kubectl") is None:
        print("check_k8s: no kubectl here; skipped")
        return 77
    version = project_version()
    per_node = []
    for layout in LAYOUTS:
        docs = render(layout)
        if docs:
            per_node.append(check_layout(layout, docs, version) or 0)
    check_monitors(render(os.path.join("monitoring", "k8s")), max(per_node or [0]))
    trust = render("k8s-trust")
    if trust:
        c = one(trust, "Deployment", "ringattn-coordinator")["spec"]["template"]["spec"]
        args = c["containers"][0]["args"]
        check(all(flag(args, f) for f in ("tls_cert", "api_tokens_file", "internal_tls_cert",
                                           "health_listen")), "k8s-trust: TLS, tokens, health port")
        check(c["containers"][0]["readinessProbe"]["grpc"]["port"] == 50053,
              "k8s-trust: readiness on the plaintext health port")
        w = one(trust, "StatefulSet", "ringattn-worker")["spec"]["template"]["spec"]["containers"][0]
        check(flag(w.get("args", []), "internal_tls_cert"), "k8s-trust: workers get internal TLS")
    for n, e in enumerate(errors, 1):
        print(f"check_k8s: [{n}/{len(errors)}] {e}", file=sys.stderr)
    print(f"check_k8s: {len(LAYOUTS)} layouts and the monitors rendered; "
          f"{len(errors) or 'no'} problem(s)")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
