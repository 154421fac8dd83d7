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
# and per request of the bench's creates and PUTs (the few health, readiness and metrics
# requests around them count in the total but not as requests); with KEEP=FILE, keeps callgrind's output there for callgrind_annotate.
# Needs valgrind.
set -euo pipefail

server=${1:-target/release/widgets}
bench=${WIDGETS_BENCH_BIN:-target/release/widgets-bench}

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
pid=
cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; fi
    if [ -n "${KEEP:-}" ]; then cp "$dir/callgrind.out" "$KEEP" || true; fi
    rm -rf "$dir"
}
trap cleanup EXIT

connections='widgets::serve::serve::{{closure}}::{{closure}}'
sequencer='widgets::engine::memory::sequencer::Sequencer::run'
env -u DATABASE_URL -u REDIS_URL valgrind --tool=callgrind --collect-atstart=no \
    --callgrind-out-file="$dir/callgrind.out" \
    --toggle-collect="$connections" --toggle-collect="$sequencer" \
    "$server" --listen "127.0.0.1:$port" --data-dir "$dir/data" --fsync never \
    --wal-preallocate false --database-url= --redis-url= >"$dir/server.log" 2>&1 &
pid=$!
up=
for _ in $(seq 1 120); do
    if curl -sf -o /dev/null "http://127.0.0.1:$port/healthz"; then up=1; break; fi
    if ! kill -0 "$pid" 2>/dev/null; then break; fi
    sleep 1
done
if [ -z "$up" ]; then
    cat "$dir/server.log" >&2
    echo "the service did not come up under valgrind" >&2
    exit 1
fi

"$bench" --url "http://127.0.0.1:$port" --database-url= --widgets 2000 --duration 20s --rate 300 \
    --concurrency 8 --mix put=1 --ceiling-secs 0 --echo-secs 0 --json >"$dir/bench.json"
kill -INT "$pid"
wait "$pid" || true
pid=

requests=$(python3 -c 'import json, sys; r = json.load(open(sys.argv[1])); print(r["create"]["requests"] + r["load"]["requests"])' "$dir/bench.json")
# callgrind_annotate lists a function once per source file it names for it; the entry of
# the function's own file holds all it did. Only the two toggled places are counted, so
# their two counts must add up to the program's total, which is checked.
callgrind_annotate --inclusive=yes --threshold=100 "$dir/callgrind.out" 2>/dev/null | python3 -c '
import sys
requests = int(sys.argv[1])
names = {"connection tasks": sys.argv[2], "sequencer": sys.argv[3]}
found = {}
total = None
for line in sys.stdin:
    if line.rstrip().endswith("PROGRAM TOTALS"):
        total = int(line.split()[0].replace(",", ""))
    for label, name in names.items():
        rest = line.rstrip().split(":" + name, 1)
        if len(rest) == 2 and (rest[1] == "" or rest[1].startswith(" [")):
            count = int(line.split()[0].replace(",", ""))
            found[label] = max(found.get(label, 0), count)
print(f"{requests} requests (the creates and the PUTs)")
for label in names:
    count = found.get(label)
    if count is None:
        sys.exit(f"no count for the {label}: was {names[label]} renamed?")
    print(f"{label}: {count:,} instructions, {count // requests:,} a request")
both = sum(found.values())
if total is None or abs(both - total) > total // 100:
    sys.exit(f"the two counts add up to {both:,}, not the total of {total}")
' "$requests" "$connections" "$sequencer"
