//! gRPC plumbing shared by every role: message limits, HTTP/2 windows sized for weight
//! streams, client endpoints, the one authenticated server every role runs ([`serve`]),
//! and clients that carry the job token. Every endpoint and server uses the process's
//! [`Transport`] (plaintext on loopback by default, or mutual TLS with the job CA).
//!
//! [`serve`] checks the job token on every call, applies the message limits and windows,
//! and turns a panic in a handler into a gRPC `INTERNAL` answer ("handler panicked: …")
//! instead of a dropped connection; the server keeps serving.

use crate::auth::{attach_session, attach_token, require_token, AttachToken};
use crate::incoming;
use crate::learner_client::LearnerClient;
use crate::learner_server::{Learner, LearnerServer};
use crate::reward_client::RewardClient;
use crate::reward_server::{Reward, RewardServer};
use crate::tls::{self, Transport};
use crate::weight_relay_client::WeightRelayClient;
use crate::weight_relay_server::{WeightRelay, WeightRelayServer};
use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::body::Body;
use tonic::codegen::{http, Service};
use tonic::server::NamedService;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};
use tonic::Status;

/// Heartbeat periods without an answer after which a member decides the learner is gone.
pub const LEARNER_SILENCE_HEARTBEATS: u32 = 10;

/// Largest gRPC message any role sends (a weight chunk, a learner rank's shard).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
/// Largest request a server takes that carries no rollouts (registrations, heartbeats,
/// weight requests), and the least any server takes.
pub const SMALL_REQUEST_BYTES: usize = 1 << 20;

/// Largest request a learner or reward worker takes in a job whose groups hold
/// `group_size` samples of at most `max_new_tokens` tokens after a prompt of at most
/// `context` tokens: per generated token 10 bytes of id, 4 of log-prob and up to 32 of
/// text, per prompt token 10 bytes, 64 KiB for the question and the rest, all doubled;
/// never under [`SMALL_REQUEST_BYTES`]. A larger request is refused (`OUT_OF_RANGE`) from
/// its length prefix, before its body is read.
pub fn group_request_bytes(group_size: usize, max_new_tokens: usize, context: usize) -> usize {
    let sample = max_new_tokens.saturating_mul(10 + 4 + 32) + 256;
    let group = group_size
        .saturating_mul(sample)
        .saturating_add(context.saturating_mul(10))
        .saturating_add(64 << 10);
    group
        .saturating_mul(2)
        .clamp(SMALL_REQUEST_BYTES, MAX_MESSAGE_BYTES)
}
/// Most calls in flight at once on one connection.
pub const MAX_STREAMS: u32 = 256;
/// HTTP/2 per-stream window: large, so a weight stream is not throttled by acks.
const STREAM_WINDOW: u32 = 16 << 20;
/// HTTP/2 per-connection window.
const CONNECTION_WINDOW: u32 = 32 << 20;
/// Largest HTTP/2 frame a peer may send: 1 MiB instead of 16 KiB, so a 4 MiB weight chunk
/// crosses in 4 frames rather than 256.
const MAX_FRAME: u32 = 1 << 20;

/// A learner client that sends the job token.
pub type LearnerConn = LearnerClient<InterceptedService<Channel, AttachToken>>;
/// A reward-worker client that sends the job token.
pub type RewardConn = RewardClient<InterceptedService<Channel, AttachToken>>;

/// An actor-relay client that sends the job token.
pub type RelayConn = WeightRelayClient<InterceptedService<Channel, AttachToken>>;

/// A client endpoint for `HOST:PORT` with connect and call timeouts and wide windows,
/// over the process's transport ([`Transport::process`]).
pub fn endpoint(addr: &str, timeout: Duration) -> Result<Endpoint, String> {
    endpoint_on(Transport::process(), addr, timeout)
}

