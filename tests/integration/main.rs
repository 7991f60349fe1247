//! Integration tests against the real PostgreSQL and NATS JetStream.

mod harness;

mod access_matrix;
mod api;
mod audit;
mod batch;
mod concurrency;
mod event_store;
mod group_commit;
mod holds;
mod idempotency;
mod live;
mod movement_run;
mod nats_outage;
mod no_secrets;
mod orders;
mod privacy;
mod property;
mod replay;
mod security;
mod time_travel;
