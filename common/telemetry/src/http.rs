//! The `/metrics` endpoint every role serves, on axum over hyper: `GET /metrics` (or `HEAD`)
//! answers the OpenMetrics text produced by the caller's render function, any other path is
//! `404`, any other method `405`. hyper answers a malformed request `400` and a request head
//! over [`MAX_HEAD_BYTES`] `431`. One request per connection, which is all a scraper needs.
//!
//! Scrapes may need the job token (`Authorization: Bearer <token>`, else `401`): by
//! default when the endpoint listens on an address other than loopback ([`Access`]). At
//! most [`MAX_CONNECTIONS`] are served at once (more are closed at once), a client gets
//! [`READ_TIMEOUT`] to send its request head, and running out of file descriptors pauses
//! the accept loop instead of spinning it.

use axum::extract::State;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Produces the `/metrics` body (OpenMetrics text, see [`crate::render_prometheus`]) on
/// each scrape.
pub type Render = Arc<dyn Fn() -> String + Send + Sync>;

/// The content type of the OpenMetrics text format.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Longest request head read before the request is refused (hyper's smallest buffer).
pub const MAX_HEAD_BYTES: usize = 8 * 1024;

/// How long a client may take to send its request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Most scrapes served at once.
pub const MAX_CONNECTIONS: usize = 64;

/// How long the accept loop pauses after an error (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Who may scrape: anyone, or only callers with the job token.
#[derive(Debug, Clone)]
pub struct Access {
    token: String,
    require: Option<bool>,
}

impl Access {
    /// Scrapes carry `token` when `require` says so; when it is `None`, only an endpoint
    /// bound to a non-loopback address requires it.
    pub fn new(token: &str, require: Option<bool>) -> Self {
        Access {
            token: token.to_owned(),
            require,
        }
    }

    /// No token needed, wherever the endpoint listens.
    pub fn open() -> Self {
        Access {
            token: String::new(),
            require: Some(false),
        }
    }

    /// The `Authorization` value scrapes of an endpoint bound to `bound` must carry.
    fn expected(&self, bound: SocketAddr) -> Option<String> {
        let require = self.require.unwrap_or(!bound.ip().is_loopback());
        require.then(|| format!("Bearer {}", self.token))
    }
}

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
    access: Access,
) -> Result<Option<SocketAddr>, ConfiguredError> {
    let (addr, setting) = match flag {
        Some(addr) => (addr, "--metrics-listen"),
        None => match configured {
            Some(addr) => (addr, field),
            None => return Ok(None),
        },
    };
    let bound = start(&addr, render, access.clone())
        .await
        .map_err(|error| ConfiguredError { setting, error })?;
    let token = if access.expected(bound).is_some() {
        " (the job token required)"
    } else {
        ""
    };
    tracing::info!("Prometheus metrics at http://{bound}/metrics{token}");
    Ok(Some(bound))
}

/// What the `/metrics` handler reads: the render function and the `Authorization` value
/// required, if any.
#[derive(Clone)]
struct Scrape {
    render: Render,
    expected: Option<Arc<str>>,
}

/// Binds `addr` (`HOST:PORT`, port 0 picks a free port) and serves `render` to callers
/// `access` lets in, on the current tokio runtime until the runtime stops; returns the
/// bound address.
pub async fn start(addr: &str, render: Render, access: Access) -> Result<SocketAddr, ServeError> {
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
    let app = router(Scrape {
        render,
        expected: access.expected(bound).map(Arc::from),
    });
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((stream, _)) => stream,
                Err(_) => {
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
                continue;
            };
            let service = TowerToHyperService::new(app.clone());
            tokio::spawn(async move {
                let _ = hyper::server::conn::http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(READ_TIMEOUT)
                    .max_buf_size(MAX_HEAD_BYTES)
                    .keep_alive(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
                drop(slot);
            });
        }
    });
    Ok(bound)
}

/// `/metrics` for `GET` and `HEAD`; `405` for other methods there, `404` elsewhere.
fn router(scrape: Scrape) -> Router {
    Router::new()
        .route("/metrics", get(metrics).fallback(wrong_method))
        .fallback(not_found)
        .with_state(scrape)
}

/// The exposition text, or `401` without the required token.
async fn metrics(State(scrape): State<Scrape>, headers: HeaderMap) -> Response {
    if let Some(expected) = &scrape.expected {
        let given = headers
            .get(header::AUTHORIZATION)
            .map(|value| value.as_bytes())
            .unwrap_or_default();
        if !same_bytes(given, expected.as_bytes()) {
            return (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer realm=\"quill\"")],
                "send the job token: Authorization: Bearer <token>\n",
            )
                .into_response();
        }
    }
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], (scrape.render)()).into_response()
}

async fn wrong_method(method: Method) -> Response {
    (
        StatusCode::METHOD_NOT_ALLOWED,
        [(header::ALLOW, "GET, HEAD")],
        format!("{method} is not allowed: use GET\n"),
    )
        .into_response()
}

async fn not_found(uri: Uri) -> Response {
    (
        StatusCode::NOT_FOUND,
        format!("{} not found: try /metrics\n", uri.path()),
    )
        .into_response()
}

