#!/usr/bin/env bash
# The peer comparison of issue 13's third target: Redis 7 with `appendfsync always` running
# the service's association re-plug as one Lua script, driven by redis-benchmark from 64
# connections, beside the service's own closed loop on the same number of widgets. Run
# from the repository root on an idle machine, after `cargo build --release`:
#
#   scripts/redis-peer.sh                # 1,000,000 widgets, 64 connections
#   WIDGETS=100000 scripts/redis-peer.sh
#
# Starts a throwaway redis-server (its append-only file in a temporary directory) on a
# free port, fills it with WIDGETS widgets, runs the re-plug for REDIS_SECS seconds' worth
# of requests, then the service's closed loop (widgets-bench, PUTs only, its HTTP ceiling
# beside it), and prints the three rates; with OUT=DIR, keeps both reports there
# (redis.csv, widgets.json). Needs redis-server and redis-benchmark (7.x).
set -euo pipefail

widgets=${WIDGETS:-1000000}
connections=${CONNECTIONS:-64}
requests=${REDIS_REQUESTS:-600000}
duration=${DURATION:-30s}
bench=${WIDGETS_BENCH_BIN:-target/release/widgets-bench}
server=${WIDGETS_BIN:-target/release/widgets}

dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
cleanup() {
    redis-cli -p "$port" shutdown nosave >/dev/null 2>&1 || true
    rm -rf "$dir"
}
trap cleanup EXIT

redis-server --port "$port" --bind 127.0.0.1 --dir "$dir" --save "" \
    --appendonly yes --appendfsync always --daemonize yes --logfile "$dir/redis.log"
until redis-cli -p "$port" ping >/dev/null 2>&1; do sleep 0.1; done

# Widget i is the hash w:<i as 12 digits> (redis-benchmark writes __rand_int__ so) with
# its name, and its ports P, R, Q free (absent fields).
redis-cli -p "$port" eval "
for i = 0, tonumber(ARGV[1]) - 1 do
    redis.call('HSET', string.format('w:%012d', i), 'name', 'bench')
end
return 1" 0 "$widgets" >/dev/null

# The re-plug of PUT /widgets/associations: both widgets must exist; a widget cannot be
# plugged into itself; each side's old peer is freed; then the two are plugged together
# and the change counted, all in one atomic step. Refusals answer -1 (redis-benchmark
# stops at an error reply).
replug='
local a, b, port = KEYS[1], KEYS[2], ARGV[1]
if a == b then return -1 end
if redis.call("EXISTS", a) == 0 or redis.call("EXISTS", b) == 0 then return -1 end
local old_a = redis.call("HGET", a, port)
if old_a == b then return 0 end
local old_b = redis.call("HGET", b, port)
if old_a then redis.call("HDEL", old_a, port) end
if old_b then redis.call("HDEL", old_b, port) end
redis.call("HSET", a, port, b)
redis.call("HSET", b, port, a)
redis.call("INCR", "seq")
return 1'
sha=$(redis-cli -p "$port" script load "$replug")

echo "== Redis $(redis-server --version | grep -o 'v=[0-9.]*'), appendfsync always, $widgets widgets, $connections connections" >&2
# -r draws each __rand_int__ from 0..widgets-1, separately for each occurrence.
redis-benchmark -p "$port" -c "$connections" -n "$requests" -r "$widgets" --csv \
    evalsha "$sha" 2 "w:__rand_int__" "w:__rand_int__" P | tail -1 | tee "$dir/redis.csv"
redis_rps=$(cut -d, -f2 "$dir/redis.csv" | tr -d '"')
redis-cli -p "$port" info persistence | grep -q '^aof_enabled:1' ||
    { echo "the append-only file was off: the comparison would be void" >&2; exit 1; }

echo "== widgets, closed loop, PUTs only, $widgets widgets, $connections connections" >&2
"$bench" --server-bin "$server" --widgets "$widgets" --concurrency "$connections" \
    --duration "$duration" --ceiling-secs 10 --echo-secs 10 --mix put=1 --database-url= \
    --json >"$dir/widgets.json"
python3 - "$dir/widgets.json" "$redis_rps" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
redis = float(sys.argv[2])
puts, ceiling = r["load"]["throughput"], r["ceiling"]["throughput"]
print(f"widgets durable PUTs/s     {puts:10.0f}")
print(f"widgets GET /healthz/s     {ceiling:10.0f}   PUTs / ceiling {puts / ceiling:.0%}")
print(f"Redis re-plug (always)/s   {redis:10.0f}   PUTs / Redis   {puts / redis:.2f}x")
PY
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$dir/redis.csv" "$dir/widgets.json" "$OUT/"
fi
