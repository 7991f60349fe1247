//! The event store: one append-only `events` table in PostgreSQL.

use crate::unsealed::CanonicalForm;
use chrono::{DateTime, Utc};
use ledger_domain::events::EventDecodeError;
use ledger_domain::Event;
use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, Row};
use uuid::Uuid;

/// A point in the log's tailing order: (transaction id, position).
///
/// Positions come from an identity column and can commit out of order, so the
/// read side orders by the writing transaction's id first; see ARCHITECTURE.md.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LogPoint {
    pub transaction_id: u64,
    pub position: i64,
}

impl LogPoint {
    pub const START: LogPoint = LogPoint { transaction_id: 0, position: 0 };
}

/// How far a projector has applied the log: every read model is at or past
/// `through`; `highest_position` is the highest position among what it has
/// applied (tailing order is by transaction first, so a batch's end need not
/// hold its highest position).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ReadSideProgress {
    pub through: LogPoint,
    pub highest_position: i64,
}

/// Who and what caused an append; stored on every event of the command.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct EventMetadata {
    pub command_id: Option<Uuid>,
    pub correlation_id: Option<Uuid>,
    pub causation_id: Option<Uuid>,
    pub actor_id: Option<Uuid>,
    pub recorded_at: DateTime<Utc>,
    /// The client's address, for the audit of identity events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ip: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_agent: Option<String>,
}

/// An event as stored in the log and as published on JetStream.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    pub position: i64,
    /// xid8 of the appending transaction, as a decimal string on the wire.
    #[serde(with = "u64_string")]
    pub transaction_id: u64,
    pub event_id: Uuid,
    pub stream_id: String,
    pub stream_version: i64,
    pub event_type: String,
    pub schema_version: i32,
    pub payload: Payload,
    pub metadata: EventMetadata,
}

impl RecordedEvent {
    pub fn point(&self) -> LogPoint {
        LogPoint { transaction_id: self.transaction_id, position: self.position }
    }

    pub fn decode(&self) -> Result<Event, EventDecodeError> {
        Event::from_stored_str(&self.event_type, self.schema_version, self.payload.get())
    }
}

/// An event's payload as the log stores it: JSON text, carried from the
/// database to JetStream and to the projectors without being parsed into a
/// tree (the typed event is decoded straight from it; the few readers that
/// want a tree ask for one).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<serde_json::value::RawValue>);

impl Payload {
    /// The payload of a tree (serialized once; cannot fail for a tree).
    pub fn of(value: &serde_json::Value) -> Payload {
        match serde_json::value::to_raw_value(value) {
            Ok(raw) => Payload(raw),
            // A `Value` always serializes; keep the type total anyway.
            Err(_) => Payload(serde_json::value::RawValue::NULL.to_owned()),
        }
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The text, to bind as a `jsonb` parameter.
    pub fn as_json(&self) -> sqlx::types::Json<&serde_json::value::RawValue> {
        sqlx::types::Json(&self.0)
    }

    /// The payload as a tree, for readers that edit or canonicalize it.
    pub fn to_value(&self) -> Result<serde_json::Value, serde_json::Error> {
        serde_json::from_str(self.0.get())
    }
}

/// Two payloads are equal when they hold the same JSON, whatever the spacing
/// or key order of the text.
impl PartialEq for Payload {
    fn eq(&self, other: &Payload) -> bool {
        self.get() == other.get() || matches!((self.to_value(), other.to_value()), (Ok(a), Ok(b)) if a == b)
    }
}

mod u64_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// Events to append to one stream, which must be at `expected_version` now.
#[derive(Clone, Debug)]
pub struct StreamAppend {
    pub stream_id: String,
    pub expected_version: i64,
    pub events: Vec<Event>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another writer appended to one of the streams first.
    #[error("stream version conflict")]
    Conflict,
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Decode(#[from] EventDecodeError),
    /// A command reached a path that is not its own: a bug, refused before
    /// anything is written or recorded.
    #[error("broken invariant: {0}")]
    Invariant(&'static str),
}

pub fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.code().as_deref() == Some("23505"))
}

/// Authenticates each event as it is appended: an HMAC-SHA256, with a key
/// derived from `LEDGER_SECRET_KEY` that the database never holds, over
/// everything in the row but its position. A row inserted or edited out of
/// band (by a superuser, say) cannot carry a valid one.
#[derive(Clone)]
pub struct EventMac {
    key: [u8; 32],
    /// Where the canonical forms it builds are kept for this process's
    /// audit chain sealer, if anywhere.
    unsealed: Option<std::sync::Arc<crate::unsealed::UnsealedForms>>,
}

impl EventMac {
    pub fn new(secret_key: &[u8]) -> EventMac {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        h.update(b"ledger event mac v1\0");
        h.update(secret_key);
        EventMac { key: h.finalize().into(), unsealed: None }
    }

