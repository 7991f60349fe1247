//! Integration tests against the real PostgreSQL and NATS JetStream.

mod harness;

mod api;
mod concurrency;
mod event_store;
mod idempotency;
mod nats_outage;
mod property;
mod replay;
mod security;
