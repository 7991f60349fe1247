//! Idempotency records: the first outcome of each (user, Idempotency-Key).

use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

pub const MAX_KEY_LEN: usize = 255;

/// The outcome recorded for a key: the status and body first returned.
#[derive(Clone, Debug, PartialEq, sqlx::FromRow)]
pub struct CommandRecord {
    pub idempotency_key: String,
    pub command_id: Uuid,
    pub request_hash: Vec<u8>,
    pub status: i16,
    pub response: serde_json::Value,
    pub position: Option<i64>,
    pub recorded_at: DateTime<Utc>,
}

/// Keys are printable ASCII, 1 to 255 characters.
pub fn key_is_valid(key: &str) -> bool {
    !key.is_empty() && key.len() <= MAX_KEY_LEN && key.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

/// Fingerprint of a request: method, path and canonical JSON body. Two
/// requests with one key are "the same" when their fingerprints match.
pub fn request_hash(method: &str, path: &str, canonical_body: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(method.as_bytes());
    h.update(b" ");
    h.update(path.as_bytes());
    h.update(b"\n");
    h.update(canonical_body.as_bytes());
    h.finalize().to_vec()
}

/// Serialises every command on one (user, key) until its transaction ends, so
/// concurrent duplicates wait for the first and then read its outcome.
pub async fn lock_key(conn: &mut PgConnection, user_id: Uuid, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(key_lock_id(user_id, key)).execute(&mut *conn).await?;
    Ok(())
}

/// The advisory lock of a (user, key).
pub fn key_lock_id(user_id: Uuid, key: &str) -> i64 {
    let mut h = Sha256::new();
    h.update(user_id.as_bytes());
    h.update(key.as_bytes());
    let digest = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

pub async fn find(conn: &mut PgConnection, user_id: Uuid, key: &str) -> Result<Option<CommandRecord>, sqlx::Error> {
    sqlx::query_as(
        "SELECT idempotency_key, command_id, request_hash, status, response, position, recorded_at
         FROM commands WHERE user_id = $1 AND idempotency_key = $2",
    )
    .bind(user_id)
    .bind(key)
    .fetch_optional(&mut *conn)
    .await
}

#[allow(clippy::too_many_arguments)]
pub async fn record(
    conn: &mut PgConnection,
    user_id: Uuid,
    key: &str,
    command_id: Uuid,
    request_hash: &[u8],
    status: u16,
    response: &serde_json::Value,
    position: Option<i64>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO commands (user_id, idempotency_key, command_id, request_hash, status, response, position)
         VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(user_id)
    .bind(key)
    .bind(command_id)
    .bind(request_hash)
    .bind(status as i16)
    .bind(response)
    .bind(position)
    .execute(&mut *conn)
    .await?;
    Ok(())
}