    /// Also keeps the canonical form of each event it authenticates in an
    /// append, in `forms`, while they are wanted there.
    pub fn keeping_forms_in(self, forms: std::sync::Arc<crate::unsealed::UnsealedForms>) -> EventMac {
        EventMac { unsealed: Some(forms), ..self }
    }

    /// Whether forms are wanted now.
    fn keeps_forms(&self) -> Option<&crate::unsealed::UnsealedForms> {
        self.unsealed.as_deref().filter(|forms| forms.keeping())
    }

    /// The MAC of an event as stored (metadata times at microseconds), over
    /// the canonical JSON of its columns but `position`. `None` for a payload
    /// that does not parse into a tree (deeper than serde_json nests, say):
    /// the ledger never wrote it, so it is not authentic whatever its MAC.
    pub fn of(&self, e: &RecordedEvent) -> Option<String> {
        self.of_with_form(e).map(|(mac, _)| mac)
    }

    /// `of`, and the canonical form the MAC covers: a verifier links the
    /// chain from it (`CanonicalForm::with_position`) without parsing the
    /// payload a second time.
    pub fn of_with_form(&self, e: &RecordedEvent) -> Option<(String, CanonicalForm)> {
        let payload = e.payload.to_value().ok()?;
        Some(self.authenticate(e, &payload))
    }

    /// The MAC, and the canonical form it covers.
    fn authenticate(&self, e: &RecordedEvent, payload: &serde_json::Value) -> (String, CanonicalForm) {
        use hmac::{Hmac, Mac};
        let mut out: Vec<u8> = Vec::with_capacity(512);
        let position_at = write_canonical_parsed(e, payload, false, &mut out);
        let form = CanonicalForm::new(out, position_at);
        let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(&self.key) else { return (String::new(), form) };
        mac.update(form.without_position());
        (hex::encode(mac.finalize().into_bytes()), form)
    }
}

/// Appends the canonical JSON of an event's columns (with `position` for the
/// audit chain's record, without it for the MAC), written straight into the
/// buffer in sorted key order rather than built as a JSON tree, which cloned
/// the payload: the MAC runs in the writer's group, per event. Canonical
/// order needs the payload as a tree: it is parsed here.
pub fn write_canonical(e: &RecordedEvent, with_position: bool, out: &mut Vec<u8>) -> Result<(), serde_json::Error> {
    write_canonical_parsed(e, &e.payload.to_value()?, with_position, out);
    Ok(())
}

/// `write_canonical` with the payload given as a tree (`e.payload` is not
/// read). Returns the offset in `out` where the `position` field begins, or
/// would begin without it.
fn write_canonical_parsed(
    e: &RecordedEvent,
    payload: &serde_json::Value,
    with_position: bool,
    out: &mut Vec<u8>,
) -> usize {
    use ledger_domain::canonical::{write, write_scalar};
    let recorded_at = e.metadata.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    // Keys in canonical (sorted) order; none needs escaping.
    let mut first = true;
    let mut field = |out: &mut Vec<u8>, name: &str| {
        out.extend_from_slice(if std::mem::take(&mut first) { b"\"" } else { b",\"" });
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b"\":");
    };
    out.push(b'{');
    field(out, "actor_id");
    write_scalar(&e.metadata.actor_id, out);
    field(out, "causation_id");
    write_scalar(&e.metadata.causation_id, out);
    field(out, "client_ip");
    write_scalar(&e.metadata.client_ip, out);
    field(out, "command_id");
    write_scalar(&e.metadata.command_id, out);
    field(out, "correlation_id");
    write_scalar(&e.metadata.correlation_id, out);
    field(out, "event_id");
    write_scalar(&e.event_id, out);
    field(out, "event_type");
    write_scalar(&e.event_type, out);
    field(out, "payload");
    write(payload, out);
    let position_at = out.len();
    if with_position {
        field(out, "position");
        write_scalar(&e.position, out);
    }
    field(out, "recorded_at");
    write_scalar(&recorded_at, out);
    field(out, "schema_version");
    write_scalar(&e.schema_version, out);
    field(out, "stream_id");
    write_scalar(&e.stream_id, out);
    field(out, "stream_version");
    write_scalar(&e.stream_version, out);
    field(out, "user_agent");
    write_scalar(&e.metadata.user_agent, out);
    out.push(b'}');
    position_at
}

