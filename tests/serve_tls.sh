#!/usr/bin/env bash
# The trust flags through the binary: `ringattn serve` with TLS on the public API, bearer
# tokens and mTLS on the internal plane (its local workers get the internal flags); `attend`
# with --tls_ca and --token_file answers right (--check), without a token it is refused
# UNAUTHENTICATED, the token from RINGATTN_TOKEN works, and `bench` runs over TLS with a token.
# Certificates come from make_test_certs.sh (exit 77, a skip, without openssl).
# Usage: serve_tls.sh /path/to/ringattn
set -u

BIN=${1:?usage: serve_tls.sh /path/to/ringattn}
LOG=$(mktemp -t serve_tls.XXXXXX.log)
CERTS=$(mktemp -d -t serve_tls_certs.XXXXXX)
source "$(dirname "$0")/serve_helpers.sh"
trap 'cleanup; rm -rf "$CERTS"' EXIT
"$(dirname "$0")/make_test_certs.sh" "$CERTS"
RC=$?
if [[ $RC == 77 ]]; then echo "SKIP: openssl not found (needed for the certificates)"; exit 77; fi
[[ $RC == 0 ]] || fail "make_test_certs.sh failed ($RC)"
printf 'alice-token-0123456789 alice\n' > "$CERTS/tokens"
printf 'alice-token-0123456789\n' > "$CERTS/alice.token"

start_server --tls_cert="$CERTS/server.pem" --tls_key="$CERTS/server.key" \
  --api_tokens_file="$CERTS/tokens" --internal_tls_cert="$CERTS/server.pem" \
  --internal_tls_key="$CERTS/server.key" --internal_tls_ca="$CERTS/ca.pem"
grep -q "(TLS) (bearer tokens) (internal plane on port [0-9]*, mTLS)" "$LOG" ||
  fail "serve did not report TLS, tokens and internal mTLS"

PROBLEM=(--seqlen=100 --heads=4 --heads_k=2 --head_dim=64 --dtype=fp32 --causal --timeout=60)
OUT=$("$BIN" attend --target="127.0.0.1:$PORT" --tls_ca="$CERTS/ca.pem" \
      --token_file="$CERTS/alice.token" "${PROBLEM[@]}" --check 2>&1)
echo "$OUT"
grep -q "check: PASS" <<<"$OUT" || fail "attend over TLS with a token did not pass its check"

OUT=$("$BIN" attend --target="127.0.0.1:$PORT" --tls_ca="$CERTS/ca.pem" "${PROBLEM[@]}" 2>&1)
RC=$?
echo "$OUT"
[[ $RC != 0 ]] || fail "attend without a token succeeded"
grep -q "UNAUTHENTICATED: this service needs a bearer token" <<<"$OUT" ||
  fail "attend without a token was not refused UNAUTHENTICATED"

OUT=$(RINGATTN_TOKEN=alice-token-0123456789 "$BIN" bench --target="127.0.0.1:$PORT" \
      --tls_ca="$CERTS/ca.pem" --concurrency=2 --requests=4 "${PROBLEM[@]}" 2>&1)
RC=$?
echo "$OUT"
[[ $RC == 0 ]] || fail "bench over TLS with RINGATTN_TOKEN exited with $RC"
grep -q "4 sent, 4 ok, 0 failed" <<<"$OUT" || fail "the bench did not report 4 ok"
echo "serve_tls: PASS"