/// A client endpoint for `HOST:PORT` over `transport`: `https://` checked against the job
/// CA and `HOST` when TLS is on (with `timeout` for the handshake too), else `http://`,
/// which is refused for an address that is not loopback unless plaintext is allowed.
pub fn endpoint_on(
    transport: &Transport,
    addr: &str,
    timeout: Duration,
) -> Result<Endpoint, String> {
    let scheme = if transport.tls().is_some() {
        "https"
    } else {
        "http"
    };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{addr}"))
        .map_err(|e| format!("bad address `{addr}`: {e}"))?;
    match transport.tls() {
        Some(identity) => {
            endpoint = endpoint
                .tls_config(identity.tonic_client(tls::host_of(addr), timeout))
                .map_err(|e| format!("TLS for `{addr}`: {e}"))?;
        }
        None => transport
            .check("the address", addr)
            .map_err(|e| e.to_string())?,
    }
    Ok(endpoint
        .connect_timeout(timeout)
        .timeout(timeout)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME)))
}

/// Connects `endpoint`, trying again every `every` until it answers or `within` has
/// passed (a member may start before the learner listens); the last error after that.
pub async fn connect_retrying(
    endpoint: &Endpoint,
    within: Duration,
    every: Duration,
) -> Result<Channel, tonic::transport::Error> {
    let started = std::time::Instant::now();
    loop {
        match endpoint.connect().await {
            Ok(channel) => return Ok(channel),
            Err(e) if started.elapsed() > within => return Err(e),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// A generated gRPC server (`LearnerServer`, `RewardServer`, `WeightRelayServer`): what
/// [`serve`] runs, with message limits it sets.
pub trait GrpcServer:
    Service<
        http::Request<Body>,
        Response = http::Response<Body>,
        Error = Infallible,
        Future: Send + 'static,
    > + NamedService
    + Clone
    + Send
    + Sync
    + 'static
{
    /// The server with its decoding (request) and encoding (reply) limits.
    fn limit_messages(self, decode: usize, encode: usize) -> Self;
}

macro_rules! grpc_servers {
    ($($server:ident<$handler:ident>),*) => {$(
        impl<T: $handler> GrpcServer for $server<T> {
            fn limit_messages(self, decode: usize, encode: usize) -> Self {
                self.max_decoding_message_size(decode)
                    .max_encoding_message_size(encode)
            }
        }
    )*};
}

grpc_servers!(
    LearnerServer<Learner>,
    RewardServer<Reward>,
    WeightRelayServer<WeightRelay>
);

/// Serves `service` on `listener` until `shutdown` resolves: every call must carry the
/// job `token` (else `UNAUTHENTICATED`), requests up to `max_request_bytes` (a larger one
/// is `OUT_OF_RANGE`), replies up to [`MAX_MESSAGE_BYTES`], wide HTTP/2
/// windows and frames, and a handler that panics answers `INTERNAL` ("handler panicked:
/// …") while the server goes on serving. (A panic while a server stream is being sent,
/// after the handler returned, still ends that stream's connection.)
///
/// Connections are bounded ([`incoming::bounded`]): at most half the process's file
/// descriptors, each closed after `idle` without a byte from the peer (the server pings
/// every `idle / 4`, which live clients answer), at most [`MAX_STREAMS`] calls at once on
/// one connection.
///
/// The process's transport ([`Transport::process`]) carries the connections: TLS (a
/// client certificate from the job CA required, the handshake within
/// [`tls::HANDSHAKE_TIMEOUT`] or `idle`, whichever is shorter, on a bounded connection), or plaintext, which takes only
/// loopback peers unless the job allows plaintext.
pub async fn serve(
    listener: TcpListener,
    token: String,
    service: impl GrpcServer,
    max_request_bytes: usize,
    idle: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let transport = Transport::process();
    serve_on(
        transport,
        listener,
        token,
        service,
        max_request_bytes,
        idle,
        shutdown,
    )
    .await
}

/// [`serve`] over `transport`.
pub async fn serve_on(
    transport: &Transport,
    listener: TcpListener,
    token: String,
    service: impl GrpcServer,
    max_request_bytes: usize,
    idle: Duration,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let service = InterceptedService::new(
        CatchPanic(service.limit_messages(max_request_bytes, MAX_MESSAGE_BYTES)),
        require_token(token),
    );
    let mut limits = incoming::Limits::for_process(idle);
    limits.loopback_only = matches!(transport, Transport::Loopback);
    let mut builder = Server::builder();
    if let Some(identity) = transport.tls() {
        builder = builder.tls_config(identity.tonic_server(tls::HANDSHAKE_TIMEOUT.min(idle)))?;
    }
    builder
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME))
        .max_concurrent_streams(Some(MAX_STREAMS))
        .http2_keepalive_interval(Some(idle / 4))
        .http2_keepalive_timeout(Some(idle / 4))
        .add_service(service)
        .serve_with_incoming_shutdown(incoming::bounded(listener, limits), shutdown)
        .await
}

/// A service whose calls answer `INTERNAL` when the handler panics.
#[derive(Debug, Clone)]
struct CatchPanic<S>(S);

impl<S: NamedService> NamedService for CatchPanic<S> {
    const NAME: &'static str = S::NAME;
}

impl<S, Request, B> Service<Request> for CatchPanic<S>
where
    S: Service<Request, Response = http::Response<B>>,
    B: Default,
{
    type Response = http::Response<B>;
    type Error = S::Error;
    type Future = CaughtPanic<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: Request) -> Self::Future {
        CaughtPanic(Box::pin(self.0.call(request)))
    }
}