/// Appends the events in one statement, inside the caller's transaction.
/// Returns the highest position written.
pub async fn append(
    conn: &mut PgConnection,
    appends: &[StreamAppend],
    metadata: &EventMetadata,
    authenticator: &EventMac,
) -> Result<Option<i64>, StoreError> {
    let batch: Vec<(&StreamAppend, &EventMetadata)> = appends.iter().map(|a| (a, metadata)).collect();
    Ok(append_many(conn, &batch, authenticator).await?.into_iter().max())
}

/// Appends the events of several commands, each with its own metadata, in
/// one statement. Returns each event's position, in the order given.
pub async fn append_many<A, M>(
    conn: &mut PgConnection,
    appends: &[(A, M)],
    authenticator: &EventMac,
) -> Result<Vec<i64>, StoreError>
where
    A: std::borrow::Borrow<StreamAppend>,
    M: std::borrow::Borrow<EventMetadata>,
{
    let rows = EventRows::new(appends, authenticator);
    if rows.is_empty() {
        return Ok(vec![]);
    }
    let sql = format!("{INSERT_EVENTS} RETURNING event_id, position");
    let result = rows.bind(sqlx::query_as::<_, (Uuid, i64)>(&sql)).fetch_all(&mut *conn).await;
    match result {
        Ok(written) => Ok(rows.positions(written)),
        Err(e) if is_unique_violation(&e) => Err(StoreError::Conflict),
        Err(e) => Err(e.into()),
    }
}

/// The insert of an [`EventRows`], its columns bound as `$1` to `$14`; a
/// caller adds `RETURNING` or wraps it in a statement of its own.
pub const INSERT_EVENTS: &str = "INSERT INTO events (event_id, stream_id, stream_version, event_type, schema_version,
                             payload, command_id, correlation_id, causation_id, actor_id, recorded_at,
                             client_ip, user_agent, mac)
         SELECT * FROM UNNEST($1::uuid[], $2::text[], $3::bigint[], $4::text[], $5::int[], $6::jsonb[],
                              $7::uuid[], $8::uuid[], $9::uuid[], $10::uuid[], $11::timestamptz[],
                              $12::text[], $13::text[], $14::text[])";

/// Events to append, as the columns of one set-based insert, each event
/// authenticated and at its stream's next version.
pub struct EventRows {
    pub ids: Vec<Uuid>,
    streams: Vec<String>,
    versions: Vec<i64>,
    types: Vec<String>,
    schema_versions: Vec<i32>,
    /// Bound as the JSON text already serialized (no second serialization).
    payloads: Vec<sqlx::types::Json<Box<serde_json::value::RawValue>>>,
    macs: Vec<String>,
    command_ids: Vec<Option<Uuid>>,
    correlation_ids: Vec<Option<Uuid>>,
    causation_ids: Vec<Option<Uuid>>,
    actor_ids: Vec<Option<Uuid>>,
    recorded_ats: Vec<DateTime<Utc>>,
    client_ips: Vec<Option<String>>,
    user_agents: Vec<Option<String>>,
}

