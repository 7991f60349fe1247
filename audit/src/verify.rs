//! Offline verification of an export: recompute the chain record by record,
//! then check the manifest. The first record whose hash does not follow is
//! named: a changed, removed, reordered or inserted line breaks the chain at
//! that line.

use crate::export::{CSV_COLUMNS, CSV_MANIFEST_MARK};
use crate::{link, GENESIS};
use serde_json::{json, Map, Value};
use std::io::BufRead;

#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub count: u64,
    pub final_hash: String,
    pub chain_anchor: Option<Value>,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error("line {line}: {reason}")]
    Record { line: u64, position: Option<i64>, reason: String },
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("reading the file: {0}")]
    Read(String),
}

fn record_error(line: u64, position: Option<i64>, reason: impl Into<String>) -> VerifyError {
    VerifyError::Record { line, position, reason: reason.into() }
}

struct Chain {
    hash: String,
    count: u64,
    first: Option<i64>,
    last: Option<i64>,
}

impl Chain {
    fn new() -> Chain {
        Chain { hash: GENESIS.to_owned(), count: 0, first: None, last: None }
    }

    fn push(&mut self, line: u64, record: &Value, claimed: &str) -> Result<(), VerifyError> {
        let position = record["position"].as_i64();
        let expected = link(&self.hash, record);
        if expected != claimed {
            return Err(record_error(
                line,
                position,
                format!(
                    "record at position {} does not follow the chain (changed, removed, reordered or inserted here)",
                    position.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
                ),
            ));
        }
        self.hash = expected;
        self.count += 1;
        self.first.get_or_insert(position.unwrap_or_default());
        self.last = position;
        Ok(())
    }

    fn finish(self, manifest: Option<Value>) -> Result<Verified, VerifyError> {
        let m = manifest.ok_or_else(|| VerifyError::Manifest("missing: the file was cut short".into()))?;
        let check = |field: &str, ok: bool| {
            if ok {
                Ok(())
            } else {
                Err(VerifyError::Manifest(format!("{field} does not match the records")))
            }
        };
        check("count", m["count"].as_u64() == Some(self.count))?;
        check("final_hash", m["final_hash"].as_str() == Some(self.hash.as_str()))?;
        check("first_position", m["first_position"].as_i64() == self.first)?;
        check("last_position", m["last_position"].as_i64() == self.last)?;
        Ok(Verified {
            count: self.count,
            final_hash: self.hash,
            chain_anchor: m.get("chain_anchor").cloned().filter(|a| !a.is_null()),
        })
    }
}

/// Verifies a JSON-lines or CSV export (told apart by its first line).
pub fn verify(reader: impl BufRead) -> Result<Verified, VerifyError> {
    let mut lines = reader.lines();
    let Some(first) = lines.next() else { return Err(VerifyError::Manifest("the file is empty".into())) };
    let first = first.map_err(|e| VerifyError::Read(e.to_string()))?;
    if first.starts_with("position,") {
        verify_csv(&first, lines)
    } else {
        verify_jsonl(first, lines)
    }
}

fn verify_jsonl(first: String, lines: impl Iterator<Item = std::io::Result<String>>) -> Result<Verified, VerifyError> {
    let mut chain = Chain::new();
    let mut manifest = None;
    let all = std::iter::once(Ok(first)).chain(lines);
    for (i, line) in all.enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| VerifyError::Read(e.to_string()))?;
        if line.trim().is_empty() {
            continue;
        }
        if manifest.is_some() {
            return Err(record_error(n, None, "a line after the manifest"));
        }
        let v: Value = serde_json::from_str(&line).map_err(|e| record_error(n, None, format!("not JSON: {e}")))?;
        if let Some(m) = v.get("manifest") {
            manifest = Some(m.clone());
            continue;
        }
        let claimed = v["hash"].as_str().ok_or_else(|| record_error(n, None, "no hash"))?;
        chain.push(n, &v["event"], claimed)?;
    }
    chain.finish(manifest)
}

/// Rebuilds a record from a CSV row: empty cells are nulls, numbers are numbers.
fn record_from_csv(row: &csv::StringRecord, line: u64) -> Result<Value, VerifyError> {
    let mut map = Map::new();
    for (i, column) in CSV_COLUMNS.iter().enumerate() {
        if *column == "hash" || *column == "personal" {
            continue;
        }
        let cell = row.get(i).unwrap_or("");
        let value = match *column {
            _ if cell.is_empty() => Value::Null,
            "position" | "schema_version" | "stream_version" => {
                json!(cell.parse::<i64>().map_err(|_| record_error(line, None, format!("{column} is not a number")))?)
            }
            "payload" => serde_json::from_str(cell).map_err(|e| record_error(line, None, format!("payload: {e}")))?,
            _ => Value::String(cell.to_owned()),
        };
        map.insert((*column).to_owned(), value);
    }
    Ok(Value::Object(map))
}

fn verify_csv(header: &str, lines: impl Iterator<Item = std::io::Result<String>>) -> Result<Verified, VerifyError> {
    if header != CSV_COLUMNS.join(",") {
        return Err(record_error(1, None, "the header is not the documented column set"));
    }
    let mut chain = Chain::new();
    let mut manifest = None;
    // Rows may span lines (quoted newlines in user agents); read them as CSV.
    let rest: Vec<String> = lines.collect::<Result<_, _>>().map_err(|e| VerifyError::Read(e.to_string()))?;
    let body = rest.join("\n");
    let mut reader = csv::ReaderBuilder::new().has_headers(false).from_reader(body.as_bytes());
    for (i, row) in reader.records().enumerate() {
        let n = i as u64 + 2;
        let row = row.map_err(|e| record_error(n, None, format!("not CSV: {e}")))?;
        if manifest.is_some() {
            return Err(record_error(n, None, "a row after the manifest"));
        }
        if row.get(2) == Some(CSV_MANIFEST_MARK) {
            let m: Value = serde_json::from_str(row.get(13).unwrap_or(""))
                .map_err(|e| VerifyError::Manifest(format!("not JSON: {e}")))?;
            manifest = Some(m);
            continue;
        }
        let record = record_from_csv(&row, n)?;
        chain.push(n, &record, row.get(14).unwrap_or(""))?;
    }
    chain.finish(manifest)
}
