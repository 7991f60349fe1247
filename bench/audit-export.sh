#!/usr/bin/env bash
# Appends 1,000,000 events to a scratch database, then exports and verifies
# them, printing wall time and peak memory (constant-memory check).
# Usage: bash bench/audit-export.sh   (needs PostgreSQL as in README.md)
set -euo pipefail
cd "$(dirname "$0")/.."
DB=ledger_bench_export
URL="postgres://postgres@127.0.0.1:5432/$DB"
OUT="${TMPDIR:-/tmp}/ledger-export-1m.jsonl"
cargo build --release -q
psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
LEDGER_DATABASE_URL=$URL LEDGER_LOG=warn ./target/release/ledger migrate
echo "appending 1,000,000 events"
psql -h 127.0.0.1 -U postgres -d $DB -q -c "
INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version, payload, command_id, correlation_id, actor_id)
SELECT gen_random_uuid(), 'transfer-' || g, 1, 'TransferRecorded', 2,
       jsonb_build_object('transfer_id', gen_random_uuid(), 'from_account', '00000000-0000-7000-8000-000000000001',
                          'to_account', '00000000-0000-7000-8000-000000000002', 'amount', '1.00', 'currency', 'USD',
                          'kind', 'transfer', 'reference', null),
       gen_random_uuid(), gen_random_uuid(), gen_random_uuid()
FROM generate_series(1, 1000000) g;"
echo "export:"
/usr/bin/time -f "  %e s, max RSS %M KiB" env LEDGER_DATABASE_URL=$URL LEDGER_LOG=warn \
    ./target/release/ledger audit export --format jsonl --output "$OUT"
ls -l "$OUT"
echo "verify:"
/usr/bin/time -f "  %e s, max RSS %M KiB" ./target/release/ledger audit verify "$OUT"
rm -f "$OUT"
psql -h 127.0.0.1 -U postgres -q -c "DROP DATABASE IF EXISTS $DB WITH (FORCE)"