impl EventRows {
    pub fn new<A, M>(appends: &[(A, M)], authenticator: &EventMac) -> EventRows
    where
        A: std::borrow::Borrow<StreamAppend>,
        M: std::borrow::Borrow<EventMetadata>,
    {
        use chrono::SubsecRound;
        let count: usize = appends.iter().map(|(a, _)| a.borrow().events.len()).sum();
        let mut rows = EventRows {
            ids: Vec::with_capacity(count),
            streams: Vec::with_capacity(count),
            versions: Vec::with_capacity(count),
            types: Vec::with_capacity(count),
            schema_versions: Vec::with_capacity(count),
            payloads: Vec::with_capacity(count),
            macs: Vec::with_capacity(count),
            command_ids: Vec::with_capacity(count),
            correlation_ids: Vec::with_capacity(count),
            causation_ids: Vec::with_capacity(count),
            actor_ids: Vec::with_capacity(count),
            recorded_ats: Vec::with_capacity(count),
            client_ips: Vec::with_capacity(count),
            user_agents: Vec::with_capacity(count),
        };
        // The forms the MACs cover, for this process's audit chain sealer.
        let keeping = authenticator.keeps_forms();
        let mut forms = keeping.map(|_| Vec::with_capacity(count));
        for (append, metadata) in appends {
            let append = append.borrow();
            // Stored at microseconds: the MAC covers the value as stored.
            let metadata = EventMetadata {
                recorded_at: metadata.borrow().recorded_at.trunc_subsecs(6),
                ..metadata.borrow().clone()
            };
            for (i, event) in append.events.iter().enumerate() {
                let payload = event.payload();
                let recorded = RecordedEvent {
                    position: 0,
                    transaction_id: 0,
                    event_id: Uuid::now_v7(),
                    stream_id: append.stream_id.clone(),
                    stream_version: append.expected_version + 1 + i as i64,
                    event_type: event.event_type().to_owned(),
                    schema_version: event.schema_version(),
                    payload: Payload::of(&payload),
                    metadata: metadata.clone(),
                };
                let (mac, form) = authenticator.authenticate(&recorded, &payload);
                rows.macs.push(mac);
                if let Some(forms) = forms.as_mut() {
                    forms.push((recorded.event_id, form));
                }
                rows.ids.push(recorded.event_id);
                rows.streams.push(recorded.stream_id);
                rows.versions.push(recorded.stream_version);
                rows.types.push(recorded.event_type);
                rows.schema_versions.push(recorded.schema_version);
                rows.payloads.push(sqlx::types::Json(recorded.payload.0));
                rows.command_ids.push(metadata.command_id);
                rows.correlation_ids.push(metadata.correlation_id);
                rows.causation_ids.push(metadata.causation_id);
                rows.actor_ids.push(metadata.actor_id);
                rows.recorded_ats.push(metadata.recorded_at);
                rows.client_ips.push(metadata.client_ip.clone());
                rows.user_agents.push(metadata.user_agent.clone());
            }
        }
        if let (Some(keeping), Some(forms)) = (keeping, forms) {
            keeping.keep(forms);
        }
        rows
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Binds the columns as `$1` to `$14` of [`INSERT_EVENTS`].
    pub fn bind<'q, O>(
        &'q self,
        query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
        query
            .bind(&self.ids)
            .bind(&self.streams)
            .bind(&self.versions)
            .bind(&self.types)
            .bind(&self.schema_versions)
            .bind(&self.payloads)
            .bind(&self.command_ids)
            .bind(&self.correlation_ids)
            .bind(&self.causation_ids)
            .bind(&self.actor_ids)
            .bind(&self.recorded_ats)
            .bind(&self.client_ips)
            .bind(&self.user_agents)
            .bind(&self.macs)
    }

    /// Each event's position, in the order given, from what the insert returned.
    pub fn positions(&self, written: Vec<(Uuid, i64)>) -> Vec<i64> {
        let positions: std::collections::HashMap<Uuid, i64> = written.into_iter().collect();
        self.ids.iter().map(|id| positions.get(id).copied().unwrap_or_default()).collect()
    }
}

pub const RECORDED_COLUMNS: &str = "position, transaction_id::text AS transaction_id, event_id, stream_id,
     stream_version, event_type, schema_version, payload, command_id, correlation_id, causation_id,
     actor_id, recorded_at, client_ip, user_agent";

pub fn recorded_from_row(row: &sqlx::postgres::PgRow) -> Result<RecordedEvent, sqlx::Error> {
    let txid: String = row.try_get("transaction_id")?;
    Ok(RecordedEvent {
        position: row.try_get("position")?,
        transaction_id: txid
            .parse()
            .map_err(|e| sqlx::Error::ColumnDecode { index: "transaction_id".into(), source: Box::new(e) })?,
        event_id: row.try_get("event_id")?,
        stream_id: row.try_get("stream_id")?,
        stream_version: row.try_get("stream_version")?,
        event_type: row.try_get("event_type")?,
        schema_version: row.try_get("schema_version")?,
        payload: Payload(row.try_get::<sqlx::types::Json<&serde_json::value::RawValue>, _>("payload")?.0.to_owned()),
        metadata: EventMetadata {
            command_id: row.try_get("command_id")?,
            correlation_id: row.try_get("correlation_id")?,
            causation_id: row.try_get("causation_id")?,
            actor_id: row.try_get("actor_id")?,
            recorded_at: row.try_get("recorded_at")?,
            client_ip: row.try_get("client_ip")?,
            user_agent: row.try_get("user_agent")?,
        },
    })
}

