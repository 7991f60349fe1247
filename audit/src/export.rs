//! Streams a filtered slice of the log, in log order, as JSON lines or CSV,
//! each record carrying the chain hash, then a manifest. Memory stays
//! constant: rows are streamed from PostgreSQL and lines sent to a bounded
//! channel that the writer (a file, stdout, an HTTP body) drains.

use crate::{link, record, AuditError, GENESIS};
use chrono::{DateTime, Utc};
use futures::TryStreamExt;
use ledger_commands::store::{recorded_from_row, RECORDED_COLUMNS};
use serde::Serialize;
use serde_json::{json, Value};
use sqlx::PgPool;
use tokio::sync::mpsc;
use uuid::Uuid;

/// The fixed CSV columns, in order.
pub const CSV_COLUMNS: [&str; 16] = [
    "position",
    "recorded_at",
    "event_type",
    "schema_version",
    "stream_id",
    "stream_version",
    "event_id",
    "command_id",
    "correlation_id",
    "causation_id",
    "actor_id",
    "client_ip",
    "user_agent",
    "payload",
    "hash",
    "personal",
];

/// The `event_type` of the CSV row that carries the manifest.
pub const CSV_MANIFEST_MARK: &str = "#manifest";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Jsonl,
    Csv,
}

impl Format {
    pub fn parse(text: &str) -> Option<Format> {
        match text {
            "jsonl" => Some(Format::Jsonl),
            "csv" => Some(Format::Csv),
            _ => None,
        }
    }
}

/// What to export. Every part is optional; `to` is exclusive.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Filter {
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
    /// Events by or about this user, or touching their accounts.
    pub user: Option<Uuid>,
    /// Events touching this account.
    pub account: Option<Uuid>,
    /// Only these event types.
    pub types: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Summary {
    pub count: u64,
    pub first_position: Option<i64>,
    pub last_position: Option<i64>,
    pub final_hash: String,
}

const WHERE: &str = "transaction_id < pg_snapshot_xmin(pg_current_snapshot())
       AND ($1::timestamptz IS NULL OR recorded_at >= $1)
       AND ($2::timestamptz IS NULL OR recorded_at < $2)
       AND (cardinality($3::text[]) = 0 OR event_type = ANY($3))
       AND ($4::uuid IS NULL OR actor_id = $4 OR payload->>'user_id' = $4::text OR payload->>'customer_id' = $4::text
            OR payload->>'from_account' = ANY($5) OR payload->>'to_account' = ANY($5)
            OR payload->>'account_id' = ANY($5) OR payload->>'merchant_account' = ANY($5))
       AND ($6::text IS NULL OR stream_id = 'account-' || $6 OR payload->>'from_account' = $6
            OR payload->>'to_account' = $6 OR payload->>'account_id' = $6 OR payload->>'merchant_account' = $6)";

async fn accounts_of(pool: &PgPool, user: Option<Uuid>) -> Result<Vec<String>, AuditError> {
    let Some(user) = user else { return Ok(vec![]) };
    Ok(sqlx::query_scalar(
        "SELECT payload->>'account_id' FROM events WHERE event_type = 'AccountOpened' AND payload->>'owner_id' = $1",
    )
    .bind(user.to_string())
    .fetch_all(pool)
    .await?)
}

/// How many events the filter selects now (for progress bars).
pub async fn count(pool: &PgPool, filter: &Filter) -> Result<u64, AuditError> {
    let accounts = accounts_of(pool, filter.user).await?;
    let n: i64 = sqlx::query_scalar(&format!("SELECT count(*) FROM events WHERE {WHERE}"))
        .bind(filter.from)
        .bind(filter.to)
        .bind(&filter.types)
        .bind(filter.user)
        .bind(&accounts)
        .bind(filter.account.map(|a| a.to_string()))
        .fetch_one(pool)
        .await?;
    Ok(n.max(0) as u64)
}

fn csv_line(fields: &[String]) -> Result<String, AuditError> {
    let mut writer = csv::WriterBuilder::new().terminator(csv::Terminator::Any(b'\n')).from_writer(vec![]);
    writer.write_record(fields).map_err(|e| AuditError::Invalid(e.to_string()))?;
    let bytes = writer.into_inner().map_err(|e| AuditError::Invalid(e.to_string()))?;
    String::from_utf8(bytes).map_err(|e| AuditError::Invalid(e.to_string()))
}

fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The CSV row of a record.
pub fn csv_row(record: &Value, hash: &str) -> Vec<String> {
    CSV_COLUMNS
        .iter()
        .map(|c| match *c {
            "payload" => ledger_domain::canonical::to_string(&record["payload"]),
            "hash" => hash.to_owned(),
            "personal" => String::new(),
            other => text(&record[other]),
        })
        .collect()
}

/// Streams the export into `lines` (each a complete line, newline included).
///
/// With `personal`, each record that has personal fields also carries them
/// opened (or `[erased]`) beside the record, outside what the hash covers:
/// the chain covers the sealed values, so forgetting a user changes no hash.
pub async fn export(
    pool: &PgPool,
    filter: &Filter,
    format: Format,
    lines: mpsc::Sender<String>,
    personal: Option<&ledger_commands::Ledger>,
) -> Result<Summary, AuditError> {
    let send = |line: String| {
        let lines = lines.clone();
        async move { lines.send(line).await.map_err(|_| AuditError::Closed) }
    };
    if format == Format::Csv {
        send(csv_line(&CSV_COLUMNS.map(str::to_owned))?).await?;
    }
    let accounts = accounts_of(pool, filter.user).await?;
    let mut conn = pool.acquire().await?;
    let sql =
        format!("SELECT {RECORDED_COLUMNS} FROM events WHERE {WHERE} ORDER BY events.transaction_id, events.position");
    let mut rows = sqlx::query(&sql)
        .bind(filter.from)
        .bind(filter.to)
        .bind(&filter.types)
        .bind(filter.user)
        .bind(&accounts)
        .bind(filter.account.map(|a| a.to_string()))
        .fetch(&mut *conn);
    let mut summary = Summary { count: 0, first_position: None, last_position: None, final_hash: GENESIS.to_owned() };
    while let Some(row) = rows.try_next().await? {
        let event = recorded_from_row(&row)?;
        let record = record(&event);
        summary.final_hash = link(&summary.final_hash, &record);
        summary.count += 1;
        summary.first_position.get_or_insert(event.position);
        summary.last_position = Some(event.position);
        let opened = match personal {
            Some(ledger) => ledger
                .reveal_personal(&event.event_type, &record["payload"])
                .await
                .map_err(|e| AuditError::Invalid(format!("opening personal data: {e}")))?,
            None => None,
        };
        let line = match format {
            Format::Jsonl => {
                let mut out = json!({ "event": record, "hash": summary.final_hash });
                if let Some(p) = opened {
                    out["personal"] = p;
                }
                let mut l = ledger_domain::canonical::to_string(&out);
                l.push('\n');
                l
            }
            Format::Csv => {
                let mut row = csv_row(&record, &summary.final_hash);
                if let Some(p) = opened {
                    row[15] = ledger_domain::canonical::to_string(&p);
                }
                csv_line(&row)?
            }
        };
        send(line).await?;
    }
    drop(rows);
    // The database chain's link at the last exported event ties the file to the ledger.
    let anchor: Option<String> = match summary.last_position {
        Some(p) => {
            sqlx::query_scalar("SELECT hash FROM event_chain WHERE position = $1")
                .bind(p)
                .fetch_optional(&mut *conn)
                .await?
        }
        None => None,
    };
    let manifest = json!({
        "format_version": 1,
        "hash": "sha256(previous_hash + \"\\n\" + canonical_json(event)), from 64 zeros; canonical JSON is RFC 8785",
        "filter": filter,
        "count": summary.count,
        "first_position": summary.first_position,
        "last_position": summary.last_position,
        "final_hash": summary.final_hash,
        "chain_anchor": anchor.map(|hash| json!({ "position": summary.last_position, "hash": hash })),
        "exported_at": Utc::now().to_rfc3339(),
    });
    let line = match format {
        Format::Jsonl => {
            let mut l = ledger_domain::canonical::to_string(&json!({ "manifest": manifest }));
            l.push('\n');
            l
        }
        Format::Csv => {
            let mut row = vec![String::new(); CSV_COLUMNS.len()];
            row[2] = CSV_MANIFEST_MARK.to_owned();
            row[13] = ledger_domain::canonical::to_string(&manifest);
            csv_line(&row)?
        }
    };
    send(line).await?;
    Ok(summary)
}
