#!/usr/bin/env bash
# SIGTERM drains: starts `ringattn serve` with 2 CPU workers, sends a request that computes for
# a while, SIGTERMs the server while it runs, and checks that the request was answered (its
# correctness through a drain is service_test's ServiceOps.Drain*), that the server said it
# drained, and that it exited 0.
# Usage: serve_drain.sh /path/to/ringattn
set -u

BIN=${1:?usage: bench_service.sh /path/to/ringattn}
LOG=$(mktemp -t serve_drain.XXXXXX.log)
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

ATTEND_LOG=$(mktemp -t serve_drain_attend.XXXXXX.log)
"$BIN" attend --target="127.0.0.1:$PORT" --seqlen=4096 --heads=8 --head_dim=128 --dtype=bf16 \
  --check=false --timeout=120 >"$ATTEND_LOG" 2>&1 &
ATTEND_PID=$!
sleep 1
kill -0 "$ATTEND_PID" 2>/dev/null || fail "the request ended before the SIGTERM: make it longer"
kill -TERM "$SERVER_PID"
wait "$ATTEND_PID"
ATTEND_RC=$?
cat "$ATTEND_LOG"
[[ $ATTEND_RC == 0 ]] || fail "the request in flight at SIGTERM failed (rc $ATTEND_RC)"
grep -qF "out [1, 4096, 8, 128] bf16:" "$ATTEND_LOG" || fail "no output for the request in flight"
grep -qF "(NaN: 0, Inf: 0)" "$ATTEND_LOG" || fail "NaN or Inf in the output of the request in flight"
wait "$SERVER_PID"
SERVER_RC=$?
SERVER_PID=""
grep -q "drained; shutting down" "$LOG" || fail "the server did not report a drain"
[[ $SERVER_RC == 0 ]] || fail "the server exited with $SERVER_RC"
rm -f "$ATTEND_LOG"
echo "PASS: the request in flight at SIGTERM was answered; the server drained"