/// The event in a row that has `event_type`, `schema_version` and `payload`,
/// decoded from the payload's text (no JSON tree).
pub fn stored_event(row: &sqlx::postgres::PgRow) -> Result<Event, StoreError> {
    let payload = row.try_get::<sqlx::types::Json<&serde_json::value::RawValue>, _>("payload")?.0;
    Ok(Event::from_stored_str(row.try_get::<&str, _>("event_type")?, row.try_get("schema_version")?, payload.get())?)
}

/// Events of one stream, in version order, and the stream's current version.
pub async fn load_stream(conn: &mut PgConnection, stream_id: &str) -> Result<(Vec<Event>, i64), StoreError> {
    let rows = sqlx::query(
        "SELECT event_type, schema_version, payload, stream_version FROM events
         WHERE stream_id = $1 ORDER BY stream_version",
    )
    .bind(stream_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut version = 0;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        version = row.try_get("stream_version")?;
        events.push(stored_event(&row)?);
    }
    Ok((events, version))
}

/// The events that make an account's state: its own stream plus every
/// movement that names it, in log order; and its own stream's version.
///
/// Read in one statement, so the version and the balance are of one snapshot.
pub async fn load_account(conn: &mut PgConnection, account_id: Uuid) -> Result<(Vec<Event>, i64), StoreError> {
    let stream_id = account_stream(account_id);
    let rows = sqlx::query(
        "SELECT event_type, schema_version, payload, stream_id, stream_version FROM events
         WHERE stream_id = $1
            OR (event_type = 'TransferRecorded' AND payload->>'to_account' = $2)
            OR (event_type = 'TransferRecorded' AND payload->>'from_account' = $2)
         ORDER BY position",
    )
    .bind(&stream_id)
    .bind(account_id.to_string())
    .fetch_all(&mut *conn)
    .await?;
    let mut version = 0;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        if row.try_get::<&str, _>("stream_id")? == stream_id {
            version = version.max(row.try_get("stream_version")?);
        }
        events.push(stored_event(&row)?);
    }
    Ok((events, version))
}

/// Planner settings for a session that tails the log. Far behind the head,
/// PostgreSQL's estimates make it read every later row and sort them (125 ms
/// per 1,000-event page at 140k events behind, against 1.4 ms along the
/// `events_tailing` index); without sorts it walks the index, which is
/// already in tailing order. And no JIT: its estimates then pass
/// `jit_above_cost`, and compiling took 140 ms of a 230 ms page read.
pub const TAILING_SETTINGS: [(&str, &str); 2] = [("enable_sort", "off"), ("jit", "off")];

/// Applies [`TAILING_SETTINGS`] to a session.
pub async fn prefer_tailing_order(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    for (name, value) in TAILING_SETTINGS {
        sqlx::query("SELECT set_config($1, $2, false)").bind(name).bind(value).execute(&mut *conn).await?;
    }
    Ok(())
}

/// Reads the next events after `after`, in tailing order, up to the oldest
/// transaction still in progress: nothing below that bound can appear later.
pub async fn read_settled_after(
    conn: &mut PgConnection,
    after: LogPoint,
    limit: i64,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let sql = format!(
        "SELECT {RECORDED_COLUMNS} FROM events
         WHERE (transaction_id, position) > ($1::text::xid8, $2)
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.transaction_id, events.position
         LIMIT $3"
    );
    let rows = sqlx::query(&sql)
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.iter().map(recorded_from_row).collect::<Result<_, _>>()?)
}

