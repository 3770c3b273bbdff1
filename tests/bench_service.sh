#!/usr/bin/env bash
# Integration test of `ringattn bench`: starts `ringattn serve` with 2 CPU workers on a free
# loopback port, runs a small bench against it and checks that all 12 requests succeeded; then
# a bench of gradient calls (--backward), unary and streamed.
# Usage: bench_service.sh /path/to/ringattn
set -u

BIN=${1:?usage: bench_service.sh /path/to/ringattn}
LOG=$(mktemp -t bench_service.XXXXXX.log)
SERVER_PID=""

cleanup() {
  if [[ -n "$SERVER_PID" ]] && kill -0 "$SERVER_PID" 2>/dev/null; then
    kill -TERM "$SERVER_PID" 2>/dev/null
    for _ in $(seq 50); do kill -0 "$SERVER_PID" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$SERVER_PID" 2>/dev/null
    wait "$SERVER_PID" 2>/dev/null
  fi
  rm -f "$LOG"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*" >&2
  echo "--- server log ---" >&2
  cat "$LOG" >&2
  exit 1
}

free_port() {
  python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); \
    print(s.getsockname()[1])"
}

# The port may be taken between picking it and binding it: retry a few times.
for attempt in 1 2 3; do
  PORT=$(free_port) || fail "cannot pick a free port"
  : > "$LOG"
  "$BIN" serve --workers=2 --listen="127.0.0.1:$PORT" --metrics= >"$LOG" 2>&1 &
  SERVER_PID=$!
  READY=0
  for _ in $(seq 600); do  # up to 60 s
    if grep -q "workers ready" "$LOG"; then READY=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 0.1
  done
  [[ $READY == 1 ]] && break
  kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
  echo "attempt $attempt: the server did not become ready on port $PORT" >&2
  cat "$LOG" >&2
done
[[ $READY == 1 ]] || fail "the server did not become ready"

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
