//! The checked-in fixture log (`fixtures/log.jsonl`): every event type at
//! every published version, including events the first release wrote
//! (`TransferRecorded` v1). Each validates against its committed schema, and
//! the whole log replays through today's code to the balances it had.

use ledger_domain::events::event_types;
use ledger_domain::{fold_balances, sums_per_currency, Event};
use rust_decimal::Decimal;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::str::FromStr;

fn fixture() -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fixtures/log.jsonl");
    std::fs::read_to_string(path)
        .expect("fixture log")
        .lines()
        .map(|l| serde_json::from_str(l).expect("fixture line is JSON"))
        .collect()
}

#[test]
fn every_event_in_the_fixture_log_validates_against_its_schema() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let mut covered = BTreeSet::new();
    for (i, line) in fixture().iter().enumerate() {
        let event_type = line["event_type"].as_str().unwrap();
        let version = line["schema_version"].as_i64().unwrap() as i32;
        let info = event_types()
            .into_iter()
            .find(|t| t.event_type == event_type && t.schema_version == version)
            .unwrap_or_else(|| panic!("line {}: {event_type} v{version} was never published", i + 1));
        let path = dir.join(info.category).join(format!("{event_type}.v{version}.json"));
        let schema: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let validator = jsonschema::validator_for(&schema).expect("a valid schema");
        let errors: Vec<String> = validator.iter_errors(&line["payload"]).map(|e| e.to_string()).collect();
        assert!(errors.is_empty(), "line {}: {event_type} v{version}: {errors:?}", i + 1);
        covered.insert((event_type.to_owned(), version));
    }
    let published: BTreeSet<_> =
        event_types().into_iter().map(|t| (t.event_type.to_owned(), t.schema_version)).collect();
    assert_eq!(covered, published, "the fixture has every published type and version");
}

#[test]
fn a_schema_refuses_what_its_type_refuses() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let v1: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("account/TransferRecorded.v1.json")).unwrap()).unwrap();
    let validator = jsonschema::validator_for(&v1).unwrap();
    let fee = serde_json::json!({
        "transfer_id": "00000000-0000-7000-8000-000000000001", "from_account": "00000000-0000-7000-8000-000000000002",
        "to_account": "00000000-0000-7000-8000-000000000003", "amount": "1.00", "currency": "USD", "kind": "fee", "reference": null
    });
    assert!(!validator.is_valid(&fee), "v1 has no fee kind");
    let mut extra = fee.clone();
    extra["kind"] = "transfer".into();
    assert!(validator.is_valid(&extra));
    extra["surprise"] = true.into();
    assert!(!validator.is_valid(&extra), "no unknown fields");
}

#[test]
fn the_fixture_log_replays_through_todays_code_to_the_same_balances() {
    let events: Vec<Event> = fixture()
        .iter()
        .map(|l| {
            let (event_type, version) =
                (l["event_type"].as_str().unwrap(), l["schema_version"].as_i64().unwrap() as i32);
            let event =
                Event::from_stored(event_type, version, l["payload"].clone()).expect("every published version decodes");
            // Readers of the log decode from its stored text: the same event.
            let text = l["payload"].to_string();
            assert_eq!(Event::from_stored_str(event_type, version, &text).unwrap(), event);
            event
        })
        .collect();
    let balances = fold_balances(&events);
    let of = |id: &str| balances[&id.parse().unwrap()].balance;
    let d = |s: &str| Decimal::from_str(s).unwrap();
    assert_eq!(of("00000000-0000-7000-8000-000000000011"), d("51.00"));
    assert_eq!(of("00000000-0000-7000-8000-000000000012"), d("38.90"));
    // Old transfers read with today's default channel.
    let channels: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::TransferRecorded(t) => Some(t.channel),
            _ => None,
        })
        .collect();
    assert!(channels.iter().all(|c| *c == ledger_domain::events::Channel::Api));
    assert!(sums_per_currency(&balances).values().all(Decimal::is_zero));
}