/// The points and ids of up to `limit` settled events after `after`, in
/// tailing order: what `read_settled_after` finds, without the rows.
pub async fn read_settled_ids_after(
    conn: &mut PgConnection,
    after: LogPoint,
    limit: i64,
) -> Result<Vec<(LogPoint, Uuid)>, StoreError> {
    let rows: Vec<(String, i64, Uuid)> = sqlx::query_as(
        "SELECT transaction_id::text, position, event_id FROM events
         WHERE (transaction_id, position) > ($1::text::xid8, $2)
           AND transaction_id < pg_snapshot_xmin(pg_current_snapshot())
         ORDER BY events.transaction_id, events.position
         LIMIT $3",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    rows.into_iter()
        .map(|(t, position, event_id)| {
            let transaction_id = t.parse().map_err(|_| sqlx::Error::Protocol(format!("xid8 {t:?}")))?;
            Ok::<_, StoreError>((LogPoint { transaction_id, position }, event_id))
        })
        .collect()
}

/// The events at these positions, in no particular order.
pub async fn read_at_positions(conn: &mut PgConnection, positions: &[i64]) -> Result<Vec<RecordedEvent>, StoreError> {
    let sql = format!("SELECT {RECORDED_COLUMNS} FROM events WHERE position = ANY($1)");
    let rows = sqlx::query(&sql).bind(positions).fetch_all(&mut *conn).await?;
    Ok(rows.iter().map(recorded_from_row).collect::<Result<_, _>>()?)
}

/// Reads the events in the half-open range (after, through], in tailing order.
pub async fn read_range(
    conn: &mut PgConnection,
    after: LogPoint,
    through: LogPoint,
) -> Result<Vec<RecordedEvent>, StoreError> {
    let sql = format!(
        "SELECT {RECORDED_COLUMNS} FROM events
         WHERE (transaction_id, position) > ($1::text::xid8, $2)
           AND (transaction_id, position) <= ($3::text::xid8, $4)
         ORDER BY events.transaction_id, events.position"
    );
    let rows = sqlx::query(&sql)
        .bind(after.transaction_id.to_string())
        .bind(after.position)
        .bind(through.transaction_id.to_string())
        .bind(through.position)
        .fetch_all(&mut *conn)
        .await?;
    Ok(rows.iter().map(recorded_from_row).collect::<Result<_, _>>()?)
}

/// The last event's point in tailing order, of what is committed now.
pub async fn head(conn: &mut PgConnection) -> Result<Option<LogPoint>, StoreError> {
    let row: Option<(String, i64)> = sqlx::query_as(
        "SELECT transaction_id::text, position FROM events ORDER BY transaction_id DESC, position DESC LIMIT 1",
    )
    .fetch_optional(&mut *conn)
    .await?;
    Ok(match row {
        Some((t, position)) => Some(LogPoint {
            transaction_id: t.parse().map_err(|_| sqlx::Error::Protocol(format!("xid8 {t:?}")))?,
            position,
        }),
        None => None,
    })
}

/// Counts the events in the half-open range (after, through].
pub async fn count_range(conn: &mut PgConnection, after: LogPoint, through: LogPoint) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events
         WHERE (transaction_id, position) > ($1::text::xid8, $2)
           AND (transaction_id, position) <= ($3::text::xid8, $4)",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(through.transaction_id.to_string())
    .bind(through.position)
    .fetch_one(&mut *conn)
    .await?)
}

/// The tailing point of the event at `position`, if that event exists.
pub async fn point_of(conn: &mut PgConnection, position: i64) -> Result<Option<LogPoint>, StoreError> {
    let txid: Option<String> = sqlx::query_scalar("SELECT transaction_id::text FROM events WHERE position = $1")
        .bind(position)
        .fetch_optional(&mut *conn)
        .await?;
    Ok(txid.and_then(|t| t.parse().ok()).map(|transaction_id| LogPoint { transaction_id, position }))
}

pub fn account_stream(account_id: Uuid) -> String {
    format!("account-{account_id}")
}

pub fn user_stream(user_id: Uuid) -> String {
    format!("user-{user_id}")
}

pub fn transfer_stream(transfer_id: Uuid) -> String {
    format!("transfer-{transfer_id}")
}

/// An account's opening and freezes, without its movements: enough for the
/// credit side of a movement, which has no balance to check, and for system
/// accounts, whose balance may go anywhere.
pub async fn load_account_opening(conn: &mut PgConnection, account_id: Uuid) -> Result<Vec<Event>, StoreError> {
    let rows = sqlx::query(
        "SELECT event_type, schema_version, payload FROM events
         WHERE stream_id = $1 AND event_type IN ('AccountOpened', 'AccountFrozen', 'AccountUnfrozen')
         ORDER BY stream_version",
    )
    .bind(account_stream(account_id))
    .fetch_all(&mut *conn)
    .await?;
    let mut events = Vec::with_capacity(rows.len());
    for row in rows {
        events.push(stored_event(&row)?);
    }
    Ok(events)
}

