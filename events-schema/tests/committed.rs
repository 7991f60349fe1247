//! The committed schema files must equal what the code generates.

use ledger_events_schema::{generate, schema_dir};
use std::fs;

#[test]
fn committed_schemas_match_the_code() {
    let dir = schema_dir();
    let update = std::env::var_os("UPDATE_SCHEMAS").is_some_and(|v| v == "1");
    let mut stale = Vec::new();
    for file in generate() {
        let path = dir.join(&file.path);
        let committed = fs::read_to_string(&path).ok();
        let is_schema = file.path.extension().is_some_and(|e| e == "json");
        if update && is_schema && committed.as_deref().is_some_and(|c| c != file.contents) {
            // A published version is never edited, not even by the generator.
            stale.push(format!("{} (published: add a new version instead)", file.path.display()));
        } else if update {
            fs::create_dir_all(path.parent().expect("schema files live in a folder")).expect("create folder");
            fs::write(&path, &file.contents).expect("write schema");
        } else if fs::read_to_string(&path).ok().as_deref() != Some(file.contents.as_str()) {
            stale.push(file.path.display().to_string());
        }
    }
    assert!(
        stale.is_empty(),
        "these files differ from the code: {stale:?}\n\
         A published schema version is never edited: add a new version with an upcaster. \
         For a new version, run UPDATE_SCHEMAS=1 cargo test -p ledger-events-schema and commit the result."
    );
}

#[test]
fn every_generated_schema_is_a_json_object_with_properties() {
    for file in generate().into_iter().filter(|f| f.path.extension().is_some_and(|e| e == "json")) {
        let value: serde_json::Value = serde_json::from_str(&file.contents).expect("valid JSON");
        assert!(value["properties"].is_object(), "{}", file.path.display());
        assert_eq!(value["type"], "object", "{}", file.path.display());
    }
}
