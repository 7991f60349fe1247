#!/usr/bin/env bash
# The benchmark in one go: a fresh database and server, a pgbench baseline of
# the same durable writes, every scenario, and a table of ours/baseline.
#
#   bash bench/run.sh            # full run (RUNS=3 for the median of three)
#   bash bench/run.sh --smoke    # a few seconds, debug build: keeps the harness working (CI)
#
# Environment: RUNS (1), DURATION seconds per scenario (20), CONNECTIONS (64),
# SCENARIOS (all), ACCOUNTS (10000), PORT (18080), PGURL (postgres://postgres@127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."

SMOKE=0
[[ "${1:-}" == "--smoke" ]] && SMOKE=1

RUNS=${RUNS:-1}
PORT=${PORT:-18080}
PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
if [[ $SMOKE == 1 ]]; then
    DURATION=${DURATION:-1}; WARMUP=0.5; CONNECTIONS=${CONNECTIONS:-8}; ACCOUNTS=${ACCOUNTS:-200}
    USERS=4; SCENARIOS=${SCENARIOS:-all}; BATCH=10; PROFILE=debug; BUILD=(cargo build -q)
else
    DURATION=${DURATION:-20}; WARMUP=3; CONNECTIONS=${CONNECTIONS:-64}; ACCOUNTS=${ACCOUNTS:-10000}
    USERS=50; SCENARIOS=${SCENARIOS:-all}; BATCH=100; PROFILE=release; BUILD=(cargo build -q --release)
fi
TARGET=${CARGO_TARGET_DIR:-target}/$PROFILE
OUT=${OUT:-target/bench/$(date -u +%Y%m%dT%H%M%SZ)}
mkdir -p "$OUT"

"${BUILD[@]}" -p ledger -p ledger-bench

SERVER_PID=
stop_server() { # [prefix whose JetStream stream goes with it]
    if [[ -n "$SERVER_PID" ]]; then
        kill "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
        SERVER_PID=
    fi
    # File storage: the stream would stay on disk.
    if [[ -n "${1:-}" ]]; then
        "$TARGET/ledger-bench" --delete-stream "$1" || echo "note: stream of $1 not deleted" >&2
    fi
}
trap stop_server EXIT

fresh_db() {
    psql "$PGURL/postgres" -qAtc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" >/dev/null
    psql "$PGURL/postgres" -qAtc "CREATE DATABASE $1" >/dev/null
    LEDGER_DATABASE_URL="$PGURL/$1" "$TARGET/ledger" migrate >/dev/null
}

start_server() { # NATS prefix, log file; the environment's LEDGER_* settings pass through
    fresh_db ledger_bench
    LEDGER_DATABASE_URL="$PGURL/ledger_bench" LEDGER_HTTP_ADDR="127.0.0.1:$PORT" LEDGER_NATS_PREFIX="$1" \
        LEDGER_RATE_LIMIT_PER_SEC=0 LEDGER_DB_MAX_CONNECTIONS=${LEDGER_DB_MAX_CONNECTIONS:-32} LEDGER_LOG=warn \
        "$TARGET/ledger" serve >"$2" 2>&1 &
    SERVER_PID=$!
}

pgbench_tps() { # script clients seconds
    pgbench -n -M prepared -c "$2" -j 2 -T "$3" -f "$1" "$PGURL/ledger_pgbench" 2>/dev/null |
        sed -n 's/^tps = \([0-9.]*\) (without initial connection time)/\1/p'
}

echo "machine: $(nproc) cores, $(free -g | awk '/Mem:/ {print $2}') GiB; $(psql "$PGURL/postgres" -Atc 'SHOW server_version') PostgreSQL," \
     "synchronous_commit=$(psql "$PGURL/postgres" -Atc 'SHOW synchronous_commit'); $(nats-server --version 2>/dev/null || echo 'nats-server ?')"
echo "results in $OUT"

for run in $(seq 1 "$RUNS"); do
    echo "=== run $run of $RUNS ==="
    # 1. The baseline: the same rows, written by pgbench at the same client count.
    fresh_db ledger_pgbench
    single=$(pgbench_tps bench/pgbench/transfer.sql "$CONNECTIONS" "$DURATION")
    batch=$(pgbench_tps bench/pgbench/batch.sql "$CONNECTIONS" "$DURATION")
    echo "pgbench: one transfer per transaction $single tps; 100 per transaction $batch tps ($(python3 -c "print(round($batch*100))") transfers/s)"
    echo "{\"run\":$run,\"baseline_single_tps\":$single,\"baseline_batch_transfers_per_sec\":$(python3 -c "print($batch*100)")}" >>"$OUT/baseline.jsonl"

    # 2. A fresh ledger: database, NATS subjects and server. The per-user rate
    # limit is off: the bench measures the ledger, not the limiter.
    start_server "bench$$r$run" "$OUT/server-$run.log"
    "$TARGET/ledger-bench" --url "http://127.0.0.1:$PORT" --database-url "$PGURL/ledger_bench" \
        --scenario "$SCENARIOS" --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
        --accounts "$ACCOUNTS" --users "$USERS" --batch-size "$BATCH" --half-peak \
        --json "$OUT/results-$run.jsonl"
    echo "server RSS after run $run: $(ps -o rss= -p "$SERVER_PID" | awk '{printf "%.0f MB", $1/1024}')"
    stop_server "bench$$r$run"

    # 3. `batch` once more with bulk writes not paced by the read side
    # (LEDGER_BULK_MAX_BACKLOG=0): the throughput the pacing gives up, and the
    # lag it saves. A fresh ledger again, so both start alike.
    if [[ "$SCENARIOS" == all || ",$SCENARIOS," == *,batch,* ]]; then
        LEDGER_BULK_MAX_BACKLOG=0 start_server "bench$$u$run" "$OUT/server-unpaced-$run.log"
        "$TARGET/ledger-bench" --url "http://127.0.0.1:$PORT" --database-url "$PGURL/ledger_bench" \
            --scenario batch --connections "$CONNECTIONS" --duration "$DURATION" --warmup "$WARMUP" \
            --accounts "$ACCOUNTS" --users "$USERS" --batch-size "$BATCH" \
            --json "$OUT/unpaced-$run.jsonl"
        stop_server "bench$$u$run"
    fi
done

# 4. Medians over the runs, and ours/baseline.
echo
python3 bench/table.py "$OUT"
