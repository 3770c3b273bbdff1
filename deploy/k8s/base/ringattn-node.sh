#!/bin/bash
# The workers of one node, as one group: a `ringattn worker` per GPU (device i, WorkerService
# on port RINGATTN_WORKER_PORT + i, /metrics on RINGATTN_METRICS_PORT + i). When any of them
# exits, the others are stopped and the script exits 1, so that the kubelet restarts the node's
# workers together; SIGTERM or SIGINT is passed on to every worker and the script exits 0 once
# they have stopped. Arguments are added to every worker's command line (TLS flags, say).
#
# Environment:
#   RINGATTN_WORKERS_PER_NODE  worker processes (one per GPU of the pod); required
#   RINGATTN_COORDINATOR       the coordinator's internal plane, host:port; required
#   POD_IP                     the address the coordinator and the other ranks reach them at
#   RINGATTN_KERNEL            cuda (default), cudnn, cpu, ...
#   RINGATTN_LISTEN_HOST       where the workers listen (default 0.0.0.0)
#   RINGATTN_WORKER_PORT       first WorkerService port (default 7000)
#   RINGATTN_METRICS_PORT      first /metrics port (default 9470; empty: no metrics)
#   RINGATTN_BIN               the binary (default ringattn, on PATH)
set -u
n=${RINGATTN_WORKERS_PER_NODE:?RINGATTN_WORKERS_PER_NODE must be set}
coordinator=${RINGATTN_COORDINATOR:?RINGATTN_COORDINATOR must be set (host:port)}
bin=${RINGATTN_BIN:-ringattn}
listen=${RINGATTN_LISTEN_HOST:-0.0.0.0}
worker_port=${RINGATTN_WORKER_PORT:-7000}
metrics_port=${RINGATTN_METRICS_PORT-9470}

pids=()
stopping=0
stop_all() {
  stopping=1
  kill -TERM "${pids[@]}" 2>/dev/null
}
trap stop_all TERM INT

for ((i = 0; i < n; i++)); do
  args=(worker "--coordinator=$coordinator" "--kernel=${RINGATTN_KERNEL:-cuda}" "--device=$i"
        "--worker_listen=$listen:$((worker_port + i))" "--advertise_host=${POD_IP:-127.0.0.1}")
  [[ -n $metrics_port ]] && args+=("--metrics=$listen:$((metrics_port + i))")
  "$bin" "${args[@]}" "$@" &
  pids+=($!)
done
echo "ringattn-node: started $n workers (pids ${pids[*]})" >&2

# The first worker to exit ends the group (a trapped signal also ends this wait).
wait -n
rc=$?
if ((stopping == 0)); then
  echo "ringattn-node: a worker exited with status $rc; stopping the others" >&2
  stop_all
  stopping=2
fi
while ! wait; do :; done  # until every worker is gone (a signal interrupts a wait)
((stopping == 2)) && exit 1
echo "ringattn-node: every worker stopped" >&2
exit 0
