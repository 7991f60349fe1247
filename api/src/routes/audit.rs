//! `GET /v1/admin/audit/export`: the CLI's audit export over HTTP, streamed,
//! for admins and support (read-only).

use crate::access::{authorize, Action};
use crate::auth::AuthUser;
use crate::problem::Problem;
use crate::state::AppState;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderValue, Uri};
use axum::response::Response;
use ledger_audit::export::{self, Filter, Format};
use tokio_stream_lite::ReceiverStream;

/// Minimal adapter from an mpsc receiver to a body stream.
mod tokio_stream_lite {
    use futures::Stream;
    use std::pin::Pin;
    use std::task::{Context, Poll};
    use tokio::sync::mpsc;

    pub struct ReceiverStream(pub mpsc::Receiver<String>);

    impl Stream for ReceiverStream {
        type Item = Result<String, std::convert::Infallible>;

        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            self.0.poll_recv(cx).map(|line| line.map(Ok))
        }
    }
}

fn parse_filter(query: &str) -> Result<(Filter, Format), Problem> {
    let mut filter = Filter::default();
    let mut format = Format::Jsonl;
    for (name, value) in form_urlencoded::parse(query.as_bytes()) {
        let value = value.trim();
        if value.is_empty() {
            continue;
        }
        if value.contains('\0') {
            return Err(Problem::validation(&name, "must not contain NUL characters"));
        }
        let time = |field: &str| {
            chrono::DateTime::parse_from_rfc3339(value)
                .map(|t| t.with_timezone(&chrono::Utc))
                .map_err(|_| Problem::validation(field, "must be an RFC 3339 time, e.g. 2026-01-31T00:00:00Z"))
        };
        let id = |field: &str| uuid::Uuid::parse_str(value).map_err(|_| Problem::validation(field, "must be a UUID"));
        match name.as_ref() {
            "from" => filter.from = Some(time("from")?),
            "to" => filter.to = Some(time("to")?),
            "user" => filter.user = Some(id("user")?),
            "account" => filter.account = Some(id("account")?),
            "type" => filter.types.extend(value.split(',').map(|t| t.trim().to_owned()).filter(|t| !t.is_empty())),
            "format" => {
                format = Format::parse(value).ok_or_else(|| Problem::validation("format", "must be jsonl or csv"))?
            }
            other => return Err(Problem::validation(other, "is not a filter of this export")),
        }
    }
    Ok((filter, format))
}

#[utoipa::path(get, path = "/v1/admin/audit/export", tag = "admin",
    params(("from" = Option<String>, Query), ("to" = Option<String>, Query), ("user" = Option<String>, Query),
        ("account" = Option<String>, Query), ("type" = Option<String>, Query, description = "comma-separated or repeated"),
        ("format" = Option<String>, Query, description = "jsonl (default) or csv")),
    responses((status = 200, description = "The export: one record per line with its chain hash, then the manifest"), (status = 403, description = "forbidden")))]
pub async fn export(State(state): State<AppState>, user: AuthUser, uri: Uri) -> Result<Response, Problem> {
    authorize(&user, Action::StaffRead)?;
    let (filter, format) = parse_filter(uri.query().unwrap_or(""))?;
    let (tx, rx) = tokio::sync::mpsc::channel(256);
    let pool = state.pool.clone();
    let ledger = state.ledger.clone();
    tokio::spawn(async move {
        if let Err(e) = export::export(&pool, &filter, format, tx, Some(&ledger)).await {
            // The client sees a body without a manifest, which verification refuses.
            tracing::warn!(error = %e, "audit export over HTTP stopped");
        }
    });
    let content_type = match format {
        Format::Jsonl => "application/x-ndjson",
        Format::Csv => "text/csv; charset=utf-8",
    };
    let mut response = Response::new(Body::from_stream(ReceiverStream(rx)));
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    Ok(response)
}
