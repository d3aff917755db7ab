//! A minimal HTTP/1.1 responder for Prometheus scrapes, shared by every role: `GET /metrics`
//! (or `HEAD`) answers the text exposition format produced by the caller's render
//! function, any other path is `404`, any other method `405`, a malformed request `400`.
//! One request per connection (`Connection: close`), which is all a scraper needs.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Produces the `/metrics` body (Prometheus text format) on each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the Prometheus text exposition format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Longest request head read before the request is refused.
const MAX_HEAD_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The endpoint could not start.
#[derive(Debug, thiserror::Error)]
#[error("cannot serve Prometheus metrics on {addr}: {source}")]
pub struct ServeError {
    /// The address asked for.
    pub addr: String,
    /// What the OS said.
    pub source: std::io::Error,
}

/// The endpoint asked for by a flag or a job field could not start.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {error}")]
pub struct ConfiguredError {
    /// The flag or job field the address came from.
    pub setting: &'static str,
    /// Why it could not start.
    #[source]
    pub error: ServeError,
}

/// Serves `render` where the process's `--metrics-listen` flag says, else where the job's
/// `field` (whose value is `configured`) says, and logs the bound address; does nothing
/// when neither names an address. The error names the flag or field.
pub async fn start_configured(
    flag: Option<String>,
    field: &'static str,
    configured: Option<String>,
    render: Render,
) -> Result<Option<SocketAddr>, ConfiguredError> {
    let (addr, setting) = match flag {
        Some(addr) => (addr, "--metrics-listen"),
        None => match configured {
            Some(addr) => (addr, field),
            None => return Ok(None),
        },
    };
    let bound = start(&addr, render)
        .await
        .map_err(|error| ConfiguredError { setting, error })?;
    tracing::info!("Prometheus metrics at http://{bound}/metrics");
    Ok(Some(bound))
}

/// Binds `addr` (`HOST:PORT`, port 0 picks a free port) and serves `render` on the current
/// tokio runtime until the runtime stops; returns the bound address.
pub async fn start(addr: &str, render: Render) -> Result<SocketAddr, ServeError> {
    let error = |source| ServeError {
        addr: addr.to_owned(),
        source,
    };
    let parsed: SocketAddr = addr.parse().map_err(|e| {
        error(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("not an ip:port address ({e})"),
        ))
    })?;
    let listener = TcpListener::bind(parsed).await.map_err(error)?;
    let bound = listener.local_addr().map_err(error)?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let render = Arc::clone(&render);
            tokio::spawn(async move {
                let _ = answer(stream, &render).await;
            });
        }
    });
    Ok(bound)
}

/// Reads one request head and writes the answer.
async fn answer(mut stream: TcpStream, render: &Render) -> std::io::Result<()> {
    let head = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Ok(head) => head?,
        Err(_) => return Ok(()),
    };
    let (status, extra, body) = respond(head.as_deref(), render);
    let is_head = head.as_deref().is_some_and(|h| h.starts_with("HEAD "));
    let content_type = if status == "200 OK" {
        CONTENT_TYPE
    } else {
        "text/plain; charset=utf-8"
    };
    let mut reply = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n{extra}Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    if !is_head {
        reply.extend_from_slice(body.as_bytes());
    }
    stream.write_all(&reply).await?;
    stream.shutdown().await
}

/// The request head up to the blank line, or `None` when it is too long or not text.
async fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<String>> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        if buf.len() > MAX_HEAD_BYTES {
            return Ok(None);
        }
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    Ok(String::from_utf8(buf).ok())
}

/// Status line, extra headers and body for a request head.
fn respond(head: Option<&str>, render: &Render) -> (&'static str, &'static str, String) {
    let line = head.and_then(|h| h.lines().next()).unwrap_or_default();
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return ("400 Bad Request", "", "malformed request line\n".into());
    };
    if !version.starts_with("HTTP/1.") {
        return ("400 Bad Request", "", "only HTTP/1.x is served\n".into());
    }
    let path = target.split('?').next().unwrap_or_default();
    if path != "/metrics" {
        return (
            "404 Not Found",
            "",
            format!("{path} not found: try /metrics\n"),
        );
    }
    if method != "GET" && method != "HEAD" {
        return (
            "405 Method Not Allowed",
            "Allow: GET, HEAD\r\n",
            format!("{method} is not allowed: use GET\n"),
        );
    }
    ("200 OK", "", render())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn request(addr: SocketAddr, raw: &str) -> String {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(raw.as_bytes()).await.unwrap();
        let mut out = String::new();
        stream.read_to_string(&mut out).await.unwrap();
        out
    }

    #[test]
    fn serves_metrics_and_refuses_the_rest() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let render: Render = Arc::new(|| "quill_up 1\n".to_owned());
            let addr = start("127.0.0.1:0", render).await.unwrap();
            assert_ne!(addr.port(), 0);
            let ok = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
            assert!(ok.contains(CONTENT_TYPE), "{ok}");
            assert!(ok.contains("Content-Length: 11\r\n"), "{ok}");
            assert!(ok.ends_with("\r\n\r\nquill_up 1\n"), "{ok}");
            let query = request(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
            assert!(query.starts_with("HTTP/1.1 200 OK"), "{query}");
            let head = request(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"));
            let nope = request(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
            assert!(nope.starts_with("HTTP/1.1 404 Not Found"), "{nope}");
            let post = request(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(
                post.starts_with("HTTP/1.1 405 Method Not Allowed"),
                "{post}"
            );
            assert!(post.contains("Allow: GET, HEAD"), "{post}");
            let junk = request(addr, "hello\r\n\r\n").await;
            assert!(junk.starts_with("HTTP/1.1 400 Bad Request"), "{junk}");
            let huge = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(9_000));
            let huge = request(addr, &huge).await;
            assert!(huge.starts_with("HTTP/1.1 400 Bad Request"), "{huge}");
        });
    }

    #[test]
    fn bad_addresses_are_named() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let render: Render = Arc::new(String::new);
            let err = start("localhost", Arc::clone(&render)).await.unwrap_err();
            assert!(err.to_string().contains("on localhost"), "{err}");
            let taken = start("127.0.0.1:0", Arc::clone(&render)).await.unwrap();
            let err = start(&taken.to_string(), render).await.unwrap_err();
            assert!(err.to_string().contains(&taken.to_string()), "{err}");
        });
    }

    #[test]
    fn the_flag_wins_over_the_job_field_and_errors_name_the_one_used() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let render: Render = Arc::new(String::new);
            let field = "metrics.prometheus_addr";
            let none = start_configured(None, field, None, Arc::clone(&render)).await;
            assert!(none.unwrap().is_none());
            let from_field =
                start_configured(None, field, Some("127.0.0.1:0".into()), Arc::clone(&render))
                    .await;
            assert!(from_field.unwrap().is_some());
            let bad_field = start_configured(None, field, Some("x".into()), Arc::clone(&render))
                .await
                .unwrap_err();
            assert!(bad_field.to_string().starts_with(field), "{bad_field}");
            let bad_flag =
                start_configured(Some("y".into()), field, Some("127.0.0.1:0".into()), render)
                    .await
                    .unwrap_err();
            assert!(
                bad_flag.to_string().starts_with("--metrics-listen: ")
                    && bad_flag.to_string().contains("on y"),
                "{bad_flag}"
            );
        });
    }
}
