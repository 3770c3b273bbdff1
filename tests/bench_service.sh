#!/usr/bin/env bash
# Integration test of `ringattn bench`: starts `ringattn serve` with 2 CPU workers on a free
# loopback port, runs a small bench against it and checks that all 12 requests succeeded; then
# a bench of gradient calls (--backward), unary and streamed.
# Usage: bench_service.sh /path/to/ringattn
set -u

BIN=${1:?usage: bench_service.sh /path/to/ringattn}
LOG=$(mktemp -t bench_service.XXXXXX.log)
source "$(dirname "$0")/serve_helpers.sh"
start_server

OUT=$("$BIN" bench --target="127.0.0.1:$PORT" --concurrency=3 --requests=12 --seqlen=256 \
      --heads=4 --head_dim=64 --dtype=fp32 --causal --timeout=60 2>&1)
RC=$?
echo "$OUT"
[[ $RC == 0 ]] || fail "ringattn bench exited with $RC"
grep -q "12 sent, 12 ok, 0 failed" <<<"$OUT" || fail "the bench did not report 12 ok and 0 failed"
grep -qE "host memcpy on this machine: [0-9.]+ GB/s" <<<"$OUT" \
  || fail "the bench did not report this machine's memcpy rate beside the payload rate"

# The same load of gradient calls (one forward first, then AttendBackward), unary and streamed.
for STREAM in false true; do
  OUT=$("$BIN" bench --target="127.0.0.1:$PORT" --concurrency=2 --requests=6 --seqlen=200 \
        --heads=4 --heads_k=2 --head_dim=64 --dtype=bf16 --causal --backward --stream=$STREAM \
        --timeout=60 2>&1)
  RC=$?
  echo "$OUT"
  [[ $RC == 0 ]] || fail "ringattn bench --backward --stream=$STREAM exited with $RC"
  grep -q "6 sent, 6 ok, 0 failed" <<<"$OUT" ||
    fail "the backward bench (--stream=$STREAM) did not report 6 ok and 0 failed"
  if [[ $STREAM == true ]]; then WANT="via AttendBackwardStream"; else WANT="via AttendBackward (unary)"; fi
  grep -q "$WANT" <<<"$OUT" || fail "the backward bench did not say it went $WANT"
done
echo "bench_service: PASS"
