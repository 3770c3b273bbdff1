#!/usr/bin/env bash
# SIGTERM drains: starts `ringattn serve` with 2 CPU workers, sends a request that computes for
# a while, SIGTERMs the server while it runs, and checks that the request was answered (its
# correctness through a drain is service_test's ServiceOps.Drain*), that the server said it
# drained, and that it exited 0.
# Usage: serve_drain.sh /path/to/ringattn
set -u

BIN=${1:?usage: serve_drain.sh /path/to/ringattn}
LOG=$(mktemp -t serve_drain.XXXXXX.log)
source "$(dirname "$0")/serve_helpers.sh"
start_server

# Long enough (several seconds on two cores) to be in flight at the SIGTERM a second later.
ATTEND_LOG=$(mktemp -t serve_drain_attend.XXXXXX.log)
"$BIN" attend --target="127.0.0.1:$PORT" --seqlen=12288 --heads=8 --head_dim=128 --dtype=bf16 \
  --check=false --timeout=120 >"$ATTEND_LOG" 2>&1 &
ATTEND_PID=$!
sleep 1
kill -0 "$ATTEND_PID" 2>/dev/null || fail "the request ended before the SIGTERM: make it longer"
kill -TERM "$SERVER_PID"
wait "$ATTEND_PID"
ATTEND_RC=$?
cat "$ATTEND_LOG"
[[ $ATTEND_RC == 0 ]] || fail "the request in flight at SIGTERM failed (rc $ATTEND_RC)"
grep -qF "out [1, 12288, 8, 128] bf16:" "$ATTEND_LOG" || fail "no output for the request in flight"
grep -qF "(NaN: 0, Inf: 0)" "$ATTEND_LOG" || fail "NaN or Inf in the output of the request in flight"
wait "$SERVER_PID"
SERVER_RC=$?
SERVER_PID=""
grep -q "drained; shutting down" "$LOG" || fail "the server did not report a drain"
[[ $SERVER_RC == 0 ]] || fail "the server exited with $SERVER_RC"
rm -f "$ATTEND_LOG"
echo "PASS: the request in flight at SIGTERM was answered; the server drained"
