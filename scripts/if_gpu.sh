#!/usr/bin/env bash
# Runs its arguments when an NVIDIA GPU is visible; otherwise exits 77, which ctest reports as
# skipped (SKIP_RETURN_CODE 77).
if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L 2>/dev/null | grep -q GPU; then
  echo "no GPU: skipped"
  exit 77
fi
exec "$@"
