#!/usr/bin/env bash
# Replay benchmark: a fresh database with EVENTS (1,000,000) events appended
# by the event store, then `ledger replay --all` timed; then a server started
# on that log, its read side caught up from JetStream, and its RSS read.
#
#   bash bench/replay.sh             # EVENTS=1000000
#   EVENTS=20000 bash bench/replay.sh --smoke   # debug build, CI
set -euo pipefail
cd "$(dirname "$0")/.."

PGURL=${PGURL:-postgres://postgres@127.0.0.1:5432}
PORT=${PORT:-18090}
if [[ "${1:-}" == "--smoke" ]]; then
    EVENTS=${EVENTS:-20000}; PROFILE=debug; BUILD=(cargo build -q)
else
    EVENTS=${EVENTS:-1000000}; PROFILE=release; BUILD=(cargo build -q --release)
fi
TARGET=${CARGO_TARGET_DIR:-target}/$PROFILE
DB=ledger_replay_bench
export LEDGER_DATABASE_URL="$PGURL/$DB"

"${BUILD[@]}" -p ledger -p ledger-bench
psql "$PGURL/postgres" -qAtc "DROP DATABASE IF EXISTS $DB WITH (FORCE)" >/dev/null
psql "$PGURL/postgres" -qAtc "CREATE DATABASE $DB" >/dev/null
"$TARGET/ledger" migrate >/dev/null 2>&1

"$TARGET/ledger-bench" --database-url "$LEDGER_DATABASE_URL" --seed-log "$EVENTS" | tail -1
total=$(psql "$LEDGER_DATABASE_URL" -Atc "SELECT count(*) FROM events")

start=$(date +%s.%N)
/usr/bin/time -f "%M" -o /tmp/replay-rss.$$ "$TARGET/ledger" replay --all >/dev/null 2>&1
end=$(date +%s.%N)
python3 -c "s=$end-$start; print(f'replay --all of $total events: {s:.1f} s, {$total/s:,.0f} events/s, peak RSS {int(open(\"/tmp/replay-rss.$$\").read().split()[-1])/1024:.0f} MB')"
rm -f /tmp/replay-rss.$$

# A server on that log: the relay publishes it all, the projectors consume it
# (and skip what replay built); then its memory.
LEDGER_HTTP_ADDR="127.0.0.1:$PORT" LEDGER_NATS_PREFIX="replaybench$$" LEDGER_LOG=warn \
    "$TARGET/ledger" serve >/dev/null 2>&1 &
SERVER=$!
# Stopped, then its JetStream stream deleted (file storage: it would stay on disk).
trap 'kill $SERVER 2>/dev/null || true; wait $SERVER 2>/dev/null || true; "$TARGET/ledger-bench" --delete-stream "replaybench$$" || true' EXIT
start=$(date +%s.%N)
ready=0
for _ in $(seq 1 600); do
    if curl -sf "http://127.0.0.1:$PORT/readyz" 2>/dev/null | python3 -c '
import json, sys
r = json.load(sys.stdin)
lags = [r["relay"]["lag_events"]] + [p["lag_events"] for p in r["projections"].values()]
sys.exit(0 if all(l == 0 for l in lags) else 1)' 2>/dev/null; then ready=1; break; fi
    sleep 1
done
end=$(date +%s.%N)
if [[ $ready != 1 ]]; then echo "the server did not catch up with the log within 600 s" >&2; exit 1; fi
python3 -c "print(f'server ready (relay published, projectors caught up) after {$end-$start:.1f} s; RSS {int(open(\"/proc/$SERVER/status\").read().split(\"VmRSS:\")[1].split()[0])/1024:.0f} MB')"
