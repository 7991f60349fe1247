//! Canonical JSON, for fingerprints and hash chains: object keys sorted by
//! their UTF-16 code units at every level, no insignificant whitespace,
//! strings escaped as serde_json escapes them. For the ledger's data (ASCII
//! keys, integers and strings; amounts are strings) this is RFC 8785 (JCS).
//! Floating-point numbers are not used in events; JCS would format them
//! differently.

use serde_json::Value;

pub fn to_string(value: &Value) -> String {
    // Sorted explicitly, so it stays canonical even if a dependency turns on
    // serde_json's `preserve_order`.
    let mut out = String::new();
    write(value, &mut out);
    out
}

fn write(v: &Value, out: &mut String) {
    match v {
        Value::Object(map) => {
            let mut entries: Vec<_> = map.iter().collect();
            entries.sort_by(|a, b| a.0.encode_utf16().cmp(b.0.encode_utf16()));
            out.push('{');
            for (i, (k, v)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write(v, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write(item, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
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
}
