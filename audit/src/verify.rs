//! Offline verification of an export: recompute the chain record by record,
//! then check the manifest. The first record whose hash does not follow is
//! named: a changed, removed, reordered or inserted line breaks the chain at
//! that line.
//!
//! Lines must be exactly canonical (no duplicate keys, no reformatting, no
//! blank lines, nothing beside `event`, `hash` and `personal`), so that no
//! reader can see anything but what the hash covers. `personal` (opened
//! personal data) is outside the hash, and is reported as unverified.

use crate::export::{CSV_COLUMNS, CSV_MANIFEST_MARK};
use crate::{link, GENESIS};
use serde_json::{json, Map, Value};
use std::io::BufRead;

#[derive(Debug, Clone, PartialEq)]
pub struct Verified {
    pub count: u64,
    pub final_hash: String,
    pub last_position: Option<i64>,
    /// The ledger's own chain link at the last exported event, from the manifest.
    pub chain_anchor: Option<Value>,
    /// The export has no filter: it chains exactly as the ledger does.
    pub whole_log: bool,
    /// Records carrying opened personal data, which no hash covers.
    pub unverified_personal: u64,
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
    personal: u64,
}

fn filter_is_everything(filter: &Value) -> bool {
    ["from", "to", "user", "account"].iter().all(|k| filter[*k].is_null())
        && filter["types"].as_array().is_none_or(|t| t.is_empty())
}

