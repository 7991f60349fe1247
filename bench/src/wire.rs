//! The load's own HTTP/1.1 client: one keep-alive connection per load
//! connection, a request written in one buffer, the answer read with
//! `httparse`. The load generator shares the machine with the ledger, and
//! the pooled `reqwest` client cost ~37 µs of CPU per request (a URL parsed,
//! a pool lock, a hand-off to a connection task and back): a tenth of the
//! machine at the peak, which the pgbench baseline's C client does not pay.
//! Set-up, lag probes and checks stay on `reqwest` (see `client.rs`).

use crate::client::Answer;
use anyhow::{bail, Context};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// The longest one request may take, as the pooled client's timeout.
const TIMEOUT: Duration = Duration::from_secs(60);
const MAX_HEADERS: usize = 32;

pub struct Wire {
    /// `host:port` of the server.
    authority: String,
    stream: Option<TcpStream>,
    request: Vec<u8>,
    /// Bytes read and not yet consumed (an answer's head, its body).
    read: Vec<u8>,
}

/// An answer's head: what the load needs of it.
struct Head {
    status: u16,
    replayed: bool,
    length: BodyLength,
    close: bool,
    /// Bytes of `read` the head took.
    size: usize,
}

enum BodyLength {
    Exactly(usize),
    Chunked,
    /// No length given: the body runs to the end of the connection.
    UntilClose,
}

enum Failure {
    /// Nothing of an answer came before the connection failed: a kept
    /// connection the server closed while it was idle. Sending again is safe
    /// (every load request carries its Idempotency-Key or is a read).
    BeforeAnswer(anyhow::Error),
    /// The server could not be reached.
    Connect,
    Other(anyhow::Error),
}

impl Wire {
    /// `base` is the server's `http://host:port` address.
    pub fn new(base: &str) -> anyhow::Result<Wire> {
        let Some(rest) = base.strip_prefix("http://") else { bail!("the load speaks plain http only: {base}") };
        let authority = rest.trim_end_matches('/').to_owned();
        if authority.is_empty() || authority.contains('/') {
            bail!("expected http://host:port, got {base}");
        }
        Ok(Wire { authority, stream: None, request: Vec::with_capacity(1024), read: Vec::with_capacity(4096) })
    }

    pub async fn post(&mut self, path: &str, token: &str, key: &str, body: &[u8]) -> Answer {
        self.request.clear();
        self.write_head("POST", path, token);
        self.request.extend_from_slice(b"Idempotency-Key: ");
        self.request.extend_from_slice(key.as_bytes());
        self.request.extend_from_slice(b"\r\nContent-Type: application/json\r\nContent-Length: ");
        self.request.extend_from_slice(body.len().to_string().as_bytes());
        self.request.extend_from_slice(b"\r\n\r\n");
        self.request.extend_from_slice(body);
        self.exchange().await
    }

    pub async fn get(&mut self, path: &str, token: &str) -> Answer {
        self.request.clear();
        self.write_head("GET", path, token);
        self.request.extend_from_slice(b"\r\n");
        self.exchange().await
    }

    fn write_head(&mut self, method: &str, path: &str, token: &str) {
        let r = &mut self.request;
        r.extend_from_slice(method.as_bytes());
        r.push(b' ');
        r.extend_from_slice(path.as_bytes());
        r.extend_from_slice(b" HTTP/1.1\r\nHost: ");
        r.extend_from_slice(self.authority.as_bytes());
        r.extend_from_slice(b"\r\nAuthorization: Bearer ");
        r.extend_from_slice(token.as_bytes());
        r.extend_from_slice(b"\r\n");
    }

    async fn exchange(&mut self) -> Answer {
        let reused = self.stream.is_some();
        let first = tokio::time::timeout(TIMEOUT, self.send_and_read()).await;
        let result = match first {
            Ok(Err(Failure::BeforeAnswer(_))) if reused => {
                self.stream = None;
                tokio::time::timeout(TIMEOUT, self.send_and_read()).await
            }
            other => other,
        };
        match result {
            Ok(Ok(answer)) => answer,
            Ok(Err(Failure::Connect)) => {
                self.stream = None;
                transport("connect")
            }
            Ok(Err(Failure::BeforeAnswer(e) | Failure::Other(e))) => {
                self.stream = None;
                transport(if e.chain().any(|c| c.is::<std::io::Error>()) { "transport" } else { "protocol" })
            }
            Err(_) => {
                self.stream = None;
                transport("timeout")
            }
        }
    }

