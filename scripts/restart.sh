#!/usr/bin/env bash
# Start-up time and memory at scale: seeds a store with `widgets bench-seed` (unless it is
# seeded already), starts the service on it, and prints how long it took to answer
# /readyz with 200, what the log says about loading and WAL replay, and the server's RSS.
#
#   scripts/restart.sh sled DATA_DIR [WIDGETS]            # the embedded store in DATA_DIR
#   scripts/restart.sh postgres DATABASE_URL [WIDGETS]    # PostgreSQL (DATA_DIR is a temp dir)
#
# WIDGETS defaults to 10000000. Set WIDGETS_BIN to use another binary than
# target/release/widgets (build it first: cargo build --release).
#
# LOAD_SECS=60 then runs widgets-bench against the started server for that long (BENCH_BIN,
# default target/release/widgets-bench; BENCH_ARGS adds flags) and prints the server's
# peak RSS during the load, its RSS at the end and again SETTLE_SECS later.
set -euo pipefail

mode=${1:?usage: restart.sh sled DATA_DIR [WIDGETS] | restart.sh postgres DATABASE_URL [WIDGETS]}
where=${2:?a data directory (sled) or a database URL (postgres)}
widgets=${3:-10000000}
bin=${WIDGETS_BIN:-target/release/widgets}
bench_bin=${BENCH_BIN:-target/release/widgets-bench}
port=${PORT:-18480}

case "$mode" in
sled)
    data_dir=$where
    store_args=(--database-url=)
    start_args=()
    seeded() { [ -d "$data_dir/store" ]; }
    ;;
postgres)
    data_dir=$(mktemp -d)
    scratch_dir=$data_dir
    trap 'rm -rf "$scratch_dir"' EXIT
    store_args=(--database-url "$where")
    # Each run's WAL is in a new scratch directory, never the one that last wrote to
    # the database (the run before flushed everything when it was stopped).
    start_args=(--accept-mismatched-wal)
    seeded() { [ "$(psql "$where" -Atc 'select count(*) > 0 from widgets' 2>/dev/null)" = t ]; }
    ;;
*)
    echo "restart.sh: unknown mode $mode (sled or postgres)" >&2
    exit 2
    ;;
esac

if ! seeded; then
    echo "seeding $widgets widgets..." >&2
    start=$(date +%s.%N)
    "$bin" --data-dir "$data_dir" "${store_args[@]}" bench-seed --widgets "$widgets"
    echo "seeded in $(echo "$(date +%s.%N) - $start" | bc) s" >&2
fi

log=$(mktemp)
start=$(date +%s.%N)
RUST_LOG=info "$bin" --listen "127.0.0.1:$port" --data-dir "$data_dir" --redis-url= \
    "${store_args[@]}" "${start_args[@]}" 2>"$log" &
pid=$!
# Every step may fail (the server is usually gone by now): the script's status is its own.
trap 'kill $pid 2>/dev/null || true; wait $pid 2>/dev/null || true; rm -f "$log"; rm -rf "${scratch_dir:-}"' EXIT
until curl -sf "http://127.0.0.1:$port/readyz" >/dev/null; do
    if ! kill -0 $pid 2>/dev/null; then
        cat "$log" >&2
        echo "restart.sh: the service exited" >&2
        exit 1
    fi
    sleep 0.05
done
ready=$(echo "$(date +%s.%N) - $start" | bc)
rss_kib=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
# Again once the allocator has had time to hand back what loading freed.
sleep "${SETTLE_SECS:-10}"
settled_kib=$(awk '/VmRSS/ {print $2}' "/proc/$pid/status")
echo "mode=$mode widgets=$widgets ready_secs=$ready rss_mib_at_ready=$((rss_kib / 1024)) rss_mib=$((settled_kib / 1024)) bytes_per_widget=$((settled_kib * 1024 / widgets))"
grep -E "store loaded widgets|WAL replayed" "$log" | sed 's/\x1b\[[0-9;]*m//g'

if [ "${LOAD_SECS:-0}" -gt 0 ]; then
    rss() { awk '/VmRSS/ {print int($2 / 1024)}' "/proc/$pid/status"; }
    peak=$(rss)
    # shellcheck disable=SC2086 # BENCH_ARGS is split into flags on purpose
    "$bench_bin" --url "http://127.0.0.1:$port" --duration "${LOAD_SECS}s" \
        --ceiling-secs 0 --echo-secs 0 ${BENCH_ARGS:-} >&2 &
    bench=$!
    while kill -0 $bench 2>/dev/null; do
        now=$(rss)
        [ "$now" -gt "$peak" ] && peak=$now
        sleep 1
    done
    wait $bench
    loaded=$(rss)
    sleep "${SETTLE_SECS:-10}"
    echo "load_secs=$LOAD_SECS rss_mib_peak=$peak rss_mib_after_load=$loaded rss_mib_settled=$(rss)"
fi
kill -TERM $pid
wait $pid || true