impl Chain {
    fn new() -> Chain {
        Chain { hash: GENESIS.to_owned(), count: 0, first: None, last: None, personal: 0 }
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
        let whole_log = filter_is_everything(&m["filter"]);
        let anchor = m.get("chain_anchor").cloned().filter(|a| !a.is_null());
        if let Some(a) = &anchor {
            // The anchor is the ledger's own link at the export's last event.
            check("chain_anchor.position", a["position"].as_i64() == self.last)?;
            check("chain_anchor.hash", a["hash"].as_str().is_some_and(|h| h.len() == 64))?;
            if whole_log {
                // A whole-log export chains exactly as the ledger does.
                check("chain_anchor.hash", a["hash"].as_str() == Some(self.hash.as_str()))?;
            }
        }
        Ok(Verified {
            count: self.count,
            final_hash: self.hash,
            last_position: self.last,
            chain_anchor: anchor,
            whole_log,
            unverified_personal: self.personal,
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

/// The deepest line `parse_line` takes: a payload linked as a tree is at
/// most 127 deep (serde_json's own limit, where the ledger's parse of the
/// payload stops), and its line two more.
const MAX_LINE_DEPTH: usize = 256;

/// A line as JSON. serde_json stops at 128 levels, which an event's line
/// reaches two levels before its payload does: a forged row's payload 126
/// or 127 deep is linked as a tree, and its export must verify too. So the
/// depth is counted first (refused past `MAX_LINE_DEPTH`, which bounds the
/// parser's stack) and the line parsed without serde_json's limit.
fn parse_line(line: &str) -> Result<Value, String> {
    let (mut depth, mut deepest, mut in_string, mut escaped) = (0usize, 0usize, false, false);
    for b in line.bytes() {
        match (in_string, escaped, b) {
            (true, true, _) => escaped = false,
            (true, false, b'\\') => escaped = true,
            (true, false, b'"') => in_string = false,
            (true, false, _) => {}
            (false, _, b'"') => in_string = true,
            (false, _, b'[' | b'{') => {
                depth += 1;
                deepest = deepest.max(depth);
            }
            (false, _, b']' | b'}') => depth = depth.saturating_sub(1),
            (false, _, _) => {}
        }
    }
    if deepest > MAX_LINE_DEPTH {
        return Err(format!("nested deeper than {MAX_LINE_DEPTH} levels"));
    }
    let mut parser = serde_json::Deserializer::from_str(line);
    parser.disable_recursion_limit();
    let value = serde::Deserialize::deserialize(&mut parser).map_err(|e: serde_json::Error| e.to_string())?;
    parser.end().map_err(|e| e.to_string())?;
    Ok(value)
}

fn verify_jsonl(first: String, lines: impl Iterator<Item = std::io::Result<String>>) -> Result<Verified, VerifyError> {
    let mut chain = Chain::new();
    let mut manifest = None;
    let all = std::iter::once(Ok(first)).chain(lines);
    for (i, line) in all.enumerate() {
        let n = i as u64 + 1;
        let line = line.map_err(|e| VerifyError::Read(e.to_string()))?;
        if manifest.is_some() {
            return Err(record_error(n, None, "a line after the manifest"));
        }
        let v = parse_line(&line).map_err(|e| record_error(n, None, format!("not JSON: {e}")))?;
        let position = v["event"]["position"].as_i64();
        if ledger_domain::canonical::to_string(&v) != line {
            return Err(record_error(n, position, "not in canonical form (reformatted, or duplicate keys)"));
        }
        let keys: Vec<&str> = v.as_object().map(|o| o.keys().map(String::as_str).collect()).unwrap_or_default();
        if let Some(m) = v.get("manifest") {
            if keys.len() != 1 {
                return Err(record_error(n, None, "the manifest line carries other fields"));
            }
            manifest = Some(m.clone());
            continue;
        }
        if keys.iter().any(|k| !["event", "hash", "personal"].contains(k)) {
            return Err(record_error(n, position, "fields beside event, hash and personal"));
        }
        if v.get("personal").is_some() {
            chain.personal += 1;
        }
        let claimed = v["hash"].as_str().ok_or_else(|| record_error(n, position, "no hash"))?;
        chain.push(n, &v["event"], claimed)?;
    }
    chain.finish(manifest)
}

/// Rebuilds a record from a CSV row: empty cells are nulls, numbers are
/// numbers; every cell must be in the one form the export writes.
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
                let n =
                    cell.parse::<i64>().map_err(|_| record_error(line, None, format!("{column} is not a number")))?;
                if n.to_string() != cell {
                    return Err(record_error(line, None, format!("{column} is not in canonical form")));
                }
                json!(n)
            }
            "payload" => {
                let payload: Value =
                    serde_json::from_str(cell).map_err(|e| record_error(line, None, format!("payload: {e}")))?;
                if ledger_domain::canonical::to_string(&payload) != cell {
                    return Err(record_error(line, None, "payload is not in canonical form (or has duplicate keys)"));
                }
                payload
            }
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
        if row.len() != CSV_COLUMNS.len() {
            return Err(record_error(n, None, "not the documented number of columns"));
        }
        if row.get(2) == Some(CSV_MANIFEST_MARK) {
            let m: Value = serde_json::from_str(row.get(13).unwrap_or(""))
                .map_err(|e| VerifyError::Manifest(format!("not JSON: {e}")))?;
            manifest = Some(m);
            continue;
        }
        if !row.get(15).unwrap_or("").is_empty() {
            chain.personal += 1;
        }
        let record = record_from_csv(&row, n)?;
        chain.push(n, &record, row.get(14).unwrap_or(""))?;
    }
    chain.finish(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_parsed_past_serde_json_s_depth_but_within_a_bound() {
        let nested = |levels: usize| format!("{}{}", "[".repeat(levels), "]".repeat(levels));
        assert!(serde_json::from_str::<Value>(&nested(130)).is_err(), "serde_json's own limit");
        let parsed = parse_line(&nested(MAX_LINE_DEPTH)).expect("within the bound");
        assert_eq!(ledger_domain::canonical::to_string(&parsed), nested(MAX_LINE_DEPTH));
        assert!(parse_line(&nested(MAX_LINE_DEPTH + 1)).unwrap_err().contains("nested deeper"));
        // Brackets and escaped quotes inside strings are not nesting.
        let text = format!("[\"{}\\\"{}\"]", "[".repeat(300), "{".repeat(300));
        assert_eq!(parse_line(&text).expect("one level")[0].as_str().map(str::len), Some(601));
        assert!(parse_line("[1] 2").is_err(), "trailing data");
    }
}
