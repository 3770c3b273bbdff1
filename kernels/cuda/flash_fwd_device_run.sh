#!/usr/bin/env bash
# One device job for the fast forward kernel's tilings: correctness of every compiled tiling,
# then the timing of every compiled tiling at the reference shapes (docs/performance.md). Binaries come from
# scripts/gpu_bundle.sh; for every tiling, from a build configured with
# -DRINGATTN_CUDA_ALL_TILINGS=ON (a default build compiles each head dim's default only):
#
#   here:    cmake -S . -B build-gpu -DRINGATTN_CUDA_ALL_TILINGS=ON   # once; the bundle keeps it
#            scripts/gpu_bundle.sh cuda_backend_test flash_fwd_config_test gpu_kernel_bench
#   device:  ALL_TILINGS=1 kernels/cuda/flash_fwd_device_run.sh [.devbin] [$OUT]
#
# Steps (each log under OUT_DIR, a summary on stdout):
#   1. flash_fwd_config_test: every compiled tiling against the simple kernel (~250 cases with
#      all tilings), and the registers / local memory / CTAs per SM of every kernel;
#   2. cuda_backend_test (89 tests) on the default tilings; with ALL_TILINGS=1 (binaries of an
#      all-tilings build) also on v1 (RINGATTN_FLASH_FWD_CONFIG=v1) and every other tiling name;
#   3. gpu_kernel_bench: every compiled tiling at every shape, JSON lines in
#      OUT_DIR/kernel_bench.jsonl.
# The exit status is nonzero when any step failed; later steps still run.
set -uo pipefail
BIN=${1:-.devbin}
OUT_DIR=${2:-${OUT:-/tmp/flash_fwd_run}}
mkdir -p "$OUT_DIR"
export LD_LIBRARY_PATH="$BIN/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
status=0

echo "== flash_fwd_config_test"
"$BIN/flash_fwd_config_test" >"$OUT_DIR/config_test.log" 2>&1 || status=1
grep -E "^d[0-9]+ |PASSED|FAILED|tests ran" "$OUT_DIR/config_test.log" | sort -u | head -80

run_suite() {  # $1: tiling name or "default"
  local log="$OUT_DIR/backend_test_$1.log"
  if [ "$1" = default ]; then
    "$BIN/cuda_backend_test" >"$log" 2>&1 || status=1
  else
    RINGATTN_FLASH_FWD_CONFIG="$1" "$BIN/cuda_backend_test" >"$log" 2>&1 || status=1
  fi
  echo "cuda_backend_test [$1]: $(grep -E '^\[  (PASSED|FAILED)  \]' "$log" | tr '\n' ' ')"
}
echo "== cuda_backend_test"
run_suite default
if [ "${ALL_TILINGS:-0}" = 1 ]; then
  # Every tiling name of flash_fwd_configs.h but the defaults.
  for name in v1 4x32_n128_v1grid 4x32_n64_qr 4x32_n128_s3 v1_n64_c2 8x32_n128 4x32_n64_expf \
    4x32_n64_2bar 4x32_n64_v1grid 4x32_n64_s3 v1_n128 8x32_n64; do
    run_suite "$name"
  done
fi

echo "== gpu_kernel_bench"
"$BIN/gpu_kernel_bench" --json "$OUT_DIR/kernel_bench.jsonl" >"$OUT_DIR/kernel_bench.txt" 2>&1 ||
  status=1
cat "$OUT_DIR/kernel_bench.txt"
exit $status
