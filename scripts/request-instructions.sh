#!/usr/bin/env bash
# Instructions the service spends on its request path, counted by valgrind's callgrind:
# a figure that, unlike CPU time on a shared virtual machine, comes out the same within a
# percent or two from one run to the next, so that two builds can be told apart by a few
# percent. Run from the repository root after `cargo build --release --workspace`:
#
#   scripts/request-instructions.sh                       # target/release/widgets
#   scripts/request-instructions.sh path/to/other/widgets # an older build, to compare
#
# Starts the service under callgrind on the embedded store in a temporary directory, with
# `--fsync never` (the disk's time is not the question here), and drives it with
# widgets-bench: 2,000 widgets created, then 20 s of association PUTs at 300 a second on
# 8 connections. It counts only two places: the connection tasks (everything a request
# costs on the async workers: HTTP, routing, middleware, parsing, the answer) and the
# sequencer thread (rules, WAL records, publishing, answering). It prints each, in all
# and per request; with KEEP=FILE, keeps callgrind's output there for callgrind_annotate.
# Needs valgrind.
set -euo pipefail

server=${1:-target/release/widgets}
bench=${WIDGETS_BENCH_BIN:-target/release/widgets-bench}

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    if [ -n "${KEEP:-}" ]; then cp "$dir/callgrind.out" "$KEEP"; fi
    rm -rf "$dir"
}
trap cleanup EXIT

connections='widgets::serve::serve::{{closure}}::{{closure}}'
sequencer='widgets::engine::memory::sequencer::Sequencer::run'
env -u DATABASE_URL -u REDIS_URL valgrind --tool=callgrind --collect-atstart=no \
    --callgrind-out-file="$dir/callgrind.out" \
    --toggle-collect="$connections" --toggle-collect="$sequencer" \
    "$server" --listen "127.0.0.1:$port" --data-dir "$dir/data" --fsync never \
    --wal-preallocate false >"$dir/server.log" 2>&1 &
pid=$!
for _ in $(seq 1 120); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/healthz"; then break; fi
    sleep 1
done

"$bench" --url "http://127.0.0.1:$port" --widgets 2000 --duration 20s --rate 300 \
    --concurrency 8 --mix put=1 --ceiling-secs 0 --echo-secs 0 --json >"$dir/bench.json"
kill -INT "$pid"
wait "$pid" || true
pid=

requests=$(python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["load"]["requests"] + 2000)' "$dir/bench.json")
callgrind_annotate --inclusive=yes "$dir/callgrind.out" 2>/dev/null | python3 -c '
import sys
requests = int(sys.argv[1])
names = {"connection tasks": sys.argv[2], "sequencer": sys.argv[3]}
found = {}
for line in sys.stdin:
    for label, name in names.items():
        # A function is listed once per source file inlined into it; the largest count is
        # the function with all it called.
        rest = line.rstrip().split(":" + name, 1)
        if len(rest) == 2 and (rest[1] == "" or rest[1].startswith(" [")):
            count = int(line.split()[0].replace(",", ""))
            found[label] = max(found.get(label, 0), count)
print(f"{requests} requests (2,000 creates and the PUTs)")
for label in names:
    total = found.get(label)
    if total is None:
        sys.exit(f"no count for the {label}: was {names[label]} renamed?")
    print(f"{label}: {total:,} instructions, {total // requests:,} a request")
' "$requests" "$connections" "$sequencer"
