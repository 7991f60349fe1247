//! Personal data in events, sealed per user (crypto-shredding).
//!
//! `UserRegistered.email`/`display_name` and `LoginFailed.email` are stored
//! as `pii:v1:<base64(nonce || ciphertext)>`, sealed with the user's own key
//! (XChaCha20-Poly1305, the user id as associated data). The keys live in
//! `personal_data_keys`, sealed with `LEDGER_SECRET_KEY`, outside the log.
//! Forgetting a user deletes the key: the log, its hash chains and every
//! amount stay as they are, and the sealed fields read as `[erased]`.

use crate::secrets::{random_bytes, SealError, SecretBox};
use crate::store::StoreError;
use data_encoding::BASE64URL_NOPAD;
use serde_json::Value;
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
use uuid::Uuid;

pub const ERASED: &str = "[erased]";
const PREFIX: &str = "pii:v1:";

/// The personal fields of each event type that has any.
pub fn personal_fields(event_type: &str) -> &'static [&'static str] {
    match event_type {
        "UserRegistered" => &["email", "display_name"],
        "LoginFailed" => &["email"],
        _ => &[],
    }
}

async fn user_key(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    user_id: Uuid,
    create: bool,
) -> Result<Option<[u8; 32]>, StoreError> {
    let sealed: Option<Vec<u8>> = sqlx::query_scalar("SELECT key_sealed FROM personal_data_keys WHERE user_id = $1")
        .bind(user_id)
        .fetch_optional(&mut *conn)
        .await?;
    let key = match sealed {
        Some(sealed) => secrets.open(user_id, &sealed).ok(),
        None if create => {
            let fresh = random_bytes(32);
            let sealed = secrets.seal(user_id, &fresh).map_err(|_| StoreError::Conflict)?;
            sqlx::query("INSERT INTO personal_data_keys (user_id, key_sealed) VALUES ($1, $2) ON CONFLICT DO NOTHING")
                .bind(user_id)
                .bind(sealed)
                .execute(&mut *conn)
                .await?;
            // Another transaction may have won the insert: read what is stored.
            return Box::pin(user_key(conn, secrets, user_id, false)).await;
        }
        None => None,
    };
    Ok(key.and_then(|k| <[u8; 32]>::try_from(k.as_slice()).ok()))
}

fn seal_with(key: &[u8; 32], user_id: Uuid, value: &str) -> Result<String, SealError> {
    let sealed = SecretBox::from_key(key).seal(user_id, value.as_bytes())?;
    Ok(format!("{PREFIX}{}", BASE64URL_NOPAD.encode(&sealed)))
}

fn open_with(key: &[u8; 32], user_id: Uuid, value: &str) -> Option<String> {
    let sealed = BASE64URL_NOPAD.decode(value.strip_prefix(PREFIX)?.as_bytes()).ok()?;
    String::from_utf8(SecretBox::from_key(key).open(user_id, &sealed).ok()?).ok()
}

/// Seals the personal fields of an event's payload for `user_id`, creating
/// the user's key on first use.
pub async fn seal_payload(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    user_id: Uuid,
    event_type: &str,
    payload: &mut Value,
) -> Result<(), StoreError> {
    let Some(key) = user_key(conn, secrets, user_id, true).await? else { return Err(StoreError::Conflict) };
    for field in personal_fields(event_type) {
        if let Some(Value::String(clear)) = payload.get(*field) {
            let sealed = seal_with(&key, user_id, clear).map_err(|_| StoreError::Conflict)?;
            payload[*field] = Value::String(sealed);
        }
    }
    Ok(())
}

/// A keyed pseudonym of an address that belongs to nobody (a failed login
/// for an unknown email): equal addresses match, the address is not stored.
pub fn pseudonym(secrets_key: &[u8], email: &str) -> String {
    let mut h = Sha256::new();
    h.update(b"ledger pseudonym v1\0");
    h.update(secrets_key);
    h.update(email.as_bytes());
    format!("pseudonym:{}", hex::encode(&h.finalize()[..16]))
}

/// The personal fields of a stored payload, opened: the clear values, or
/// `[erased]` once the user is forgotten. `None` for events without any.
pub async fn reveal(
    conn: &mut PgConnection,
    secrets: &SecretBox,
    event_type: &str,
    payload: &Value,
) -> Result<Option<Value>, StoreError> {
    let fields = personal_fields(event_type);
    if fields.is_empty() {
        return Ok(None);
    }
    let user_id = payload.get("user_id").and_then(Value::as_str).and_then(|u| Uuid::parse_str(u).ok());
    let (key, forgotten) = match user_id {
        Some(id) => {
            let forgotten: bool =
                sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM forgotten_users WHERE user_id = $1)")
                    .bind(id)
                    .fetch_one(&mut *conn)
                    .await?;
            (if forgotten { None } else { user_key(conn, secrets, id, false).await? }, forgotten)
        }
        None => (None, false),
    };
    let mut out = serde_json::Map::new();
    for field in fields {
        let shown = match payload.get(*field) {
            Some(Value::String(v)) if v.starts_with(PREFIX) => match (&key, user_id) {
                (Some(k), Some(id)) => open_with(k, id, v).map(Value::String).unwrap_or(Value::String(ERASED.into())),
                _ => Value::String(ERASED.into()),
            },
            // Written in the clear before sealing existed: masked once forgotten.
            Some(Value::String(_)) if forgotten => Value::String(ERASED.into()),
            Some(other) => other.clone(),
            None => Value::Null,
        };
        out.insert((*field).to_owned(), shown);
    }
    Ok(Some(Value::Object(out)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_field_opens_only_with_its_users_key() {
        let (a, b) = ([7u8; 32], [8u8; 32]);
        let ann = Uuid::new_v4();
        let sealed = seal_with(&a, ann, "ann@example.com").unwrap();
        assert!(sealed.starts_with(PREFIX) && !sealed.contains("ann@"));
        assert_eq!(open_with(&a, ann, &sealed).as_deref(), Some("ann@example.com"));
        assert_eq!(open_with(&b, ann, &sealed), None);
        assert_eq!(open_with(&a, Uuid::new_v4(), &sealed), None);
        assert_ne!(pseudonym(b"k", "x@y.z"), pseudonym(b"k", "x@y.zz"));
        assert_eq!(pseudonym(b"k", "x@y.z"), pseudonym(b"k", "x@y.z"));
    }
}
