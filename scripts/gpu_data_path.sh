#!/usr/bin/env bash
# The data-path benchmark of docs/performance.md on one GPU: `ringattn serve` with one worker
# (--kernel, default cuda) and `ringattn bench` from the same machine over each path (bytes:
# unary and streamed,
# system shared memory, CUDA shared memory; with the client's copies, and with the tensors
# resident in the regions; concurrency 1 and 4). JSON per run under OUT_DIR, one table last.
# Usage (GPU machine, bundle from scripts/gpu_bundle.sh ringattn):
#   scripts/gpu_data_path.sh .devbin $OUT
# SHAPE overrides the problem flags (default: the issue's 32k shape); SERVE_ARGS adds serve
# flags (e.g. --pipeline_depth=1); BENCH_ARGS adds bench flags to every row (e.g.
# --connections=8); ROWS picks runs by name (default all); WARMUP: calls per client thread
# before the clock (default 1: a region's first call registers it with CUDA).
set -uo pipefail
BIN=${1:-.devbin}
OUT_DIR=${2:-${OUT:-/tmp/gpu_data_path}}
KERNEL=${KERNEL:-cuda}
N=${N:-6}
SHAPE=${SHAPE:---seqlen=32768 --heads=32 --heads_k=8 --head_dim=128 --dtype=bf16 --causal}
mkdir -p "$OUT_DIR"
export LD_LIBRARY_PATH="$BIN/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0
RA="$BIN/ringattn"
PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
LOG="$OUT_DIR/serve_$KERNEL.log"
# shellcheck disable=SC2086
"$RA" serve --kernel="$KERNEL" --workers=1 --listen="127.0.0.1:$PORT" --metrics= ${SERVE_ARGS:-} \
  >"$LOG" 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for _ in $(seq 600); do grep -q "workers ready" "$LOG" && break; sleep 0.1; done
grep -q "workers ready" "$LOG" || { echo "serve did not start"; cat "$LOG"; exit 1; }

ROWS=${ROWS:-bytes stream shm shm_resident cuda_shm cuda_shm_resident shm_resident_c4 cuda_shm_resident_c4}
run() {  # $1 name, rest: bench flags
  local name=$1; shift
  [[ " $ROWS " == *" $name "* ]] || return 0
  # shellcheck disable=SC2086
  "$RA" bench --target="127.0.0.1:$PORT" $SHAPE --json="$OUT_DIR/$name.json" \
    --warmup="${WARMUP:-1}" ${BENCH_ARGS:-} "$@" \
    >"$OUT_DIR/$name.txt" 2>&1 || echo "$name: bench failed (see $name.txt)"
}
run bytes --concurrency=1 --requests="$N"
run stream --stream --concurrency=1 --requests="$N"
run shm --shm --concurrency=1 --requests="$N"
run shm_resident --shm --shm_resident --concurrency=1 --requests="$N"
run cuda_shm --cuda_shm --concurrency=1 --requests="$N"
run cuda_shm_resident --cuda_shm --shm_resident --concurrency=1 --requests="$N"
run shm_resident_c4 --shm --shm_resident --concurrency=4 --requests=$((4 * N))
run cuda_shm_resident_c4 --cuda_shm --shm_resident --concurrency=4 --requests=$((4 * N))

python3 - "$OUT_DIR" "$KERNEL" <<'PY'
import json, os, sys
out, kernel = sys.argv[1], sys.argv[2]
names = ["bytes", "stream", "shm", "shm_resident", "cuda_shm", "cuda_shm_resident", "shm_resident_c4",
         "cuda_shm_resident_c4"]
print(f"== data path, one {kernel} worker {os.environ.get('SERVE_ARGS', '')} (ms; p50 and mean "
      "of the client round trip; server phases are means; busy: ring time over wall time)")
print(f"{'path':22} {'ok':>4} {'p50':>8} {'mean':>8} {'total':>8} {'workers':>8} {'ring':>7} "
      f"{'h2d':>6} {'d2h':>6} {'turn':>6} {'shm_in':>7} {'shm_out':>7} {'busy':>6} {'warmup':>7}")
for n in names:
    p = os.path.join(out, n + ".json")
    if not os.path.exists(p):
        continue
    j = json.load(open(p))
    m = j["server_mean_seconds"]
    f = lambda k: m.get(k, 0) * 1e3
    print(f"{n:22} {j['ok']:>4} {j['latency_seconds']['p50']*1e3:8.1f} "
          f"{j['latency_seconds']['mean']*1e3:8.1f} {f('total'):8.1f} {f('workers'):8.1f} "
          f"{f('ring'):7.1f} {f('worker_h2d'):6.1f} {f('worker_d2h'):6.1f} "
          f"{f('worker_turn'):6.1f} {f('shm_in'):7.1f} {f('shm_out'):7.1f} "
          f"{j.get('ring_busy_share', 0)*100:5.1f}% "
          f"{j.get('warmup', {}).get('max_seconds', 0)*1e3:7.1f}")
PY