    async fn send_and_read(&mut self) -> Result<Answer, Failure> {
        if self.stream.is_none() {
            let stream = TcpStream::connect(&self.authority).await.map_err(|_| Failure::Connect)?;
            stream.set_nodelay(true).context("TCP_NODELAY").map_err(Failure::Other)?;
            self.stream = Some(stream);
            self.read.clear();
        }
        let Some(stream) = self.stream.as_mut() else { return Err(Failure::Other(anyhow::anyhow!("no connection"))) };
        stream.write_all(&self.request).await.context("sending").map_err(Failure::BeforeAnswer)?;
        // Nothing of an answer yet: a failure now is one of a connection
        // the server closed while it was idle.
        let mut answered = !self.read.is_empty();
        let head = loop {
            match parse_head(&self.read).map_err(Failure::Other)? {
                // An interim answer (100 Continue, 103 Early Hints): the
                // final one follows.
                Some(head) if (100..200).contains(&head.status) && head.status != 101 => {
                    self.read.drain(..head.size);
                    continue;
                }
                Some(head) => break head,
                None => {}
            }
            let n = read_more(stream, &mut self.read).await;
            let failed = match n {
                Ok(0) => Some(anyhow::anyhow!("the server closed the connection")),
                Ok(_) => None,
                Err(e) => Some(e),
            };
            if let Some(e) = failed {
                return Err(if answered { Failure::Other(e) } else { Failure::BeforeAnswer(e) });
            }
            answered = true;
        };
        self.read.drain(..head.size);
        let body = match head.length {
            BodyLength::Exactly(n) => {
                while self.read.len() < n {
                    if read_more(stream, &mut self.read).await.map_err(Failure::Other)? == 0 {
                        return Err(Failure::Other(anyhow::anyhow!("the body ended early")));
                    }
                }
                self.read.drain(..n).collect::<Vec<u8>>()
            }
            BodyLength::Chunked => read_chunked(stream, &mut self.read).await.map_err(Failure::Other)?,
            BodyLength::UntilClose => {
                while read_more(stream, &mut self.read).await.map_err(Failure::Other)? > 0 {}
                self.stream = None;
                std::mem::take(&mut self.read)
            }
        };
        if head.close {
            self.stream = None;
            self.read.clear();
        }
        let body =
            if body.is_empty() { serde_json::Value::Null } else { serde_json::from_slice(&body).unwrap_or_default() };
        Ok(Answer { status: head.status, body, replayed: head.replayed })
    }
}

async fn read_more(stream: &mut TcpStream, into: &mut Vec<u8>) -> anyhow::Result<usize> {
    let at = into.len();
    into.resize(at + 8192, 0);
    let n = stream.read(&mut into[at..]).await;
    into.truncate(at + *n.as_ref().unwrap_or(&0));
    n.context("receiving")
}

/// The head of an answer in `bytes`, once it is all there.
fn parse_head(bytes: &[u8]) -> anyhow::Result<Option<Head>> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut response = httparse::Response::new(&mut headers);
    let size = match response.parse(bytes).context("parsing the answer's head")? {
        httparse::Status::Complete(size) => size,
        httparse::Status::Partial => return Ok(None),
    };
    let status = response.code.context("an answer without a status")?;
    let mut head = Head { status, replayed: false, length: BodyLength::UntilClose, close: false, size };
    for h in response.headers.iter() {
        let value = std::str::from_utf8(h.value).unwrap_or("").trim();
        if h.name.eq_ignore_ascii_case("content-length") {
            // Transfer-Encoding overrides Content-Length (RFC 9112, 6.3).
            if !matches!(head.length, BodyLength::Chunked) {
                head.length = BodyLength::Exactly(value.parse().context("Content-Length")?);
            }
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") && value.eq_ignore_ascii_case("chunked") {
            head.length = BodyLength::Chunked;
        } else if h.name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            head.close = true;
        } else if h.name.eq_ignore_ascii_case("idempotent-replayed") {
            head.replayed = value == "true";
        }
    }
    // Answers that never have a body.
    if status == 204 || status == 304 || (100..200).contains(&status) {
        head.length = BodyLength::Exactly(0);
    }
    Ok(Some(head))
}

