#!/usr/bin/env bash
# Every run behind BENCHMARKS.md, one after the other, each report as JSON in bench/results/
# (the chart's input), then the chart. Run from the repository root on an idle machine:
#
#   cargo build --release --features redis && scripts/bench-all.sh
#
# (At the workspace root that builds the service and the load generator, widgets-bench,
# side by side in target/release; WIDGETS_BIN and WIDGETS_BENCH_BIN pick other builds.)
#
# Needs PostgreSQL (DATABASE_URL, default postgres://postgres@127.0.0.1:5432/postgres: the
# runs create and drop throwaway databases there) and Redis (REDIS_URL, default
# redis://127.0.0.1:6379; keys go under a prefix of their own). Takes about fifteen minutes.
set -euo pipefail

bench=${WIDGETS_BENCH_BIN:-target/release/widgets-bench}
server=${WIDGETS_BIN:-target/release/widgets}
pg=${DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres}
redis=${REDIS_URL:-redis://127.0.0.1:6379}
out=bench/results
mkdir -p "$out"

# Association PUTs only, 100,000 widgets, fsync always (the bench's default).
puts=(--widgets 100000 --duration 20s --ceiling-secs 5 --mix put=100 --json)

run() {
    local name=$1
    shift
    echo "== $name: $bench $*" >&2
    "$bench" --server-bin "$server" "$@" >"$out/$name.json"
}

run 1-embedded-c64 "${puts[@]}" --concurrency 64 --database-url=
run 2-embedded-c256 "${puts[@]}" --concurrency 256 --database-url=
run 3-postgres-c64 "${puts[@]}" --concurrency 64 --database-url "$pg"
run 4-redis-c64 "${puts[@]}" --concurrency 64 --database-url "$pg" \
    --server-arg=--redis-url="$redis" --server-arg=--redis-prefix="bench-$$:"
# The fixed-rate target: 20,000 updates/s for 60 s on PostgreSQL, latency from each
# request's intended send time.
run 5-postgres-20k-rate --widgets 100000 --duration 60s --ceiling-secs 5 --mix put=100 --json \
    --concurrency 64 --rate 20000 --database-url "$pg"

# Issue 13's run: 1,000,000 widgets, durable PUTs offered at 10,000/s, the embedded store
# writing behind, with the axum JSON echo as the reference for the server's CPU per request.
run 6-embedded-1m-10k-rate --widgets 1000000 --duration 60s --ceiling-secs 5 --echo-secs 10 \
    --mix put=100 --json --concurrency 64 --rate 10000 --database-url=

# Redis mode leaves its keys under the run's prefix.
if command -v redis-cli >/dev/null; then
    redis-cli -u "$redis" --scan --pattern "bench-$$:*" | xargs -r -n 1000 redis-cli -u "$redis" del >/dev/null
fi

# The chart needs the versions scripts/requirements.txt pins; .ci/run installs them in .venv-ci/.
py=python3
[ -x .venv-ci/bin/python ] && py=.venv-ci/bin/python
"$py" scripts/chart.py "$out" --out bench/chart.svg
echo "wrote $out/*.json and bench/chart.svg" >&2
