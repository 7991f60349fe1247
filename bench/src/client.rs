//! The HTTP side: one pooled client, answers reduced to status and JSON.

use anyhow::bail;
use serde_json::Value;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Http {
    client: reqwest::Client,
    base: String,
}

/// An answer, or the transport failure that stood in for one.
pub struct Answer {
    pub status: u16,
    pub body: Value,
    pub replayed: bool,
}

impl Answer {
    pub fn ok(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// What to count this answer under when it is not a success: the problem
    /// type, or the status when the body is not problem+json.
    pub fn error_kind(&self) -> String {
        match self.body.get("type").and_then(Value::as_str) {
            Some(t) => format!("{} {}", self.status, t),
            None => format!("{} (no problem type)", self.status),
        }
    }

    pub fn position(&self) -> Option<i64> {
        self.body.get("position").and_then(Value::as_i64)
    }
}

impl Http {
    pub fn new(base: &str, connections: usize) -> anyhow::Result<Http> {
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(connections * 2)
            .timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()?;
        Ok(Http { client, base: base.trim_end_matches('/').to_owned() })
    }

    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Ok(r) = self.client.get(format!("{}/healthz", self.base)).send().await {
                if r.status().is_success() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!("{} did not answer /healthz", self.base);
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    pub async fn post(&self, path: &str, token: Option<&str>, key: Option<&str>, body: &Value) -> Answer {
        let mut request = self.client.post(format!("{}{path}", self.base)).json(body);
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        if let Some(key) = key {
            request = request.header("idempotency-key", key);
        }
        answer(request.send().await).await
    }

    pub async fn get(&self, path: &str, token: &str) -> Answer {
        answer(self.client.get(format!("{}{path}", self.base)).bearer_auth(token).send().await).await
    }

    /// A POST that must succeed (set-up steps).
    pub async fn must_post(
        &self,
        path: &str,
        token: Option<&str>,
        key: Option<&str>,
        body: &Value,
    ) -> anyhow::Result<Value> {
        let a = self.post(path, token, key, body).await;
        if !a.ok() {
            bail!("POST {path} answered {}: {}", a.status, a.body);
        }
        Ok(a.body)
    }
}

async fn answer(sent: Result<reqwest::Response, reqwest::Error>) -> Answer {
    match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            let replayed = response.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
            let body = match response.bytes().await {
                Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                Err(e) => return transport(e),
            };
            Answer { status, body, replayed }
        }
        Err(e) => transport(e),
    }
}

fn transport(e: reqwest::Error) -> Answer {
    let what = if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else {
        "transport"
    };
    Answer { status: 0, body: serde_json::json!({ "type": format!("transport/{what}") }), replayed: false }
}
