//! The connections a gRPC server takes, bounded against idle and hostile peers: at most
//! [`Limits::max_connections`] at once (a connection beyond is closed at once), a peer
//! that sends nothing for [`Limits::idle`] is cut off (the server's HTTP/2 pings keep live
//! clients talking, so only silent sockets hit it), and running out of file descriptors
//! makes the accept loop pause instead of spinning. A plaintext server that may only talk
//! to loopback ([`Limits::loopback_only`]) drops connections from anywhere else. TLS, when
//! on, runs over these connections (tonic's acceptor, with a handshake deadline), so a
//! handshake holds a slot and is cut off like any other silence.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, Instant, Sleep};
use tokio_stream::Stream;
use tonic::transport::server::{Connected, TcpConnectInfo};

/// How long the accept loop pauses after an error (e.g. out of file descriptors).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Bounds on a server's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most open connections.
    pub max_connections: usize,
    /// Longest silence from a peer before its connection is closed.
    pub idle: Duration,
    /// Close connections that do not come from a loopback address.
    pub loopback_only: bool,
}

impl Limits {
    /// The default bounds: an idle limit of `idle`, and at most half of this process's
    /// file-descriptor limit in connections (at most 4,096, at least 16), so a flood of
    /// sockets cannot starve the process of descriptors; peers from any address.
    pub fn for_process(idle: Duration) -> Self {
        Limits {
            max_connections: (open_file_limit() / 2).clamp(16, 4096),
            idle,
            loopback_only: false,
        }
    }
}

/// This process's soft limit on open file descriptors (1,024 when it cannot be read).
pub fn open_file_limit() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` through a valid pointer.
    let read = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } == 0;
    if read {
        usize::try_from(limit.rlim_cur).unwrap_or(usize::MAX)
    } else {
        1024
    }
}

/// Accepts connections from `listener` within `limits`, as a stream for tonic's
/// `serve_with_incoming`.
pub fn bounded(
    listener: TcpListener,
    limits: Limits,
) -> impl Stream<Item = io::Result<Guarded>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(async move {
        loop {
            let stream = match listener.accept().await {
                Ok((_, peer)) if limits.loopback_only && !peer.ip().is_loopback() => {
                    tracing::warn!(%peer, "plaintext server: closing a connection from outside loopback");
                    continue;
                }
                Ok((stream, _)) => stream,
                Err(e) => {
                    tracing::warn!("accept failed: {e}; pausing");
                    sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::warn!(
                    limit = limits.max_connections,
                    "connection limit reached: closing a new connection"
                );
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let guarded = Guarded::new(stream, limits.idle, permit);
            if tx.send(Ok(guarded)).await.is_err() {
                return;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// A TCP connection that holds one of the server's connection slots and fails its reads
/// once the peer has been silent for the idle limit.
pub struct Guarded {
    stream: TcpStream,
    idle: Duration,
    silence: Pin<Box<Sleep>>,
    _slot: OwnedSemaphorePermit,
}

impl Guarded {
    fn new(stream: TcpStream, idle: Duration, slot: OwnedSemaphorePermit) -> Self {
        Guarded {
            stream,
            idle,
            silence: Box::pin(sleep(idle)),
            _slot: slot,
        }
    }
}

impl Connected for Guarded {
    type ConnectInfo = TcpConnectInfo;

    fn connect_info(&self) -> TcpConnectInfo {
        self.stream.connect_info()
    }
}

impl AsyncRead for Guarded {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.stream).poll_read(cx, buf) {
            Poll::Ready(result) => {
                if buf.filled().len() > before {
                    let until = Instant::now() + self.idle;
                    self.silence.as_mut().reset(until);
                }
                Poll::Ready(result)
            }
            Poll::Pending => match self.silence.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "the peer was silent for too long",
                ))),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::AsyncReadExt;
    use tokio_stream::StreamExt;

    #[tokio::test]
    async fn silent_peers_are_cut_off_and_connections_are_capped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = Limits {
            max_connections: 2,
            idle: Duration::from_millis(300),
            loopback_only: false,
        };
        let mut incoming = Box::pin(bounded(listener, limits));
        let _first = TcpStream::connect(addr).await.unwrap();
        let mut talker = TcpStream::connect(addr).await.unwrap();
        let mut third = TcpStream::connect(addr).await.unwrap();
        let mut silent = incoming.next().await.unwrap().unwrap();
        let mut talking = incoming.next().await.unwrap().unwrap();
        // The third is over the limit: closed at once.
        let mut byte = [0u8; 1];
        assert_eq!(third.read(&mut byte).await.unwrap(), 0);
        // The talking peer keeps its connection past the idle limit; the silent one not.
        let keep_talking = async {
            for _ in 0..5 {
                tokio::io::AsyncWriteExt::write_all(&mut talker, b"x")
                    .await
                    .unwrap();
                sleep(Duration::from_millis(100)).await;
            }
        };
        let read_talking = async {
            let mut got = 0;
            while got < 5 {
                got += talking.read(&mut [0u8; 8]).await.unwrap();
            }
        };
        let started = Instant::now();
        tokio::join!(keep_talking, read_talking);
        let err = silent.read(&mut byte).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= Duration::from_millis(250));
        // A freed slot takes a new connection.
        drop(silent);
        let _fourth = TcpStream::connect(addr).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        assert!(accepted.unwrap().unwrap().is_ok());
    }

    /// This host's address on its default route (not loopback), if it has one.
    fn outside_address() -> Option<std::net::IpAddr> {
        let socket = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
        socket.connect("192.0.2.1:9").ok()?;
        let ip = socket.local_addr().ok()?.ip();
        (!ip.is_loopback()).then_some(ip)
    }

    #[tokio::test]
    async fn a_plaintext_server_takes_only_loopback_peers() {
        let Some(outside) = outside_address() else {
            panic!("this test needs a non-loopback IPv4 address on the host");
        };
        let listener = TcpListener::bind("0.0.0.0:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let limits = Limits {
            max_connections: 8,
            idle: Duration::from_secs(10),
            loopback_only: true,
        };
        let mut incoming = Box::pin(bounded(listener, limits));
        let mut stranger = TcpStream::connect((outside, port)).await.unwrap();
        let mut byte = [0u8; 1];
        let closed = tokio::time::timeout(Duration::from_secs(5), stranger.read(&mut byte)).await;
        assert!(
            matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
            "a peer from {outside} was kept: {closed:?}"
        );
        let _local = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let accepted = tokio::time::timeout(Duration::from_secs(5), incoming.next()).await;
        let guarded = accepted.unwrap().unwrap().unwrap();
        assert!(guarded
            .connect_info()
            .remote_addr()
            .unwrap()
            .ip()
            .is_loopback());
    }

    #[test]
    fn the_default_connection_limit_follows_the_descriptor_limit() {
        let limits = Limits::for_process(Duration::from_secs(1));
        assert_eq!(
            limits.max_connections,
            (open_file_limit() / 2).clamp(16, 4096)
        );
        assert!(open_file_limit() > 0);
    }
}
