#!/usr/bin/env bash
# Runs every GPU test (and, with BENCH=1, benchmark) binary present in a bundle directory on a
# GPU machine, each under a timeout, logs under OUT_DIR, and prints one summary table last: the
# one-command check that a device session starts with. Bundles come from scripts/gpu_bundle.sh,
# in two halves under the 64 MiB a device job carries:
#
#   here:   scripts/gpu_bundle.sh cuda_backend_test flash_fwd_config_test cuda_backward_test \
#             cudnn_backend_test cudnn_backward_test backend_conformance_test gpu_kernel_bench \
#             gpu_backward_bench
#   device: scripts/gpu_suite.sh .devbin $OUT
#   here:   scripts/gpu_bundle.sh device_ring_test device_ring_backward_test ring_test \
#             service_backward_gpu_test ringattn gpu_ring_bench
#   device: scripts/gpu_suite.sh .devbin $OUT
#
# BENCH=1 also runs the benchmarks present (gpu_kernel_bench, gpu_backward_bench, gpu_ring_bench)
# with few iterations, JSON lines under OUT_DIR. Exit status: nonzero when any test or benchmark
# failed or timed out.
set -uo pipefail
BIN=${1:-.devbin}
OUT_DIR=${2:-${OUT:-/tmp/gpu_suite}}
TIMEOUT=${TIMEOUT:-240}
mkdir -p "$OUT_DIR"
export LD_LIBRARY_PATH="$BIN/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export NCCL_NVLS_ENABLE=0
[ -x "$BIN/ringattn" ] && export RINGATTN_BIN="$(realpath "$BIN/ringattn")"
nvidia-smi --query-gpu=index,name --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"

TESTS="cuda_backend_test flash_fwd_config_test cuda_backward_test cudnn_backend_test
       cudnn_backward_test backend_conformance_test device_ring_test device_ring_backward_test
       service_backward_gpu_test shared_memory_service_gpu_test"
status=0
rows=()
run() {  # $1 name, rest: command
  local name=$1; shift
  local log="$OUT_DIR/$name.log" t0 rc secs passed failed
  t0=$(date +%s)
  timeout "$TIMEOUT" "$@" >"$log" 2>&1
  rc=$?
  secs=$(( $(date +%s) - t0 ))
  passed=$(grep -oE '^\[  PASSED  \] [0-9]+' "$log" | grep -oE '[0-9]+$' | tail -1)
  failed=$(grep -oE '^\[  FAILED  \] [0-9]+ test' "$log" | grep -oE '[0-9]+' | tail -1)
  [ "$rc" = 0 ] || status=1
  rows+=("$(printf '%-28s rc=%-3s passed=%-5s failed=%-4s %5ss' "$name" "$rc" "${passed:--}" \
    "${failed:-0}" "$secs")")
}
for t in $TESTS; do
  [ -x "$BIN/$t" ] && run "$t" "$BIN/$t"
done
# The transport conformance suite's device cases (in-process device group, NCCL).
[ -x "$BIN/ring_test" ] && run transport_device "$BIN/ring_test" \
  --gtest_filter='*/inprocess_device:*/nccl:*DeviceGroup*'
if [ "${BENCH:-0}" = 1 ]; then
  [ -x "$BIN/gpu_kernel_bench" ] && run gpu_kernel_bench "$BIN/gpu_kernel_bench" --only-fast \
    --iters 5 --json "$OUT_DIR/kernel_bench.jsonl"
  [ -x "$BIN/gpu_backward_bench" ] && run gpu_backward_bench "$BIN/gpu_backward_bench" --iters 5 \
    --json "$OUT_DIR/backward_bench.jsonl"
  [ -x "$BIN/gpu_ring_bench" ] && run gpu_ring_bench "$BIN/gpu_ring_bench" \
    --json "$OUT_DIR/ring_bench.jsonl"
fi
echo "== GPU suite ($BIN, timeout ${TIMEOUT}s each; logs in $OUT_DIR)"
for r in "${rows[@]}"; do echo "$r"; done
[ ${#rows[@]} -gt 0 ] || { echo "no GPU test binaries in $BIN"; status=1; }
exit $status
