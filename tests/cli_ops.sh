#!/usr/bin/env bash
# The command line as operators meet it: help (exit 0, only the command's flags, no build
# paths), --version, a flag of another command refused (exit 2), the exit codes of an RPC that
# cannot connect (3), of one refused (4), of a port in use (6), environment variables
# (RINGATTN_LOG_FORMAT=json on serve: every line JSON, with the request's line and its trace in
# the coordinator's and the workers' lines), and a bad variable (2).
# Usage: cli_ops.sh /path/to/ringattn
set -u

BIN=${1:?usage: cli_ops.sh /path/to/ringattn}
LOG=$(mktemp -t cli_ops.XXXXXX.log)
source "$(dirname "$0")/serve_helpers.sh"
SOURCE_DIR=$(cd "$(dirname "$0")/.." && pwd)

# expect_rc WANT DESCRIPTION -- COMMAND...: runs it, output in OUT.
expect_rc() {
  local want=$1 what=$2
  shift 3
  OUT=$("$@" 2>&1)
  local rc=$?
  [[ $rc == "$want" ]] || fail "$what: exit $rc, expected $want; output:
$OUT"
}

# Help: exit 0, the command's own flags only, no source paths.
for HELP in "help bench" "bench --help" "bench -h"; do
  expect_rc 0 "ringattn $HELP" -- "$BIN" $HELP
  grep -q -- "--concurrency (" <<<"$OUT" || fail "ringattn $HELP does not list --concurrency"
  grep -q -- "--window_left" <<<"$OUT" && fail "ringattn $HELP lists --window_left (attend's)"
  grep -qE "$SOURCE_DIR|\.cc\b" <<<"$OUT" && fail "ringattn $HELP shows source paths"
done
expect_rc 0 "ringattn help serve" -- "$BIN" help serve
grep -q -- "--workers (workers in the ring); default: 3; env: RINGATTN_WORKERS;" <<<"$OUT" ||
  fail "serve's help does not give --workers its default and variable"
expect_rc 0 "ringattn --help" -- "$BIN" --help
grep -q "^  coordinator " <<<"$OUT" || fail "the overview does not list the commands"
grep -q "exit codes: 0 ok" <<<"$OUT" || fail "the overview does not list the exit codes"

# Version: the project's, never a debug marker.
expect_rc 0 "ringattn --version" -- "$BIN" --version
grep -qE "^ringattn [0-9]+\.[0-9]+\.[0-9]+" <<<"$OUT" || fail "--version: no version: $OUT"
grep -qi "debug build" <<<"$OUT" && fail "--version says debug build: $OUT"

# Usage errors: exit 2 and a message naming the problem.
expect_rc 2 "bench --window_left" -- "$BIN" bench --window_left=3
grep -q -- "--window_left is not a flag of \`ringattn bench\`; it is one of serve, attend, ring" \
  <<<"$OUT" || fail "bench --window_left: unclear message: $OUT"
expect_rc 2 "an unknown command" -- "$BIN" serev
expect_rc 2 "an unknown flag" -- "$BIN" attend --tagret=x
expect_rc 2 "serve --seqlen without --demo" -- "$BIN" serve --seqlen=100
grep -q "add --demo" <<<"$OUT" || fail "serve --seqlen: unclear message: $OUT"
expect_rc 2 "a bad variable" -- env RINGATTN_WORKERS=many "$BIN" serve
grep -q "RINGATTN_WORKERS" <<<"$OUT" || fail "a bad RINGATTN_WORKERS is not named: $OUT"
export RINGATTN_CLUSTER_SECRET=cli-ops-test-secret-0123456789
expect_rc 2 "a bad --log_format" -- "$BIN" worker --coordinator=127.0.0.1:1 --log_format=xml
grep -q -- "--log_format must be text or json" <<<"$OUT" || fail "a bad --log_format: $OUT"

# No server there: UNAVAILABLE, exit 3.
NOBODY=$(free_port)
expect_rc 3 "attend to a closed port" -- "$BIN" attend --target="127.0.0.1:$NOBODY" --seqlen=16 \
  --timeout=1

# The service, configured through the environment: JSON lines.
export RINGATTN_LOG_FORMAT=json
start_server
unset RINGATTN_LOG_FORMAT
grep -v '^{"ts":"' "$LOG" | grep . && fail "serve with RINGATTN_LOG_FORMAT=json wrote non-JSON lines"

PROBLEM=(--seqlen=40 --heads=4 --heads_k=2 --head_dim=64 --dtype=fp32 --causal --timeout=60)
expect_rc 0 "attend" -- "$BIN" attend --target="127.0.0.1:$PORT" "${PROBLEM[@]}"
ID=$(grep -oE "request id req-[0-9]+" <<<"$OUT" | cut -d' ' -f3)
[[ -n $ID ]] || fail "attend printed no request id: $OUT"
LINE=$(grep "\"component\":\"request\"" "$LOG" | grep "\"request_id\":\"$ID\"")
[[ -n $LINE ]] || fail "no request line for $ID"
TRACE=$(grep -oE '"trace_id":"[0-9a-f]{32}"' <<<"$LINE")
[[ -n $TRACE ]] || fail "the request line has no trace id: $LINE"
grep -q '"rpc":"Attend","code":"OK"' <<<"$LINE" || fail "the request line: $LINE"
grep -q '"shape":"1x40x4x64","heads_k":2,"dtype":"fp32"' <<<"$LINE" || fail "no shape: $LINE"
[[ $(grep '"msg":"shard"' "$LOG" | grep "\"request_id\":\"$ID\"" | grep -c "$TRACE") == 2 ]] ||
  fail "the two workers did not log the request's trace"

# Refused by the service: INVALID_ARGUMENT, exit 4.
expect_rc 4 "attend --head_dim=7" -- "$BIN" attend --target="127.0.0.1:$PORT" --seqlen=16 \
  --head_dim=7
# A second server on the same port: exit 6, naming it.
expect_rc 6 "serve on a port in use" -- "$BIN" serve --workers=1 --listen="127.0.0.1:$PORT" \
  --metrics=
grep -q "cannot listen on 127.0.0.1:$PORT" <<<"$OUT" || fail "serve on a busy port: $OUT"
expect_rc 6 "a worker on a port in use" -- "$BIN" worker --coordinator=127.0.0.1:1 \
  --worker_listen="127.0.0.1:$PORT"
echo "PASS: help, version, usage errors, exit codes, environment, JSON request lines, busy ports"
