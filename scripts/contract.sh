#!/usr/bin/env bash
# The outside contract test: schemathesis, driven by nothing but the service's own OpenAPI
# document (GET /openapi.json), against the real binary on the embedded store, with every
# check (`--checks all`) and a fixed seed, in each auth setting:
#   1. no token (the default);
#   2. tokens set, reads and /metrics protected too, schemathesis sending one of them (and
#      its auth checks sending none and a wrong one).
# Each run is bounded by CONTRACT_MAX_EXAMPLES cases per operation (so that, with the
# seed, every run sends the same requests), and cut off after CONTRACT_TIMEOUT seconds. Needs schemathesis at scripts/contract-requirements.txt's versions in
# .venv-contract/ (.ci/run installs it) or at $SCHEMATHESIS.
#
#   scripts/contract.sh            # builds the debug binary first
#   WIDGETS_BIN=target/release/widgets scripts/contract.sh
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

max_examples=${CONTRACT_MAX_EXAMPLES:-150}
timeout=${CONTRACT_TIMEOUT:-120}
schemathesis=${SCHEMATHESIS:-$root/.venv-contract/bin/schemathesis}
if [ ! -x "$schemathesis" ]; then
  echo "scripts/contract.sh: no schemathesis at $schemathesis; install it with" >&2
  echo "  python3 -m venv .venv-contract && .venv-contract/bin/pip install --only-binary=:all: -r scripts/contract-requirements.txt" >&2
  exit 1
fi
python=$(dirname "$schemathesis")/python

if [ -z "${WIDGETS_BIN:-}" ]; then
  cargo build --quiet --bin widgets
  WIDGETS_BIN=${CARGO_TARGET_DIR:-target}/debug/widgets
fi

work=$(mktemp -d)
server_pid=
cleanup() {
  if [ -n "$server_pid" ]; then
    kill "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT

# Starts the binary on a free port with a fresh data directory and the given settings;
# sets $base once /readyz answers 200.
start() {
  local data log
  data=$(mktemp -d "$work/data.XXXX")
  log=$data.log
  "$WIDGETS_BIN" --listen 127.0.0.1:0 --data-dir "$data" --database-url= --redis-url= \
    --log-format text "$@" 2>"$log" &
  server_pid=$!
  base=
  for _ in $(seq 300); do
    base=$(sed -n 's/.*listening.* addr=\([0-9.:]*\).*/http:\/\/\1/p' "$log" | head -1)
    [ -n "$base" ] && "$python" - "$base/readyz" <<'PY' && return 0
import sys, urllib.request
try:
    sys.exit(0 if urllib.request.urlopen(sys.argv[1], timeout=1).status == 200 else 1)
except Exception:
    sys.exit(1)
PY
    kill -0 "$server_pid" 2>/dev/null || break
    sleep 0.1
  done
  echo "scripts/contract.sh: the service did not become ready; its log:" >&2
  cat "$log" >&2
  exit 1
}

stop() {
  kill "$server_pid"
  wait "$server_pid" || true
  server_pid=
}

# The peer the body examples name (`321`, every port), so that an example association,
# and one a stateful scenario draws from the examples, can succeed.
seed_peer() {
  "$python" - "$base/widgets" "$@" <<'PY'
import json, sys, urllib.request
request = urllib.request.Request(
    sys.argv[1],
    data=json.dumps({"name": "peer", "serial_number": "321", "ports": ["P", "R", "Q"]}).encode(),
    headers=dict(h.split(": ", 1) for h in sys.argv[2:]),
    method="POST",
)
assert urllib.request.urlopen(request, timeout=5).status == 201
PY
}

# schemathesis in a scratch directory: its caches start empty, so a run depends on the
# seed alone.
run_schemathesis() {
  (cd "$work" && timeout "$timeout" "$schemathesis" \
    --config-file "$root/scripts/schemathesis.toml" run "$base/openapi.json" \
    --checks all --max-examples "$max_examples" --workers 1 "$@")
}

echo "== contract: no token"
start
seed_peer
run_schemathesis
stop

echo "== contract: bearer tokens, reads and /metrics protected"
token=contract-$RANDOM$RANDOM
start --auth-token "old-token,$token" --auth-reads --auth-metrics
seed_peer "Authorization: Bearer $token"
run_schemathesis --header "Authorization: Bearer $token"
stop
