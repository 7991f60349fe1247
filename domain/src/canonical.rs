//! Canonical JSON, for fingerprints and hash chains: object keys sorted by
//! their UTF-16 code units at every level, no insignificant whitespace,
//! strings escaped as serde_json escapes them. For the ledger's data (ASCII
//! keys, integers and strings; amounts are strings) this is RFC 8785 (JCS).
//! Floating-point numbers are not used in events; JCS would format them
//! differently.

use serde::Serialize;
use serde_json::Value;
use std::cmp::Ordering;

pub fn to_string(value: &Value) -> String {
    let mut out = Vec::with_capacity(256);
    write(value, &mut out);
    // Only UTF-8 is written (serde_json's JSON text and ASCII punctuation),
    // so this is always `Ok`; were it not, the text is kept, never emptied
    // (an empty fingerprint would make different requests look alike).
    match String::from_utf8(out) {
        Ok(text) => text,
        Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
    }
}

/// Appends `value`'s canonical form. Writes straight into the buffer: no
/// string per key or scalar (this ran three times per transfer, for the
/// request's fingerprint, the event's MAC and the audit chain).
pub fn write(value: &Value, out: &mut Vec<u8>) {
    match value {
        Value::Object(map) => {
            // Sorted explicitly, so it stays canonical even if a dependency
            // turns on serde_json's `preserve_order`.
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| utf16_order(a.0, b.0));
            out.push(b'{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_scalar(k.as_str(), out);
                out.push(b':');
                write(v, out);
            }
            out.push(b'}');
        }
        Value::Array(items) => {
            out.push(b'[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write(item, out);
            }
            out.push(b']');
        }
        Value::String(s) => write_scalar(s.as_str(), out),
        Value::Number(n) => write_scalar(n, out),
        Value::Bool(b) => out.extend_from_slice(if *b { b"true" } else { b"false" }),
        Value::Null => out.extend_from_slice(b"null"),
    }
}

/// A string, number, null or other value whose serde_json form is already
/// canonical (no object inside), escaped as serde_json escapes it.
pub fn write_scalar<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    // Writing into a Vec cannot fail, and these types always serialize.
    let _ = value.serialize(&mut serde_json::Serializer::new(out));
}

/// Keys ordered by their UTF-16 code units. Byte order is the same unless a
/// key holds a character at or above U+E000, so only then is it re-encoded.
fn utf16_order(a: &str, b: &str) -> Ordering {
    let plain = |s: &str| s.bytes().all(|c| c < 0xEE);
    if plain(a) && plain(b) {
        a.as_bytes().cmp(b.as_bytes())
    } else {
        a.encode_utf16().cmp(b.encode_utf16())
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    #[test]
    fn keys_are_sorted_at_every_level_without_whitespace() {
        let v = json!({"b": [ {"z": 1, "a": null} ], "a": "x\"y", "C": true});
        assert_eq!(super::to_string(&v), r#"{"C":true,"a":"x\"y","b":[{"a":null,"z":1}]}"#);
    }

    /// The form before the buffer-writing version: every key and scalar
    /// through `Value::to_string`, keys compared as UTF-16 throughout.
    fn reference(v: &serde_json::Value) -> String {
        use serde_json::Value;
        match v {
            Value::Object(map) => {
                let mut entries: Vec<_> = map.iter().collect();
                entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
                let inner: Vec<String> = entries
                    .into_iter()
                    .map(|(k, v)| format!("{}:{}", Value::String(k.clone()), reference(v)))
                    .collect();
                format!("{{{}}}", inner.join(","))
            }
            Value::Array(items) => format!("[{}]", items.iter().map(reference).collect::<Vec<_>>().join(",")),
            other => other.to_string(),
        }
    }

    #[test]
    fn the_same_text_as_the_reference_form_for_escapes_unicode_and_numbers() {
        let v = json!({
            "payload": {"amount": "12.30", "to": "a\u{0}b\u{1f}c\u{7f}\\/\"", "n": -17, "big": 18446744073709551615u64,
                        "f": 1.5, "e": [], "o": {}, "t": [true, false, null]},
            "\u{e000}": 1, "\u{10000}": 2, "\u{ffff}": 3, "é": 4, "z": 5, "Z": 6, "": 7,
            "text": "naïve — 日本 \u{1F600} \t\r\n\u{8}\u{c}",
        });
        assert_eq!(super::to_string(&v), reference(&v));
        // Supplementary characters sort before U+E000..U+FFFF in UTF-16 (not in UTF-8).
        let keys = json!({"\u{ffff}": 0, "\u{10000}": 0, "\u{e000}": 0});
        assert_eq!(super::to_string(&keys), "{\"\u{10000}\":0,\"\u{e000}\":0,\"\u{ffff}\":0}");
    }
}