/// Counts the events after `after`, stopping at `cap` (health checks stay cheap).
pub async fn count_after(conn: &mut PgConnection, after: LogPoint, cap: i64) -> Result<i64, StoreError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM (
             SELECT 1 FROM events WHERE (transaction_id, position) > ($1::text::xid8, $2) LIMIT $3
         ) lagging",
    )
    .bind(after.transaction_id.to_string())
    .bind(after.position)
    .bind(cap)
    .fetch_one(&mut *conn)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The MAC as first written: the canonical JSON of a tree built from the
    /// event. Stored MACs were computed this way; they must still verify.
    fn reference_mac(mac: &EventMac, e: &RecordedEvent) -> String {
        use hmac::{Hmac, Mac};
        let content = serde_json::json!({
            "event_id": e.event_id,
            "stream_id": e.stream_id,
            "stream_version": e.stream_version,
            "event_type": e.event_type,
            "schema_version": e.schema_version,
            "payload": e.payload,
            "command_id": e.metadata.command_id,
            "correlation_id": e.metadata.correlation_id,
            "causation_id": e.metadata.causation_id,
            "actor_id": e.metadata.actor_id,
            "recorded_at": e.metadata.recorded_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
            "client_ip": e.metadata.client_ip,
            "user_agent": e.metadata.user_agent,
        });
        let mut m = Hmac::<sha2::Sha256>::new_from_slice(&mac.key).expect("any key length");
        m.update(ledger_domain::canonical::to_string(&content).as_bytes());
        hex::encode(m.finalize().into_bytes())
    }

    /// An event with every kind of field, escapes and all.
    fn sample_event() -> RecordedEvent {
        RecordedEvent {
            position: 7,
            transaction_id: 9,
            event_id: Uuid::now_v7(),
            stream_id: "account-x".into(),
            stream_version: 3,
            event_type: "TransferRecorded".into(),
            schema_version: 3,
            payload: Payload::of(
                &serde_json::json!({"z": "12.30", "a": {"y": [1, null, "\"q\"\n"], "b": true}, "é": "日本"}),
            ),
            metadata: EventMetadata {
                command_id: Some(Uuid::now_v7()),
                correlation_id: None,
                causation_id: Some(Uuid::now_v7()),
                actor_id: Some(Uuid::now_v7()),
                recorded_at: Utc::now(),
                client_ip: Some("203.0.113.9".into()),
                user_agent: Some("agent \"quoted\" \\ \u{1}".into()),
            },
        }
    }

    #[test]
    fn the_mac_written_field_by_field_equals_the_mac_of_the_canonical_tree() {
        let mac = EventMac::new(b"a key");
        let mut e = sample_event();
        assert_eq!(mac.of(&e), Some(reference_mac(&mac, &e)));
        e.metadata = EventMetadata { recorded_at: e.metadata.recorded_at, ..Default::default() };
        e.payload = Payload::of(&serde_json::json!({}));
        assert_eq!(mac.of(&e), Some(reference_mac(&mac, &e)));
        assert_ne!(mac.of(&e), EventMac::new(b"another key").of(&e));
    }

    /// The sealer links an event from the form its MAC covered, with the
    /// position put in: that must be the chain's record of the row exactly.
    #[test]
    fn the_form_a_mac_covers_with_its_position_put_in_is_the_chain_record() {
        let mac = EventMac::new(b"a key");
        let mut e = sample_event();
        for position in [1, 42, i64::MAX] {
            let (stored, form) = mac.authenticate(&e, &e.payload.to_value().unwrap());
            e.position = position;
            assert_eq!(Some(stored), mac.of(&e), "the MAC does not cover the position");
            let (mut linked, mut read_back) = (vec![], vec![]);
            form.with_position(position, &mut linked);
            write_canonical(&e, true, &mut read_back).unwrap();
            assert_eq!(String::from_utf8(linked).unwrap(), String::from_utf8(read_back).unwrap());
            e.metadata = EventMetadata { recorded_at: e.metadata.recorded_at, ..Default::default() };
        }
    }
}
