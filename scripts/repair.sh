#!/usr/bin/env bash
# What bringing a PostgreSQL gone back in time in line costs in Redis mode (README, "When
# PostgreSQL goes back in time, in Redis mode"). Run from the repository root on an idle
# machine, after `cargo build --release --workspace --features redis`, with PostgreSQL and
# Redis local (as for the tests):
#
#   scripts/repair.sh                 # 1,000,000 widgets
#   WIDGETS=100000 scripts/repair.sh
#
# Starts the service in Redis mode on a database of its own and a key prefix of its own,
# creates WIDGETS widgets and offers association PUTs at RATE/s for DURATION; SAVE_AFTER
# seconds into the PUTs it copies every table a flush writes (the backup), and once the
# PUTs are over and flushed it puts the copy back in one transaction (the restore: the
# flushes since are lost). It then waits for the repair and for the dirty set to drain, and
# prints the service's lines about both. The database and the keys are dropped at the end.
set -euo pipefail

widgets=${WIDGETS:-1000000}
rate=${RATE:-5000}
duration=${DURATION:-40s}
save_after=${SAVE_AFTER:-10}
server=${WIDGETS_BIN:-target/release/widgets}
bench=${WIDGETS_BENCH_BIN:-target/release/widgets-bench}
pg=${PG:-postgres://postgres@127.0.0.1:5432}
redis=${REDIS_URL:-redis://127.0.0.1:6379}

db="repair_$$"
prefix="repair:$$:"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
url="http://127.0.0.1:$port"
tables="widgets associations_p associations_r associations_q widget_tombstones version_high_water flush_log redis_epoch"
psql -q "$pg/postgres" -c "CREATE DATABASE $db"
cleanup() {
    [[ -n ${service:-} ]] && kill "$service" 2>/dev/null && wait "$service" 2>/dev/null
    redis-cli -u "$redis" --scan --pattern "${prefix}*" | xargs -r -n 5000 redis-cli -u "$redis" unlink >/dev/null
    psql -q "$pg/postgres" -c "DROP DATABASE IF EXISTS $db"
    rm -rf "$dir"
}
trap cleanup EXIT

metric() { curl -s "$url/metrics" | awk -v m="$1" '$1 == m { print int($2) }'; }

"$server" --listen "127.0.0.1:$port" --data-dir "$dir/data" --database-url "$pg/$db" \
    --redis-url "$redis" --redis-prefix "$prefix" >"$dir/service.log" 2>&1 &
service=$!
until curl -sf "$url/readyz" >/dev/null; do sleep 0.2; done

"$bench" --url "$url" --widgets "$widgets" --duration "$duration" --concurrency 32 \
    --mix put=1 --rate "$rate" --ceiling-secs 0 --echo-secs 0 >"$dir/bench.log" 2>&1 &
load=$!
until [[ $(metric widgets_in_memory) -ge $widgets ]]; do sleep 1; done
sleep "$save_after"
for t in $tables; do psql -q "$pg/$db" -c "CREATE TABLE saved_$t AS SELECT * FROM $t"; done
echo "backup taken at $(date +%T)"
wait "$load"
until [[ $(metric widgets_dirty) -eq 0 ]]; do sleep 1; done
restore="BEGIN;"
for t in $tables; do restore+=" DELETE FROM $t; INSERT INTO $t SELECT * FROM saved_$t;"; done
psql -q "$pg/$db" -c "$restore COMMIT"
restored=$(date +%s)
echo "restored at $(date +%T)"
until grep -aq "lost are dirty again" "$dir/service.log" && [[ $(metric widgets_dirty) -eq 0 ]]; do
    sleep 1
done
echo "in line $(($(date +%s) - restored)) s after the restore"
sed 's/\x1b\[[0-9;]*m//g' "$dir/service.log" \
    | grep -a "gone back in time\|comparing PostgreSQL\|lost are dirty again\|dirty again failed" \
    | cut -c1-300