/// A handler's future; a panic while it runs becomes an `INTERNAL` response.
struct CaughtPanic<F>(Pin<Box<F>>);

impl<F, B, E> Future for CaughtPanic<F>
where
    F: Future<Output = Result<http::Response<B>, E>>,
    B: Default,
{
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let handler = self.0.as_mut();
        match catch_unwind(AssertUnwindSafe(|| handler.poll(cx))) {
            Ok(poll) => poll,
            Err(panic) => Poll::Ready(Ok(Status::internal(format!(
                "handler panicked: {}",
                panic_message(panic.as_ref())
            ))
            .into_http())),
        }
    }
}

/// The message a panic was raised with.
pub fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(text) = panic.downcast_ref::<&str>() {
        text
    } else if let Some(text) = panic.downcast_ref::<String>() {
        text
    } else {
        "(no message)"
    }
}

/// A learner client over `channel` with the job token and the message limits.
pub fn learner_client(channel: Channel, token: &str) -> LearnerConn {
    learner_client_with(channel, attach_token(token))
}

/// A learner client for a registered member or a joined rank: it also sends the session
/// secret `session` the learner gave it.
pub fn learner_client_in_session(channel: Channel, token: &str, session: &str) -> LearnerConn {
    learner_client_with(channel, attach_session(token, session))
}

