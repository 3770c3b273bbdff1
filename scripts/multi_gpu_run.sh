#!/usr/bin/env bash
# One job on a machine with several GPUs (issue: multi-GPU ring). Binaries from .devbin (see
# docs/running.md). Runs, with W = the number of GPUs, one NCCL worker process per GPU:
#   1. correctness: `ringattn attend --check` against the fp64 reference for each layout,
#      causal and not, GQA, through the service;
#   2. scaling: causal zigzag, h 32 / h_k 8, d 128, bf16 at 8k, 16k, 32k tokens per GPU, each
#      request 5 times (the worker-side ring time of the last 4 is what counts), against the
#      same requests at the per-GPU size through a one-worker service on GPU 0
#      (scripts/scaling_summary.py prints the ratios);
#   3. backward scaling: the same shapes at 8k and 16k tokens per GPU through AttendBackward
#      (`ringattn attend --backward`), 3 requests each;
#   4. a worker killed mid-request: UNAVAILABLE, then the next request succeeds.
# Logs go to OUT_DIR; a summary is printed.
set -uo pipefail
BIN=${BIN:-.devbin}
OUT_DIR=${1:-${OUT:-/tmp/multi_gpu}}  # at most a few files come back from a device job
LOG=/tmp/multi_gpu_logs
mkdir -p "$OUT_DIR" "$LOG"
export LD_LIBRARY_PATH="$BIN/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
W=$(nvidia-smi -L | grep -c GPU)
nvidia-smi --query-gpu=index,name --format=csv,noheader
echo "GPUs: $W"
SIZES=${SIZES:-8192 16384 32768}        # tokens per GPU, forward
BWD_SIZES=${BWD_SIZES:-8192 16384}     # tokens per GPU, backward (unary limit at W = 2)
echo "== single-GPU reference on GPU 0 (kernel and one-GPU ring, same card)"
CUDA_VISIBLE_DEVICES=0 "$BIN/gpu_ring_bench" --json "$OUT_DIR/single_gpu.jsonl" --iters 5 \
  >"$LOG/single_gpu.txt" 2>&1
grep -E "^impl|^single|^ring " "$LOG/single_gpu.txt"

# The same requests through the service with one worker on GPU 0, at the per-GPU size: the
# single-GPU side of the scaling ratio, timed as the ring side is (the worker's ring call).
wait_ready() {  # $1 log
  for i in $(seq 1 120); do grep -q "workers ready" "$1" && return 0; sleep 0.5; done
  echo "ring did not form"; tail -30 "$1"; return 1
}
PORT1=50299
CUDA_VISIBLE_DEVICES=0 "$BIN/ringattn" serve --workers=1 --kernel=cuda \
  --listen=127.0.0.1:$PORT1 --metrics= >"$LOG/serve_single.log" 2>&1 &
SERVE1=$!
if wait_ready "$LOG/serve_single.log"; then
  A1="$BIN/ringattn attend --target=127.0.0.1:$PORT1 --timeout=120 --heads=32 --heads_k=8"
  A1="$A1 --head_dim=128 --dtype=bf16 --causal --check=false"
  for per in $SIZES; do
    for rep in 1 2 3 4; do $A1 --seqlen=$per --return_lse=false >>"$LOG/single_fwd_$per.log" 2>&1; done
  done
  for per in $BWD_SIZES; do
    for rep in 1 2 3; do $A1 --seqlen=$per --backward >>"$LOG/single_bwd_$per.log" 2>&1; done
  done
fi
kill $SERVE1; wait $SERVE1 2>/dev/null
PORT=50300
"$BIN/ringattn" serve --workers="$W" --kernel=cuda --listen=127.0.0.1:$PORT --metrics= \
  >"$OUT_DIR/serve.log" 2>&1 &
SERVE=$!
for i in $(seq 1 120); do
  grep -q "workers ready" "$OUT_DIR/serve.log" && break
  sleep 0.5
done
grep "workers ready" "$OUT_DIR/serve.log" || { echo "ring did not form"; tail -30 "$OUT_DIR/serve.log"; kill $SERVE; exit 1; }
A="$BIN/ringattn attend --target=127.0.0.1:$PORT --timeout=120"