/// A chunked body, from `read` and then the connection.
async fn read_chunked(stream: &mut TcpStream, read: &mut Vec<u8>) -> anyhow::Result<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let line = read_line(stream, read).await?;
        let line = std::str::from_utf8(&line).context("chunk size")?;
        let size = usize::from_str_radix(line.split(';').next().unwrap_or("").trim(), 16).context("chunk size")?;
        if size == 0 {
            // Trailers, if any, up to the empty line that ends the body.
            while !read_line(stream, read).await?.is_empty() {}
            return Ok(body);
        }
        let framed = size.checked_add(2).context("chunk size")?;
        while read.len() < framed {
            if read_more(stream, read).await? == 0 {
                bail!("the chunked body ended early");
            }
        }
        if &read[size..framed] != b"\r\n" {
            bail!("a chunk not followed by CRLF");
        }
        body.extend_from_slice(&read[..size]);
        read.drain(..framed);
    }
}

/// The next CRLF-terminated line of `read` (without its CRLF), taken from it.
async fn read_line(stream: &mut TcpStream, read: &mut Vec<u8>) -> anyhow::Result<Vec<u8>> {
    loop {
        if let Some(i) = read.windows(2).position(|w| w == b"\r\n") {
            let line = read[..i].to_vec();
            read.drain(..i + 2);
            return Ok(line);
        }
        if read_more(stream, read).await? == 0 {
            bail!("the chunked body ended early");
        }
    }
}

fn transport(what: &str) -> Answer {
    Answer { status: 0, body: serde_json::json!({ "type": format!("transport/{what}") }), replayed: false }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_with_a_length_and_the_replay_header_is_read() {
        let bytes = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nidempotent-replayed: true\r\ncontent-length: 2\r\n\r\n{}";
        let head = parse_head(bytes).unwrap().unwrap();
        assert_eq!(head.status, 201);
        assert!(head.replayed);
        assert!(matches!(head.length, BodyLength::Exactly(2)));
        assert_eq!(&bytes[head.size..], b"{}");
    }

    #[test]
    fn a_partial_head_asks_for_more() {
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-le").unwrap().is_none());
    }

    #[test]
    fn only_plain_http_addresses_are_taken() {
        assert!(Wire::new("https://x:1").is_err());
        assert_eq!(Wire::new("http://127.0.0.1:8080/").unwrap().authority, "127.0.0.1:8080");
    }

    /// Against a one-shot server: an interim answer, then a chunked one with
    /// a trailer (and a Content-Length it overrides); then a kept connection
    /// the server closed while idle is replaced and the request sent again.
    #[tokio::test]
    async fn chunked_answers_and_closed_idle_connections_are_handled() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            // First connection: one chunked answer, then closed.
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf).await.unwrap();
            s.write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-length: 99\r\n\r\n3\r\n{\"a\r\n4\r\n\":1}\r\n0\r\nx-trailer: 1\r\n\r\n")
                .await
                .unwrap();
            drop(s);
            // Second connection: a problem answer with a length.
            let (mut s, _) = listener.accept().await.unwrap();
            let n = s.read(&mut buf).await.unwrap();
            let request = String::from_utf8_lossy(&buf[..n]).to_string();
            let body = br#"{"type":"insufficient-funds"}"#;
            s.write_all(
                format!("HTTP/1.1 422 Unprocessable Entity\r\ncontent-length: {}\r\n\r\n", body.len()).as_bytes(),
            )
            .await
            .unwrap();
            s.write_all(body).await.unwrap();
            request
        });
        let mut wire = Wire::new(&format!("http://{addr}")).unwrap();
        let first = wire.get("/v1/x", "t").await;
        assert_eq!(first.status, 200);
        assert_eq!(first.body, serde_json::json!({ "a": 1 }));
        let second = wire.post("/v1/transfers", "t", "k-1", b"{}").await;
        assert_eq!(second.status, 422);
        assert_eq!(second.error_kind(), "422 insufficient-funds");
        let request = server.await.unwrap();
        assert!(request.starts_with("POST /v1/transfers HTTP/1.1\r\n"), "{request}");
        assert!(request.contains("\r\nIdempotency-Key: k-1\r\n") && request.ends_with("\r\n\r\n{}"), "{request}");
    }
}