/// Whether `a` equals `b`, in time that depends only on their lengths.
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

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
            let addr = start("127.0.0.1:0", render, Access::open()).await.unwrap();
            assert_ne!(addr.port(), 0);
            let ok = request(addr, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(ok.starts_with("HTTP/1.1 200 OK\r\n"), "{ok}");
            let lower = ok.to_ascii_lowercase();
            assert!(
                lower.contains(&format!("content-type: {CONTENT_TYPE}")),
                "{ok}"
            );
            assert!(lower.contains("content-length: 11\r\n"), "{ok}");
            assert!(lower.contains("connection: close\r\n"), "{ok}");
            assert!(ok.ends_with("\r\n\r\nquill_up 1\n"), "{ok}");
            let query = request(addr, "GET /metrics?x=1 HTTP/1.0\r\n\r\n").await;
            assert!(query.starts_with("HTTP/1.0 200 OK"), "{query}");
            let head = request(addr, "HEAD /metrics HTTP/1.1\r\n\r\n").await;
            assert!(head.starts_with("HTTP/1.1 200 OK") && head.ends_with("\r\n\r\n"));
            let nope = request(addr, "GET /nope HTTP/1.1\r\n\r\n").await;
            assert!(nope.starts_with("HTTP/1.1 404 Not Found"), "{nope}");
            assert!(nope.ends_with("/nope not found: try /metrics\n"), "{nope}");
            let post = request(addr, "POST /metrics HTTP/1.1\r\n\r\n").await;
            assert!(
                post.starts_with("HTTP/1.1 405 Method Not Allowed"),
                "{post}"
            );
            assert!(
                post.to_ascii_lowercase().contains("allow: get, head"),
                "{post}"
            );
            assert!(post.ends_with("POST is not allowed: use GET\n"), "{post}");
            let junk = request(addr, "hello\r\n\r\n").await;
            assert!(junk.starts_with("HTTP/1.1 400 Bad Request"), "{junk}");
            let huge = format!("GET /metrics HTTP/1.1\r\nX: {}", "a".repeat(9_000));
            let huge = request(addr, &huge).await;
            assert!(
                huge.starts_with("HTTP/1.1 431 Request Header Fields Too Large"),
                "{huge}"
            );
        });
    }

    #[test]
    fn bad_addresses_are_named() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let render: Render = Arc::new(String::new);
            let err = start("localhost", Arc::clone(&render), Access::open())
                .await
                .unwrap_err();
            assert!(err.to_string().contains("on localhost"), "{err}");
            let taken = start("127.0.0.1:0", Arc::clone(&render), Access::open())
                .await
                .unwrap();
            let err = start(&taken.to_string(), render, Access::open())
                .await
                .unwrap_err();
            assert!(err.to_string().contains(&taken.to_string()), "{err}");
        });
    }

    #[test]
    fn the_flag_wins_over_the_job_field_and_errors_name_the_one_used() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let render: Render = Arc::new(String::new);
            let field = "metrics.prometheus_addr";
            let none =
                start_configured(None, field, None, Arc::clone(&render), Access::open()).await;
            assert!(none.unwrap().is_none());
            let from_field = start_configured(
                None,
                field,
                Some("127.0.0.1:0".into()),
                Arc::clone(&render),
                Access::open(),
            )
            .await;
            assert!(from_field.unwrap().is_some());
            let bad_field = start_configured(
                None,
                field,
                Some("x".into()),
                Arc::clone(&render),
                Access::open(),
            )
            .await
            .unwrap_err();
            assert!(bad_field.to_string().starts_with(field), "{bad_field}");
            let bad_flag = start_configured(
                Some("y".into()),
                field,
                Some("127.0.0.1:0".into()),
                render,
                Access::open(),
            )
            .await
            .unwrap_err();
            assert!(
                bad_flag.to_string().starts_with("--metrics-listen: ")
                    && bad_flag.to_string().contains("on y"),
                "{bad_flag}"
            );
        });
    }

    #[test]
    fn the_token_is_required_off_loopback_or_when_asked() {
        let runtime = tokio::runtime::Runtime::new().unwrap();
        runtime.block_on(async {
            let render: Render = Arc::new(|| "quill_up 1\n".to_owned());
            let loopback: SocketAddr = "127.0.0.1:9".parse().unwrap();
            let wide: SocketAddr = "10.1.2.3:9".parse().unwrap();
            assert_eq!(Access::new("t", None).expected(loopback), None);
            assert_eq!(
                Access::new("t", None).expected(wide).as_deref(),
                Some("Bearer t")
            );
            assert_eq!(Access::new("t", Some(false)).expected(wide), None);
            let addr = start("127.0.0.1:0", render, Access::new("s3cret", Some(true)))
                .await
                .unwrap();
            let get = "GET /metrics HTTP/1.1\r\n";
            let none = request(addr, &format!("{get}\r\n")).await;
            assert!(none.starts_with("HTTP/1.1 401 Unauthorized"), "{none}");
            assert!(
                none.to_ascii_lowercase()
                    .contains("www-authenticate: bearer"),
                "{none}"
            );
            let wrong = request(addr, &format!("{get}Authorization: Bearer nope\r\n\r\n")).await;
            assert!(wrong.starts_with("HTTP/1.1 401"), "{wrong}");
            let right = request(addr, &format!("{get}authorization: Bearer s3cret\r\n\r\n")).await;
            assert!(right.starts_with("HTTP/1.1 200 OK"), "{right}");
            assert!(right.ends_with("quill_up 1\n"), "{right}");
        });
    }
}
