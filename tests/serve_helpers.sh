# Shared by the shell integration tests that drive `ringattn serve` (source it after setting BIN
# and LOG): cleanup on exit, fail with the server log, and start_server, which starts serve with
# 2 CPU workers on a free loopback port (PORT, SERVER_PID) and waits for the ring; its arguments
# go to serve.

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

start_server() {
  # The port may be taken between picking it and binding it: retry a few times.
  local attempt ready=0
  for attempt in 1 2 3; do
    PORT=$(free_port) || fail "cannot pick a free port"
    : > "$LOG"
    "$BIN" serve --workers=2 --listen="127.0.0.1:$PORT" --metrics= "$@" >"$LOG" 2>&1 &
    SERVER_PID=$!
    for _ in $(seq 600); do  # up to 60 s
      if grep -q "workers ready" "$LOG"; then ready=1; break; fi
      kill -0 "$SERVER_PID" 2>/dev/null || break
      sleep 0.1
    done
    [[ $ready == 1 ]] && return 0
    kill -TERM "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null; SERVER_PID=""
    echo "attempt $attempt: the server did not become ready on port $PORT" >&2
    cat "$LOG" >&2
  done
  fail "the server did not become ready"
}