fn learner_client_with(channel: Channel, credentials: AttachToken) -> LearnerConn {
    LearnerClient::with_interceptor(channel, credentials)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A reward-worker client over `channel` with the job token and the message limits.
pub fn reward_client(channel: Channel, token: &str) -> RewardConn {
    RewardClient::with_interceptor(channel, attach_token(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

/// A weight-relay client over `channel` with the job token and the message limits.
pub fn relay_client(channel: Channel, token: &str) -> RelayConn {
    WeightRelayClient::with_interceptor(channel, attach_token(token))
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reward_server::Reward;
    use crate::{RolloutGroup, ScoreReply};
    use tonic::{Code, Request, Response};

    /// Accepts every group except lease 13, on which it panics.
    struct Fragile;

    #[tonic::async_trait]
    impl Reward for Fragile {
        async fn score(
            &self,
            request: Request<RolloutGroup>,
        ) -> Result<Response<ScoreReply>, Status> {
            assert_ne!(request.get_ref().lease_id, 13, "unlucky lease");
            Ok(Response::new(ScoreReply {
                accepted: true,
                duplicate: false,
            }))
        }
    }

    /// Serves `service` with the token `right` on a free loopback port in the background;
    /// returns its address.
    pub(crate) async fn loopback(service: impl GrpcServer) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(serve(
            listener,
            "right".into(),
            service,
            SMALL_REQUEST_BYTES,
            Duration::from_secs(60),
            std::future::pending(),
        ));
        addr
    }

    async fn client(token: &str) -> RewardConn {
        let addr = loopback(RewardServer::new(Fragile)).await;
        let channel = endpoint(&addr, Duration::from_secs(10))
            .unwrap()
            .connect()
            .await
            .unwrap();
        reward_client(channel, token)
    }

    fn lease(lease_id: u64) -> RolloutGroup {
        RolloutGroup {
            lease_id,
            ..RolloutGroup::default()
        }
    }

    #[tokio::test]
    async fn a_wrong_token_is_refused() {
        let refused = client("wrong").await.score(lease(1)).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused:?}");
    }

    #[tokio::test]
    async fn a_panicking_handler_answers_internal_and_the_server_goes_on() {
        let mut reward = client("right").await;
        let failed = reward.score(lease(13)).await.unwrap_err();
        assert_eq!(failed.code(), Code::Internal, "{failed:?}");
        assert!(
            failed.message().starts_with("handler panicked:")
                && failed.message().contains("unlucky lease"),
            "{}",
            failed.message()
        );
        let next = reward.score(lease(2)).await.unwrap().into_inner();
        assert!(next.accepted);
    }

    #[tokio::test]
    async fn a_request_over_the_limit_is_refused_before_it_is_read() {
        let mut reward = client("right").await;
        let mut huge = lease(3);
        huge.question = "x".repeat(SMALL_REQUEST_BYTES + 1);
        let refused = reward.score(huge).await.unwrap_err();
        assert_eq!(refused.code(), Code::OutOfRange, "{refused:?}");
        assert!(
            refused.message().contains("message length too large"),
            "{}",
            refused.message()
        );
        assert!(reward.score(lease(4)).await.unwrap().into_inner().accepted);
    }

    /// A TLS reward server on loopback for the job in `dir` (certificate for `names`);
    /// its address and the server's files.
    async fn tls_server(dir: &std::path::Path, names: &[&str]) -> (String, tls::TlsFiles) {
        let files = crate::tls::tests::write_job_certs(dir, names);
        let transport =
            Transport::Tls(std::sync::Arc::new(tls::TlsIdentity::load(&files).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            serve_on(
                &transport,
                listener,
                "right".into(),
                RewardServer::new(Fragile),
                SMALL_REQUEST_BYTES,
                Duration::from_secs(60),
                std::future::pending(),
            )
            .await
        });
        (addr, files)
    }

    /// Scores one group at `addr` over `transport`.
    async fn score_over(transport: &Transport, addr: &str) -> Result<ScoreReply, String> {
        let channel = endpoint_on(transport, addr, Duration::from_secs(5))?
            .connect()
            .await
            .map_err(|e| format!("{e:?}"))?;
        reward_client(channel, "right")
            .score(lease(5))
            .await
            .map(|r| r.into_inner())
            .map_err(|s| format!("{s:?}"))
    }

    #[tokio::test]
    async fn a_tls_server_takes_only_clients_of_its_job_ca_that_dial_its_name() {
        let dir = tempfile::tempdir().unwrap();
        let (addr, files) = tls_server(dir.path(), &["127.0.0.1"]).await;
        let port = addr.rsplit_once(':').unwrap().1.to_owned();
        let job = Transport::Tls(std::sync::Arc::new(tls::TlsIdentity::load(&files).unwrap()));
        // The job's own client works.
        assert!(score_over(&job, &addr).await.unwrap().accepted);
        // A plaintext client gets no answer.
        let plain = score_over(&Transport::Loopback, &addr).await.unwrap_err();
        assert!(!plain.is_empty());
        // A client whose certificate (and trust) come from another CA is refused.
        let elsewhere = tempfile::tempdir().unwrap();
        let other = crate::tls::tests::write_job_certs(elsewhere.path(), &["127.0.0.1"]);
        let stranger = Transport::Tls(std::sync::Arc::new(tls::TlsIdentity::load(&other).unwrap()));
        score_over(&stranger, &addr).await.unwrap_err();
        // A stranger's certificate with the job CA trusted: the server refuses it.
        let impostor_files = tls::TlsFiles {
            ca: files.ca.clone(),
            ..other
        };
        let impostor = Transport::Tls(std::sync::Arc::new(
            tls::TlsIdentity::load(&impostor_files).unwrap(),
        ));
        let refused = score_over(&impostor, &addr).await.unwrap_err();
        assert!(!refused.is_empty());
        // Dialing a name the certificate does not carry fails the client's check.
        let misnamed = score_over(&job, &format!("localhost:{port}"))
            .await
            .unwrap_err();
        assert!(misnamed.contains("NotValidForName"), "{misnamed}");
        // The server still serves its job after all that.
        assert!(score_over(&job, &addr).await.unwrap().accepted);
    }

    /// A peer that trickles a TLS hello a byte at a time (never silent for the idle limit)
    /// is cut off when the handshake deadline passes.
    #[tokio::test]
    async fn a_trickled_handshake_is_cut_off_at_its_deadline() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let files = crate::tls::tests::write_job_certs(dir.path(), &["127.0.0.1"]);
        let transport =
            Transport::Tls(std::sync::Arc::new(tls::TlsIdentity::load(&files).unwrap()));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            serve_on(
                &transport,
                listener,
                "right".into(),
                RewardServer::new(Fragile),
                SMALL_REQUEST_BYTES,
                Duration::from_millis(1500),
                std::future::pending(),
            )
            .await
        });
        let mut peer = tokio::net::TcpStream::connect(addr).await.unwrap();
        let started = std::time::Instant::now();
        // A handshake record header announcing 16 KiB, then a byte every 300 ms.
        let mut trickle = vec![0x16, 0x03, 0x01, 0x40, 0x00];
        trickle.extend(std::iter::repeat_n(0x01, 30));
        let mut closed = false;
        for byte in trickle {
            if peer.write_all(&[byte]).await.is_err() {
                closed = true;
                break;
            }
            let mut buf = [0u8; 64];
            match tokio::time::timeout(Duration::from_millis(300), peer.read(&mut buf)).await {
                Ok(Ok(0)) | Ok(Err(_)) => {
                    closed = true;
                    break;
                }
                _ => {}
            }
        }
        let waited = started.elapsed();
        assert!(closed, "the trickling peer was kept for {waited:?}");
        assert!(
            waited >= Duration::from_millis(1200) && waited < Duration::from_secs(4),
            "{waited:?}"
        );
    }

    #[tokio::test]
    async fn plaintext_is_refused_off_loopback_unless_allowed() {
        let err = endpoint_on(
            &Transport::Loopback,
            "10.0.0.7:50051",
            Duration::from_secs(1),
        )
        .unwrap_err();
        assert!(
            err.contains("10.0.0.7:50051 is not a loopback address"),
            "{err}"
        );
        endpoint_on(
            &Transport::Plaintext,
            "10.0.0.7:50051",
            Duration::from_secs(1),
        )
        .unwrap();
        endpoint_on(
            &Transport::Loopback,
            "127.0.0.1:50051",
            Duration::from_secs(1),
        )
        .unwrap();
    }

    #[test]
    fn the_request_limit_follows_the_job() {
        assert_eq!(group_request_bytes(8, 160, 512), SMALL_REQUEST_BYTES);
        let long = group_request_bytes(16, 16_384, 32_768);
        assert_eq!(long, 2 * (16 * (16_384 * 46 + 256) + 327_680 + 65_536));
        assert!(long < 32 << 20, "{long}");
        assert_eq!(group_request_bytes(usize::MAX, 1, 1), MAX_MESSAGE_BYTES);
    }
}