# ONLY_SCALING=1 skips the correctness checks and the killed worker (a timing-only rerun).
ONLY_SCALING=${ONLY_SCALING:-0}
[ "$ONLY_SCALING" = 1 ] || {
echo "== correctness (fp64 reference on the client)"
for layout in contiguous zigzag stripe; do
  for causal in false true; do
    $A --layout=$layout --causal=$causal --seqlen=2051 --heads=8 --heads_k=2 --head_dim=128 \
      --dtype=bf16 --check >"$LOG/check_${layout}_${causal}.log" 2>&1
    echo "layout=$layout causal=$causal rc=$? $(grep -E '^check:' "$LOG/check_${layout}_${causal}.log")"
  done
done 2>&1 | tee "$OUT_DIR/correctness.txt"
}

echo "== scaling"
for per in $SIZES; do
  s=$((per * W))
  for rep in 1 2 3 4 5; do
    $A --seqlen=$s --heads=32 --heads_k=8 --head_dim=128 --dtype=bf16 --causal --check=false \
      --return_lse=false >>"$LOG/scaling_$per.log" 2>&1
  done
  echo "tokens/GPU=$per seqlen=$s: $(grep -cE '^throughput' "$LOG/scaling_$per.log") responses"
done

echo "== backward scaling (AttendBackward, unary: up to 16k tokens per GPU at W = 2)"
for per in $BWD_SIZES; do
  s=$((per * W))
  for rep in 1 2 3; do
    $A --seqlen=$s --heads=32 --heads_k=8 --head_dim=128 --dtype=bf16 --causal --check=false \
      --backward >>"$LOG/backward_$per.log" 2>&1
  done
  echo "tokens/GPU=$per seqlen=$s: $(grep -c '^gradients in' "$LOG/backward_$per.log") backward responses"
done

kill $SERVE; wait $SERVE 2>/dev/null

if [ "$ONLY_SCALING" != 1 ]; then
echo "== worker killed mid-request"
# The simple kernel (cuda_reference) makes the request compute for seconds with a small payload,
# so the kill lands in the ring, not in the upload.
PORT2=50301
"$BIN/ringattn" serve --workers="$W" --kernel=cuda_reference --listen=127.0.0.1:$PORT2 \
  --metrics= >"$LOG/serve_fault.log" 2>&1 &
SERVE2=$!
for i in $(seq 1 120); do grep -q "workers ready" "$LOG/serve_fault.log" && break; sleep 0.5; done
B="$BIN/ringattn attend --target=127.0.0.1:$PORT2 --timeout=120"
$B --seqlen=32768 --heads=16 --heads_k=4 --head_dim=128 --dtype=bf16 --causal --check=false \
  >"$LOG/kill.log" 2>&1 &
CALL=$!
sleep 2.5
# Workers register on the internal plane's port, which serve prints beside the public one.
IPORT2=$(grep -oE 'internal plane on port [0-9]+' "$LOG/serve_fault.log" | grep -oE '[0-9]+$')
VICTIM=$(pgrep -f "ringattn worker --coordinator=127.0.0.1:$IPORT2" | head -n1)
kill -9 "$VICTIM"
wait $CALL
echo "killed worker pid $VICTIM: $(grep -E '^error|^throughput' "$LOG/kill.log" | head -1)"
$B --seqlen=4099 --heads=8 --heads_k=2 --head_dim=128 --dtype=bf16 --causal --check \
  >"$LOG/after_kill.log" 2>&1
echo "next request rc=$? $(grep -E '^check:|^error' "$LOG/after_kill.log")"
kill $SERVE2; wait $SERVE2 2>/dev/null
cat "$LOG/serve_fault.log" >> "$OUT_DIR/serve.log"
fi
cat "$LOG"/scaling_*.log > "$OUT_DIR/scaling.log"
cat "$LOG"/backward_*.log > "$OUT_DIR/backward_scaling.log" 2>/dev/null
cat "$LOG"/check_*.log > "$OUT_DIR/checks.log"
cat "$LOG"/single_fwd_*.log "$LOG"/single_bwd_*.log > "$OUT_DIR/single_service.log" 2>/dev/null
cat "$LOG/kill.log" "$LOG/after_kill.log" > "$OUT_DIR/faults.log" 2>/dev/null
echo "== scaling summary"
python3 "$(dirname "$0")/scaling_summary.py" "$LOG" "$W" "$OUT_DIR/single_gpu.jsonl" | tee "$OUT_DIR/scaling_summary.txt"
exit 0
