#!/usr/bin/env bash
# Single-device quick validation (the seed's quick_test): every single-device implementation
# this machine has (cuDNN and our CUDA kernel on a GPU, the fast CPU kernel everywhere) against
# the fp64 reference at small sizes, with the comparison's tolerances. Builds if needed.
#
#   bench/quick_check.sh [--out DIR] [-- extra ringattn_compare flags]
#
# Writes DIR (default out/quick_check) like bench/run_comparison.sh; exits non-zero on a breach.
set -euo pipefail
out="out/quick_check"
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out=$2; shift 2 ;;
    --out=*) out=${1#*=}; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
exec "$(dirname "$0")/run_comparison.sh" --preset quick --out "$out" "${args[@]}"
