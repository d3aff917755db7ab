//! The CPU backend: a ring over TCP. Every rank holds one connection to the next rank and
//! one from the previous; all-reduce is reduce-scatter then all-gather (each rank sends
//! 2(K-1)/K of the buffer), broadcast is forwarded around the ring in chunks. Each message
//! starts with a header (operation, sequence number, length) so ranks that fall out of
//! step fail loudly. Socket timeouts bound every wait; a closed socket names the rank.
//!
//! Ranks prove who they are with an HMAC challenge over the job token. When the process's
//! transport is TLS ([`Transport`]), every ring connection is mutual TLS with the job CA
//! first (the connecting rank checks the next rank's certificate against its ring address,
//! the accepting rank requires a client certificate from the job CA), and the challenge
//! and all traffic run inside it. Without TLS the ring is plaintext, and only over loopback
//! addresses unless the job allows plaintext.

use super::{check_parts, Collective, CollectiveError, ReduceOp, Result};
use hmac::{Hmac, Mac};
use quill_proto::tls::{self, Transport};
use rustls::{ClientConnection, ServerConnection, StreamOwned};
use sha2::Sha256;
use std::io::{ErrorKind, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};

const MAGIC: u32 = 0x5155_494c; // "QUIL"
/// Bytes of the nonce an accepting rank sends.
const NONCE_BYTES: usize = 16;
/// Bytes of a hello: magic, rank, world size.
const HELLO_BYTES: usize = 12;
/// Bytes of a hello and its HMAC-SHA256 tag.
const SIGNED_HELLO_BYTES: usize = HELLO_BYTES + 32;
/// How long an accepted connection has to prove it is the previous rank, in all (its
/// TLS handshake and its hello, however slowly the bytes come).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(2);

/// Who a connecting rank says it is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Hello {
    rank: usize,
    world: usize,
}

impl Hello {
    fn bytes(self) -> [u8; HELLO_BYTES] {
        let mut hello = [0u8; HELLO_BYTES];
        hello[..4].copy_from_slice(&MAGIC.to_le_bytes());
        hello[4..8].copy_from_slice(&(self.rank as u32).to_le_bytes());
        hello[8..].copy_from_slice(&(self.world as u32).to_le_bytes());
        hello
    }

    fn mac(nonce: &[u8], hello: &[u8], key: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
        mac.update(nonce);
        mac.update(hello);
        mac
    }

    /// The hello with its tag over `nonce`.
    fn signed(self, nonce: &[u8], key: &[u8]) -> [u8; SIGNED_HELLO_BYTES] {
        let hello = self.bytes();
        let tag = Hello::mac(nonce, &hello, key).finalize().into_bytes();
        let mut signed = [0u8; SIGNED_HELLO_BYTES];
        signed[..HELLO_BYTES].copy_from_slice(&hello);
        signed[HELLO_BYTES..].copy_from_slice(&tag);
        signed
    }

    /// Checks that `answer` is this hello, signed over `nonce` with `key`.
    fn check(
        self,
        nonce: &[u8],
        answer: &[u8; SIGNED_HELLO_BYTES],
        key: &[u8],
    ) -> std::result::Result<(), String> {
        let (hello, tag) = answer.split_at(HELLO_BYTES);
        let word = |i: usize| u32::from_le_bytes(hello[i..i + 4].try_into().expect("4 bytes"));
        if word(0) != MAGIC {
            return Err("not a quill ring hello".into());
        }
        if hello != self.bytes() {
            return Err(format!("it claims rank {} of {}", word(4), word(8)));
        }
        Hello::mac(nonce, hello, key)
            .verify_slice(tag)
            .map_err(|_| "its hello is not signed with the job token".to_owned())
    }
}

/// A connected ring socket: blocking, no Nagle delay, `timeout` on every read and write.
fn configure(stream: TcpStream, timeout: Duration) -> Result<TcpStream> {
    let setup = |e: std::io::Error| CollectiveError::Setup(format!("socket: {e}"));
    stream.set_nonblocking(false).map_err(setup)?;
    stream.set_nodelay(true).map_err(setup)?;
    stream.set_read_timeout(Some(timeout)).map_err(setup)?;
    stream.set_write_timeout(Some(timeout)).map_err(setup)?;
    Ok(stream)
}

/// One ring connection: a TCP socket, or TLS over it (as the dialing or the accepting
/// side).
enum Link {
    Plain(TcpStream),
    Dialed(Box<StreamOwned<ClientConnection, TcpStream>>),
    Accepted(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Link {
    fn socket(&self) -> &TcpStream {
        match self {
            Link::Plain(s) => s,
            Link::Dialed(s) => &s.sock,
            Link::Accepted(s) => &s.sock,
        }
    }

    /// Sets the read and write timeout of the socket underneath.
    fn set_timeout(&self, timeout: Duration) -> std::io::Result<()> {
        self.socket().set_read_timeout(Some(timeout))?;
        self.socket().set_write_timeout(Some(timeout))
    }

    /// Dials TLS over `stream` to the rank at `addr` (its certificate must carry the
    /// host of `addr`), or keeps `stream` plaintext without TLS.
    fn dial(
        stream: TcpStream,
        transport: &Transport,
        addr: &str,
    ) -> std::result::Result<Self, String> {
        let Some(identity) = transport.tls() else {
            return Ok(Link::Plain(stream));
        };
        let name = tls::server_name(addr)?;
        let connection = ClientConnection::new(identity.client_config(), name)
            .map_err(|e| format!("TLS: {e}"))?;
        let mut link = StreamOwned::new(connection, stream);
        while link.conn.is_handshaking() {
            link.conn
                .complete_io(&mut link.sock)
                .map_err(|e| format!("TLS handshake with {addr}: {e}"))?;
        }
        Ok(Link::Dialed(Box::new(link)))
    }

    /// Accepts TLS on `stream` (a client certificate from the job CA required) by
    /// `deadline`, or keeps it plaintext without TLS.
    fn accept(
        stream: TcpStream,
        transport: &Transport,
        deadline: Instant,
    ) -> std::result::Result<Self, String> {
        let Some(identity) = transport.tls() else {
            return Ok(Link::Plain(stream));
        };
        let connection =
            ServerConnection::new(identity.server_config()).map_err(|e| format!("TLS: {e}"))?;
        let mut link = StreamOwned::new(connection, stream);
        while link.conn.is_handshaking() {
            let mut socket = ByDeadline {
                socket: &link.sock,
                deadline,
            };
            link.conn
                .complete_io(&mut socket)
                .map_err(|e| format!("TLS handshake: {e}"))?;
        }
        Ok(Link::Accepted(Box::new(link)))
    }

    /// Fills `buf` by `deadline`, however the bytes are spread over time.
    fn read_exact_by(&mut self, buf: &mut [u8], deadline: Instant) -> std::io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            self.set_timeout(time_left(deadline)?)?;
            match self.read(&mut buf[filled..]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// The time until `deadline`; a `TimedOut` error once it has passed.
fn time_left(deadline: Instant) -> std::io::Result<Duration> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        return Err(std::io::Error::new(
            ErrorKind::TimedOut,
            "the handshake's time is up",
        ));
    }
    Ok(left)
}

/// A socket whose every read and write must end by `deadline` (a whole handshake's), so
/// a peer that trickles bytes cannot stretch it read by read.
struct ByDeadline<'a> {
    socket: &'a TcpStream,
    deadline: Instant,
}

impl ByDeadline<'_> {
    fn arm(&self) -> std::io::Result<()> {
        let left = time_left(self.deadline)?;
        self.socket.set_read_timeout(Some(left))?;
        self.socket.set_write_timeout(Some(left))
    }
}

impl Read for ByDeadline<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.arm()?;
        (&mut &*self.socket).read(buf)
    }
}

impl Write for ByDeadline<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.arm()?;
        (&mut &*self.socket).write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        (&mut &*self.socket).flush()
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.read(buf),
            Link::Dialed(s) => s.read(buf),
            Link::Accepted(s) => s.read(buf),
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Link::Plain(s) => s.write(buf),
            Link::Dialed(s) => s.write(buf),
            Link::Accepted(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Link::Plain(s) => s.flush(),
            Link::Dialed(s) => s.flush(),
            Link::Accepted(s) => s.flush(),
        }
    }
}

/// Challenges an accepted connection (after its TLS handshake, when TLS is on) and keeps
/// it only if it proves to be `expected` within [`HANDSHAKE_TIMEOUT`] in all; why not
/// otherwise.
fn admit(
    stream: TcpStream,
    transport: &Transport,
    expected: Hello,
    key: &[u8],
    timeout: Duration,
) -> std::result::Result<Link, String> {
    let handshake = HANDSHAKE_TIMEOUT.min(timeout);
    let deadline = Instant::now() + handshake;
    let stream = configure(stream, handshake).map_err(|e| e.to_string())?;
    let mut link = Link::accept(stream, transport, deadline)?;
    let nonce: [u8; NONCE_BYTES] = rand::random();
    link.set_timeout(time_left(deadline).map_err(|e| e.to_string())?)
        .and_then(|()| link.write_all(&nonce))
        .and_then(|()| link.flush())
        .map_err(|e| e.to_string())?;
    let mut answer = [0u8; SIGNED_HELLO_BYTES];
    link.read_exact_by(&mut answer, deadline)
        .map_err(|e| format!("no hello ({e})"))?;
    expected.check(&nonce, &answer, key)?;
    link.set_timeout(timeout).map_err(|e| e.to_string())?;
    Ok(link)
}

/// The nonce the accepting rank sends first (zeros if it sends none: the answer is then
/// refused there, and the connection closed).
fn read_nonce(stream: &mut impl Read) -> [u8; NONCE_BYTES] {
    let mut nonce = [0u8; NONCE_BYTES];
    let _ = stream.read_exact(&mut nonce);
    nonce
}
const HEADER_BYTES: usize = 16;
const BROADCAST_CHUNK: usize = 4 << 20;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
#[repr(u32)]
enum Op {
    /// The reduce half of an all-reduce.
    Reduce = 1,
    /// The gather half of an all-reduce.
    Gather = 2,
    Broadcast = 3,
    ReduceScatter = 4,
    AllGather = 5,
}

/// A ring of TCP connections between the learner ranks (CPU tensors).
pub struct RingCollective {
    rank: usize,
    world: usize,
    next: Option<Link>,
    prev: Option<Link>,
    timeout: Duration,
    seq: u32,
}

fn io_error(
    op: &'static str,
    peer: usize,
    timeout: Duration,
    e: std::io::Error,
) -> CollectiveError {
    match e.kind() {
        ErrorKind::WouldBlock | ErrorKind::TimedOut => CollectiveError::Timeout {
            op,
            peer,
            seconds: timeout.as_secs_f64(),
        },
        _ => CollectiveError::PeerGone {
            op,
            peer,
            detail: if e.kind() == ErrorKind::UnexpectedEof {
                "connection closed".into()
            } else {
                e.to_string()
            },
        },
    }
}

impl RingCollective {
    /// Joins the ring: `listener` is this rank's bound socket and `addresses[r]` the address
    /// every rank `r` listens on. Connects to the next rank and accepts the previous one,
    /// both within `timeout`. Ranks prove who they are with `key` (the job token): the
    /// accepting rank sends a fresh nonce and the connecting rank answers with its hello
    /// (rank, world size) and an HMAC-SHA256 of nonce and hello. A connection that sends
    /// anything else, or nothing within [`HANDSHAKE_TIMEOUT`], is dropped and the rank
    /// goes on waiting for the true previous rank. Connections use the process's transport
    /// ([`Transport::process`]; see the module docs).
    pub fn connect(
        rank: usize,
        listener: TcpListener,
        addresses: &[String],
        timeout: Duration,
        key: &[u8],
    ) -> Result<Self> {
        Self::connect_on(
            Transport::process(),
            rank,
            listener,
            addresses,
            timeout,
            key,
        )
    }

    /// [`RingCollective::connect`] over `transport`.
    pub fn connect_on(
        transport: &Transport,
        rank: usize,
        listener: TcpListener,
        addresses: &[String],
        timeout: Duration,
        key: &[u8],
    ) -> Result<Self> {
        let world = addresses.len();
        if rank >= world {
            return Err(CollectiveError::Setup(format!(
                "rank {rank} is outside a world of {world}"
            )));
        }
        let mut ring = RingCollective {
            rank,
            world,
            next: None,
            prev: None,
            timeout,
            seq: 0,
        };
        if world == 1 {
            return Ok(ring);
        }
        for (r, addr) in addresses.iter().enumerate() {
            transport
                .check(&format!("the ring address of rank {r}"), addr)
                .map_err(|e| CollectiveError::Setup(e.to_string()))?;
        }
        let next_rank = (rank + 1) % world;
        let prev_rank = (rank + world - 1) % world;
        let deadline = Instant::now() + timeout;
        listener
            .set_nonblocking(true)
            .map_err(|e| CollectiveError::Setup(format!("listener: {e}")))?;
        let next_addr = &addresses[next_rank];
        let within = |missing: String| {
            CollectiveError::Setup(format!(
                "rank {rank}: {missing} within {:.0} s",
                timeout.as_secs_f64()
            ))
        };
        // Connecting waits for the next rank's nonce, which it sends only once it accepts:
        // each side runs on its own thread, or a ring of ranks that all connect first
        // would wait on each other.
        let (next, prev) = std::thread::scope(|scope| {
            let connecting = scope.spawn(|| -> Result<Link> {
                loop {
                    if Instant::now() > deadline {
                        return Err(within(format!(
                            "could not connect to rank {next_rank} at {next_addr}"
                        )));
                    }
                    if let Some(stream) = try_connect(next_addr)? {
                        let stream = configure(stream, timeout)?;
                        let mut link = Link::dial(stream, transport, next_addr).map_err(|e| {
                            CollectiveError::Setup(format!("rank {rank} to rank {next_rank}: {e}"))
                        })?;
                        let hello = Hello { rank, world }.signed(&read_nonce(&mut link), key);
                        link.write_all(&hello)
                            .and_then(|()| link.flush())
                            .map_err(|e| io_error("connect", next_rank, timeout, e))?;
                        return Ok(link);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            });
            let expected = Hello {
                rank: prev_rank,
                world,
            };
            let prev = loop {
                if Instant::now() > deadline {
                    break Err(within(format!("rank {prev_rank} did not connect")));
                }
                match listener.accept() {
                    Ok((stream, peer)) => match admit(stream, transport, expected, key, timeout) {
                        Ok(stream) => break Ok(stream),
                        Err(why) => tracing::warn!(
                            rank,
                            %peer,
                            "ring: refused a connection claiming to be rank {prev_rank}: {why}"
                        ),
                    },
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    Err(e) => break Err(CollectiveError::Setup(format!("accept: {e}"))),
                }
            };
            let next = connecting
                .join()
                .expect("the connecting thread does not panic");
            (next, prev)
        });
        ring.next = Some(next?);
        ring.prev = Some(prev?);
        Ok(ring)
    }

    fn next_stream(&mut self) -> &mut Link {
        self.next.as_mut().expect("connected")
    }

    fn next_rank(&self) -> usize {
        (self.rank + 1) % self.world
    }

    fn prev_rank(&self) -> usize {
        (self.rank + self.world - 1) % self.world
    }

    /// Sends `payload` to the next rank while receiving `expect` bytes from the previous one
    /// (both at once, so neither side blocks on a full socket buffer).
    fn exchange(&mut self, op: Op, payload: &[u8], expect: usize) -> Result<Vec<u8>> {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let name = op_name(op);
        let next = self.next.as_mut().expect("connected");
        let prev = self.prev.as_mut().expect("connected");
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || {
                next.write_all(&header(op, seq, payload.len()))?;
                next.write_all(payload)?;
                next.flush()
            });
            let received =
                receive(prev, op, seq, expect).map_err(|e| e.into_error(name, prev_rank, timeout));
            let sent = sender
                .join()
                .expect("the sender thread does not panic")
                .map_err(|e| io_error(name, next_rank, timeout, e));
            let received = received?;
            sent?;
            Ok(received)
        })
    }

    /// Ring all-reduce of a flat f32 buffer; every rank ends with identical values.
    pub fn all_reduce_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let k = self.world;
        if k > 1 {
            let n = data.len();
            let bounds = |i: usize| (i * n / k, (i + 1) * n / k);
            self.reduce_phase(data, &bounds, 1, Op::Reduce)?;
            self.gather_phase(data, &bounds, 1, Op::Gather)?;
        }
        if op == ReduceOp::Average && k > 1 {
            let scale = 1.0 / k as f32;
            data.iter_mut().for_each(|x| *x *= scale);
        }
        Ok(())
    }

    /// Ring reduce-scatter of a flat f32 buffer of `K·n` values: afterwards
    /// `data[rank·n .. (rank+1)·n]` holds the reduction over ranks (the rest is partial).
    pub fn reduce_scatter_f32(&mut self, data: &mut [f32], op: ReduceOp) -> Result<()> {
        let k = self.world;
        if data.len() % k != 0 {
            return Err(CollectiveError::Mismatch {
                op: op_name(Op::ReduceScatter),
                detail: format!("{} values do not split into {k} equal parts", data.len()),
            });
        }
        let n = data.len() / k;
        if k > 1 {
            self.reduce_phase(data, &|i| (i * n, (i + 1) * n), 0, Op::ReduceScatter)?;
            if op == ReduceOp::Average {
                let scale = 1.0 / k as f32;
                let own = &mut data[self.rank * n..(self.rank + 1) * n];
                own.iter_mut().for_each(|x| *x *= scale);
            }
        }
        Ok(())
    }

    /// Ring all-gather of a flat f32 buffer of `K·n` values whose part `rank` this rank
    /// fills: afterwards every part holds its owner's values, on every rank.
    pub fn all_gather_f32(&mut self, data: &mut [f32]) -> Result<()> {
        let k = self.world;
        if data.len() % k != 0 {
            return Err(CollectiveError::Mismatch {
                op: op_name(Op::AllGather),
                detail: format!("{} values do not split into {k} equal parts", data.len()),
            });
        }
        let n = data.len() / k;
        if k > 1 {
            self.gather_phase(data, &|i| (i * n, (i + 1) * n), 0, Op::AllGather)?;
        }
        Ok(())
    }

    /// The reduce-scatter half of a ring all-reduce: `K − 1` exchanges after which part
    /// `(rank + shift) % K` of `data` (parts given by `bounds`) holds the sum over ranks.
    fn reduce_phase(
        &mut self,
        data: &mut [f32],
        bounds: &dyn Fn(usize) -> (usize, usize),
        shift: usize,
        op: Op,
    ) -> Result<()> {
        let k = self.world;
        for step in 0..k - 1 {
            let send = (self.rank + shift + 2 * k - 1 - step) % k;
            let recv = (self.rank + shift + 2 * k - 2 - step) % k;
            let (s0, s1) = bounds(send);
            let (r0, r1) = bounds(recv);
            let incoming = self.exchange(op, &to_bytes(&data[s0..s1]), (r1 - r0) * 4)?;
            for (x, b) in data[r0..r1].iter_mut().zip(incoming.chunks_exact(4)) {
                *x += f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }

    /// The all-gather half: part `(rank + shift) % K` is this rank's, and `K − 1`
    /// exchanges pass every part around the ring.
    fn gather_phase(
        &mut self,
        data: &mut [f32],
        bounds: &dyn Fn(usize) -> (usize, usize),
        shift: usize,
        op: Op,
    ) -> Result<()> {
        let k = self.world;
        for step in 0..k - 1 {
            let send = (self.rank + shift + 2 * k - step) % k;
            let recv = (self.rank + shift + 2 * k - 1 - step) % k;
            let (s0, s1) = bounds(send);
            let (r0, r1) = bounds(recv);
            let incoming = self.exchange(op, &to_bytes(&data[s0..s1]), (r1 - r0) * 4)?;
            for (x, b) in data[r0..r1].iter_mut().zip(incoming.chunks_exact(4)) {
                *x = f32::from_le_bytes(b.try_into().expect("4 bytes"));
            }
        }
        Ok(())
    }

    /// Copies `root`'s bytes into every rank's `data` (same length everywhere), forwarded
    /// around the ring in chunks.
    pub fn broadcast_bytes(&mut self, data: &mut [u8], root: usize) -> Result<()> {
        let k = self.world;
        if root >= k {
            return Err(CollectiveError::Setup(format!(
                "broadcast root {root} is outside a world of {k}"
            )));
        }
        if k == 1 {
            return Ok(());
        }
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        let (next_rank, prev_rank, timeout) = (self.next_rank(), self.prev_rank(), self.timeout);
        let forward = next_rank != root;
        let name = op_name(Op::Broadcast);
        let send_err = |e| io_error(name, next_rank, timeout, e);
        if self.rank == root {
            let next = self.next_stream();
            next.write_all(&header(Op::Broadcast, seq, data.len()))
                .map_err(send_err)?;
            next.write_all(data).map_err(send_err)?;
            return next.flush().map_err(send_err);
        }
        let prev = self.prev.as_mut().expect("connected");
        read_header(prev, Op::Broadcast, seq, data.len())
            .map_err(|e| e.into_error(name, prev_rank, timeout))?;
        if forward {
            self.next_stream()
                .write_all(&header(Op::Broadcast, seq, data.len()))
                .map_err(send_err)?;
        }
        for chunk in data.chunks_mut(BROADCAST_CHUNK) {
            self.prev
                .as_mut()
                .expect("connected")
                .read_exact(chunk)
                .map_err(|e| io_error(name, prev_rank, timeout, e))?;
            if forward {
                self.next_stream().write_all(chunk).map_err(send_err)?;
            }
        }
        if forward {
            self.next_stream().flush().map_err(send_err)?;
        }
        Ok(())
    }
}

fn try_connect(addr: &str) -> Result<Option<TcpStream>> {
    let resolved: Vec<_> = match addr.to_socket_addrs() {
        Ok(addrs) => addrs.collect(),
        Err(e) => {
            return Err(CollectiveError::Setup(format!(
                "cannot resolve rank address `{addr}`: {e}"
            )))
        }
    };
    for a in resolved {
        if let Ok(stream) = TcpStream::connect_timeout(&a, Duration::from_millis(500)) {
            return Ok(Some(stream));
        }
    }
    Ok(None)
}

fn op_name(op: Op) -> &'static str {
    match op {
        Op::Reduce | Op::Gather => "all_reduce",
        Op::Broadcast => "broadcast",
        Op::ReduceScatter => "reduce_scatter",
        Op::AllGather => "all_gather",
    }
}

fn header(op: Op, seq: u32, len: usize) -> [u8; HEADER_BYTES] {
    let mut h = [0u8; HEADER_BYTES];
    h[..4].copy_from_slice(&(op as u32).to_le_bytes());
    h[4..8].copy_from_slice(&seq.to_le_bytes());
    h[8..].copy_from_slice(&(len as u64).to_le_bytes());
    h
}

enum ReceiveError {
    Io(std::io::Error),
    Mismatch(String),
}

impl ReceiveError {
    fn into_error(self, op: &'static str, peer: usize, timeout: Duration) -> CollectiveError {
        match self {
            ReceiveError::Io(e) => io_error(op, peer, timeout, e),
            ReceiveError::Mismatch(detail) => CollectiveError::Mismatch {
                op,
                detail: format!("from rank {peer}: {detail}"),
            },
        }
    }
}

fn read_header(
    stream: &mut impl Read,
    op: Op,
    seq: u32,
    len: usize,
) -> std::result::Result<(), ReceiveError> {
    let mut h = [0u8; HEADER_BYTES];
    stream.read_exact(&mut h).map_err(ReceiveError::Io)?;
    if h != header(op, seq, len) {
        let got_op = u32::from_le_bytes(h[..4].try_into().expect("4 bytes"));
        let got_seq = u32::from_le_bytes(h[4..8].try_into().expect("4 bytes"));
        let got_len = u64::from_le_bytes(h[8..].try_into().expect("8 bytes"));
        return Err(ReceiveError::Mismatch(format!(
            "expected {op:?} #{seq} of {len} bytes, got operation {got_op} #{got_seq} of {got_len} bytes"
        )));
    }
    Ok(())
}

fn receive(
    stream: &mut impl Read,
    op: Op,
    seq: u32,
    len: usize,
) -> std::result::Result<Vec<u8>, ReceiveError> {
    read_header(stream, op, seq, len)?;
    let mut buf = vec![0u8; len];
    stream.read_exact(&mut buf).map_err(ReceiveError::Io)?;
    Ok(buf)
}

fn to_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn check_cpu(tensor: &Tensor) -> Result<()> {
    if tensor.device() != Device::Cpu {
        return Err(CollectiveError::Unavailable {
            backend: "ring",
            reason: format!(
                "it reduces CPU tensors, got one on {:?}: use `parallel.collective = \"nccl\"` for CUDA",
                tensor.device()
            ),
        });
    }
    Ok(())
}

impl Collective for RingCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce(&mut self, tensor: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_cpu(tensor)?;
        if self.world == 1 {
            return Ok(());
        }
        let flat = tensor.f_to_kind(Kind::Float)?.f_reshape([-1])?;
        let mut values = Vec::<f32>::try_from(&flat)?;
        self.all_reduce_f32(&mut values, op)?;
        let reduced = Tensor::from_slice(&values)
            .f_reshape(tensor.size())?
            .f_to_kind(tensor.kind())?;
        tensor.f_copy_(&reduced)?;
        Ok(())
    }

    fn reduce_scatter(&mut self, input: &Tensor, output: &mut Tensor, op: ReduceOp) -> Result<()> {
        check_cpu(input)?;
        check_cpu(output)?;
        check_parts("reduce_scatter", input, output, self.world)?;
        let mut values = Vec::<f32>::try_from(&input.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
        self.reduce_scatter_f32(&mut values, op)?;
        let n = output.numel();
        let own = &values[self.rank * n..(self.rank + 1) * n];
        let reduced = Tensor::from_slice(own)
            .f_reshape(output.size())?
            .f_to_kind(output.kind())?;
        output.f_copy_(&reduced)?;
        Ok(())
    }

    fn all_gather(&mut self, input: &Tensor, output: &mut Tensor) -> Result<()> {
        check_cpu(input)?;
        check_cpu(output)?;
        check_parts("all_gather", output, input, self.world)?;
        let n = input.numel();
        let mut values = vec![0f32; n * self.world];
        let own = Vec::<f32>::try_from(&input.f_to_kind(Kind::Float)?.f_reshape([-1])?)?;
        values[self.rank * n..(self.rank + 1) * n].copy_from_slice(&own);
        self.all_gather_f32(&mut values)?;
        let gathered = Tensor::from_slice(&values)
            .f_reshape(output.size())?
            .f_to_kind(output.kind())?;
        output.f_copy_(&gathered)?;
        Ok(())
    }

    fn broadcast(&mut self, tensor: &mut Tensor, root: usize) -> Result<()> {
        check_cpu(tensor)?;
        if self.world == 1 {
            return Ok(());
        }
        let contiguous = tensor.contiguous();
        let numel = contiguous.numel();
        let mut bytes = vec![0u8; numel * contiguous.kind().elt_size_in_bytes()];
        contiguous.f_copy_data_u8(&mut bytes, numel)?;
        self.broadcast_bytes(&mut bytes, root)?;
        if self.rank != root {
            let received = Tensor::f_from_data_size(&bytes, &tensor.size(), tensor.kind())?;
            tensor.f_copy_(&received)?;
        }
        Ok(())
    }

    fn barrier(&mut self) -> Result<()> {
        let mut one = [1.0f32];
        self.all_reduce_f32(&mut one, ReduceOp::Sum)?;
        if one[0] as usize != self.world {
            return Err(CollectiveError::Mismatch {
                op: "barrier",
                detail: format!("{} of {} ranks arrived", one[0], self.world),
            });
        }
        Ok(())
    }
}

/// The job token of the loopback test rings.
#[cfg(test)]
const KEY: &[u8] = b"test-token";

/// `world` listeners on free loopback ports and their addresses.
#[cfg(test)]
fn loopback_listeners(world: usize) -> (Vec<TcpListener>, Vec<String>) {
    let listeners: Vec<TcpListener> = (0..world)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    let addresses = listeners
        .iter()
        .map(|l| l.local_addr().unwrap().to_string())
        .collect();
    (listeners, addresses)
}

/// Runs `body` on `world` ranks (threads), each with a ring over loopback, and returns
/// what each rank returned, by rank.
#[cfg(test)]
pub(crate) fn on_loopback_ranks<T: Send>(
    world: usize,
    timeout: Duration,
    body: impl Fn(RingCollective) -> T + Sync,
) -> Vec<T> {
    let (listeners, addresses) = loopback_listeners(world);
    std::thread::scope(|scope| {
        let handles: Vec<_> = listeners
            .into_iter()
            .enumerate()
            .map(|(rank, listener)| {
                let (addresses, body) = (&addresses, &body);
                scope.spawn(move || {
                    body(RingCollective::connect(rank, listener, addresses, timeout, KEY).unwrap())
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parallel::collective::CollectiveError;

    fn on_ranks<T: Send>(
        world: usize,
        timeout: Duration,
        body: impl Fn(RingCollective) -> T + Sync,
    ) -> Vec<T> {
        on_loopback_ranks(world, timeout, body)
    }

    fn values(rank: usize, n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i * 7 + rank * 13) % 23) as f32 * 0.37 - 3.0)
            .collect()
    }

    #[test]
    fn all_reduce_sums_and_averages_on_every_world_size() {
        for world in 1..=4 {
            for n in [1, 3, 10, 1001] {
                let results = on_ranks(world, Duration::from_secs(10), |mut ring| {
                    let mut sum = values(ring.rank(), n);
                    ring.all_reduce_f32(&mut sum, ReduceOp::Sum).unwrap();
                    let mut mean = values(ring.rank(), n);
                    ring.all_reduce_f32(&mut mean, ReduceOp::Average).unwrap();
                    (sum, mean)
                });
                let expected: Vec<f64> = (0..n)
                    .map(|i| (0..world).map(|r| f64::from(values(r, n)[i])).sum())
                    .collect();
                for (sum, mean) in &results {
                    for i in 0..n {
                        assert!((f64::from(sum[i]) - expected[i]).abs() < 1e-4);
                        assert!((f64::from(mean[i]) - expected[i] / world as f64).abs() < 1e-4);
                    }
                    assert_eq!(sum, &results[0].0, "every rank holds the same bits");
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_and_all_gather_split_by_rank_on_every_world_size() {
        for world in 1..=4 {
            for n in [1, 5, 300] {
                let results = on_ranks(world, Duration::from_secs(10), |mut ring| {
                    let rank = ring.rank();
                    let full = Tensor::from_slice(&values(rank, n * world));
                    let mut part = Tensor::zeros([n as i64], (Kind::Float, Device::Cpu));
                    ring.reduce_scatter(&full, &mut part, ReduceOp::Sum)
                        .unwrap();
                    let mut mean = Tensor::zeros([n as i64], (Kind::BFloat16, Device::Cpu));
                    ring.reduce_scatter(&full, &mut mean, ReduceOp::Average)
                        .unwrap();
                    let mut gathered =
                        Tensor::zeros([world as i64, n as i64], (Kind::Float, Device::Cpu));
                    ring.all_gather(&part, &mut gathered).unwrap();
                    (
                        Vec::<f32>::try_from(&part).unwrap(),
                        Vec::<f32>::try_from(mean.to_kind(Kind::Float)).unwrap(),
                        Vec::<f32>::try_from(gathered.reshape([-1])).unwrap(),
                    )
                });
                let expected: Vec<f64> = (0..n * world)
                    .map(|i| (0..world).map(|r| f64::from(values(r, n * world)[i])).sum())
                    .collect();
                for (rank, (part, mean, gathered)) in results.iter().enumerate() {
                    for i in 0..n {
                        let want = expected[rank * n + i];
                        assert!((f64::from(part[i]) - want).abs() < 1e-4, "rank {rank}");
                        let tolerance = 1e-2 * want.abs().max(1.0);
                        assert!((f64::from(mean[i]) - want / world as f64).abs() < tolerance);
                    }
                    assert_eq!(gathered, &results[0].2, "every rank gathers the same bits");
                    assert_eq!(&gathered[rank * n..(rank + 1) * n], part.as_slice());
                }
            }
        }
    }

    #[test]
    fn reduce_scatter_and_all_gather_refuse_bad_sizes_and_name_dead_ranks() {
        let errors = on_ranks(2, Duration::from_secs(5), |mut ring| {
            let zeros = |n: i64| Tensor::zeros([n], (Kind::Float, Device::Cpu));
            let local = ring
                .reduce_scatter(&zeros(5), &mut zeros(2), ReduceOp::Sum)
                .unwrap_err();
            let gather_local = ring.all_gather(&zeros(2), &mut zeros(3)).unwrap_err();
            // The ranks disagree on the part size: 2 × 3 against 2 × 4.
            let n = 3 + ring.rank() as i64;
            let across = ring
                .reduce_scatter(&zeros(2 * n), &mut zeros(n), ReduceOp::Sum)
                .unwrap_err();
            (local, gather_local, across)
        });
        for (local, gather_local, across) in errors {
            assert!(
                matches!(
                    local,
                    CollectiveError::Mismatch {
                        op: "reduce_scatter",
                        ..
                    }
                ) && local.to_string().contains("not 2 ranks × 2"),
                "{local}"
            );
            assert!(
                matches!(
                    gather_local,
                    CollectiveError::Mismatch {
                        op: "all_gather",
                        ..
                    }
                ),
                "{gather_local}"
            );
            assert!(
                matches!(
                    across,
                    CollectiveError::Mismatch {
                        op: "reduce_scatter",
                        ..
                    }
                ),
                "{across}"
            );
        }
        let gone = on_ranks(3, Duration::from_millis(800), |mut ring| {
            if ring.rank() == 2 {
                drop(ring);
                return None;
            }
            let mut out = Tensor::zeros([300], (Kind::Float, Device::Cpu));
            let part = Tensor::zeros([100], (Kind::Float, Device::Cpu));
            Some(ring.all_gather(&part, &mut out).unwrap_err())
        });
        for err in gone.into_iter().flatten() {
            let text = err.to_string();
            assert!(
                matches!(
                    err,
                    CollectiveError::PeerGone {
                        op: "all_gather",
                        ..
                    } | CollectiveError::Timeout {
                        op: "all_gather",
                        ..
                    }
                ),
                "{text}"
            );
            assert!(text.contains("learner rank"), "{text}");
        }
    }

    #[test]
    fn tensor_all_reduce_broadcast_and_barrier() {
        let results = on_ranks(3, Duration::from_secs(10), |mut ring| {
            let rank = ring.rank() as f64;
            let mut t = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]).reshape([2, 2]) * (rank + 1.0);
            ring.all_reduce(&mut t, ReduceOp::Sum).unwrap();
            let mut b = Tensor::from_slice(&[rank, rank * 2.0, 5.0]).to_kind(Kind::BFloat16);
            ring.all_reduce(&mut b, ReduceOp::Average).unwrap();
            let mut big = Tensor::full([3 << 20], rank, (Kind::Float, Device::Cpu));
            ring.broadcast(&mut big, 1).unwrap();
            ring.barrier().unwrap();
            (
                Vec::<f32>::try_from(t.reshape([-1])).unwrap(),
                Vec::<f32>::try_from(b.to_kind(Kind::Float)).unwrap(),
                big.min().double_value(&[]),
                big.max().double_value(&[]),
            )
        });
        for (sum, mean, lo, hi) in results {
            assert_eq!(sum, vec![6.0, 12.0, 18.0, 24.0]);
            assert_eq!(mean, vec![1.0, 2.0, 5.0]);
            assert_eq!((lo, hi), (1.0, 1.0));
        }
    }

    #[test]
    fn a_rank_that_dies_is_named_and_a_silent_one_times_out() {
        let results = on_ranks(3, Duration::from_millis(800), |mut ring| {
            let mut data = vec![1.0f32; 100];
            if ring.rank() == 2 {
                drop(ring);
                return None;
            }
            if ring.rank() == 1 {
                std::thread::sleep(Duration::from_millis(100));
            }
            Some(ring.all_reduce_f32(&mut data, ReduceOp::Sum).unwrap_err())
        });
        for err in results.into_iter().flatten() {
            let text = err.to_string();
            assert!(
                matches!(
                    err,
                    CollectiveError::PeerGone { .. } | CollectiveError::Timeout { .. }
                ),
                "{text}"
            );
            assert!(text.contains("learner rank"), "{text}");
        }
        let silent = on_ranks(2, Duration::from_millis(300), |mut ring| {
            if ring.rank() == 1 {
                std::thread::sleep(Duration::from_millis(900));
                return None;
            }
            let started = Instant::now();
            let err = ring.barrier().unwrap_err();
            Some((err, started.elapsed()))
        });
        let (err, waited) = silent.into_iter().flatten().next().unwrap();
        assert!(
            matches!(err, CollectiveError::Timeout { peer: 1, .. }),
            "{err}"
        );
        assert!(waited < Duration::from_millis(800), "{waited:?}");
    }

    /// Garbage, a silent connection and a hello signed with the wrong token reach rank
    /// 1's listener before rank 0 does: each is refused, and the true ring still forms.
    #[test]
    fn impostors_are_refused_and_the_ring_still_forms() {
        let (listeners, addresses) = loopback_listeners(2);
        let mut garbage = TcpStream::connect(&addresses[1]).unwrap();
        garbage.write_all(&[0x42; SIGNED_HELLO_BYTES]).unwrap();
        let _silent = TcpStream::connect(&addresses[1]).unwrap();
        // Answers with a hello one byte a second: each read is within the handshake
        // timeout, the whole would hold rank 1 for 44 s (beyond the ring's 10 s).
        let trickler = {
            let address = addresses[1].clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(address).unwrap();
                let nonce = read_nonce(&mut stream);
                let started = Instant::now();
                for byte in (Hello { rank: 0, world: 2 }).signed(&nonce, b"not-the-token") {
                    std::thread::sleep(Duration::from_secs(1));
                    if stream.write_all(&[byte]).is_err() {
                        break;
                    }
                }
                started.elapsed()
            })
        };
        let forger = {
            let address = addresses[1].clone();
            std::thread::spawn(move || {
                let mut stream = TcpStream::connect(address).unwrap();
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                let nonce = read_nonce(&mut stream);
                let forged = Hello { rank: 0, world: 2 }.signed(&nonce, b"not-the-token");
                stream.write_all(&forged).unwrap();
                let mut rest = Vec::new();
                let _ = stream.read_to_end(&mut rest);
            })
        };
        let sums = std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let addresses = &addresses;
                    scope.spawn(move || {
                        let mut ring = RingCollective::connect(
                            rank,
                            listener,
                            addresses,
                            Duration::from_secs(10),
                            KEY,
                        )
                        .unwrap();
                        let mut sum = vec![rank as f32 + 1.0];
                        ring.all_reduce_f32(&mut sum, ReduceOp::Sum).unwrap();
                        sum[0]
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        assert_eq!(sums, vec![3.0, 3.0]);
        forger.join().unwrap();
        let trickled = trickler.join().unwrap();
        assert!(
            trickled < HANDSHAKE_TIMEOUT + Duration::from_secs(4),
            "the trickling peer was cut off after {trickled:?}"
        );
        let hello = Hello { rank: 0, world: 2 };
        let nonce = [7u8; NONCE_BYTES];
        assert!(hello.check(&nonce, &hello.signed(&nonce, KEY), KEY).is_ok());
        let other = Hello { rank: 1, world: 2 }.signed(&nonce, KEY);
        assert!(hello
            .check(&nonce, &other, KEY)
            .unwrap_err()
            .contains("claims rank 1 of 2"));
        let replayed = hello.signed(&[8u8; NONCE_BYTES], KEY);
        assert!(hello
            .check(&nonce, &replayed, KEY)
            .unwrap_err()
            .contains("not signed with the job token"));
    }

    /// A transport with a certificate for `127.0.0.1` issued by the CA whose key is
    /// `ca_key` (trusting `ca_cert`), its files in `dir`.
    fn tls_transport(dir: &std::path::Path, ca_cert: &str, ca_key: &str) -> Transport {
        let host = tls::make_host(ca_key, &["127.0.0.1".to_owned()], 1).unwrap();
        let files = tls::TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join("host.pem"),
            key: dir.join("host.key"),
        };
        std::fs::write(&files.ca, ca_cert).unwrap();
        std::fs::write(&files.cert, host.cert_pem).unwrap();
        std::fs::write(&files.key, host.key_pem).unwrap();
        Transport::Tls(std::sync::Arc::new(tls::TlsIdentity::load(&files).unwrap()))
    }

    /// With TLS on, a plaintext peer that knows the token and a TLS peer whose certificate
    /// comes from another CA reach rank 1 first: both are refused, and the ring of three
    /// forms over TLS, all-reduces and broadcasts.
    #[test]
    fn a_tls_ring_refuses_plaintext_and_strangers_and_reduces() {
        let dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
        let job_ca = tls::make_ca(1).unwrap();
        let job = tls_transport(dirs[0].path(), &job_ca.cert_pem, &job_ca.key_pem);
        let other_ca = tls::make_ca(1).unwrap();
        // Trusts the job CA, but holds a certificate from another.
        let stranger = tls_transport(dirs[1].path(), &job_ca.cert_pem, &other_ca.key_pem);
        let (listeners, addresses) = loopback_listeners(3);
        // Both connect before any rank does, so rank 1 meets them first.
        let mut plain = TcpStream::connect(&addresses[1]).unwrap();
        let hello = Hello { rank: 0, world: 3 }.signed(&[0u8; NONCE_BYTES], KEY);
        plain.write_all(&hello).unwrap();
        let stream = TcpStream::connect(&addresses[1]).unwrap();
        let impostor = {
            let address = addresses[1].clone();
            std::thread::spawn(move || {
                stream
                    .set_read_timeout(Some(Duration::from_secs(5)))
                    .unwrap();
                // The handshake fails on the server's side (or its first read here).
                if let Ok(mut link) = Link::dial(stream, &stranger, &address) {
                    let nonce = read_nonce(&mut link);
                    let _ = link.write_all(&Hello { rank: 0, world: 3 }.signed(&nonce, KEY));
                    let _ = link.flush();
                    let mut byte = [0u8; 1];
                    assert!(!matches!(link.read(&mut byte), Ok(1)));
                }
            })
        };
        let results = std::thread::scope(|scope| {
            let handles: Vec<_> = listeners
                .into_iter()
                .enumerate()
                .map(|(rank, listener)| {
                    let (addresses, job) = (&addresses, &job);
                    scope.spawn(move || {
                        let mut ring = RingCollective::connect_on(
                            job,
                            rank,
                            listener,
                            addresses,
                            Duration::from_secs(10),
                            KEY,
                        )
                        .unwrap();
                        assert!(matches!(ring.next, Some(Link::Dialed(_))));
                        assert!(matches!(ring.prev, Some(Link::Accepted(_))));
                        let mut sum = values(rank, 1001);
                        ring.all_reduce_f32(&mut sum, ReduceOp::Sum).unwrap();
                        let mut big = vec![rank as u8; 9 << 20];
                        ring.broadcast_bytes(&mut big, 2).unwrap();
                        (sum, big.iter().all(|&b| b == 2))
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap())
                .collect::<Vec<_>>()
        });
        impostor.join().unwrap();
        let mut rest = Vec::new();
        plain
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let _ = plain.read_to_end(&mut rest);
        assert!(
            rest.is_empty() || rest[0] == 0x15,
            "a plaintext peer got {rest:?}"
        );
        for (sum, broadcast) in &results {
            for (i, x) in sum.iter().enumerate() {
                let expected: f32 = (0..3).map(|r| values(r, 1001)[i]).sum();
                assert!((x - expected).abs() < 1e-4);
            }
            assert!(broadcast);
        }
    }

    #[test]
    fn a_plaintext_ring_stays_on_loopback_unless_allowed() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addresses = vec![
            listener.local_addr().unwrap().to_string(),
            "10.0.0.9:4000".to_owned(),
        ];
        let err = RingCollective::connect_on(
            &Transport::Loopback,
            0,
            listener,
            &addresses,
            Duration::from_millis(200),
            KEY,
        )
        .err()
        .unwrap();
        assert!(
            err.to_string()
                .contains("the ring address of rank 1 10.0.0.9:4000 is not a loopback address"),
            "{err}"
        );
    }

    #[test]
    fn bad_set_up_is_refused_clearly() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let err =
            RingCollective::connect(3, listener, &["a:1".into()], Duration::from_secs(1), KEY)
                .err()
                .unwrap();
        assert!(
            err.to_string().contains("rank 3 is outside a world of 1"),
            "{err}"
        );
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let unreachable = TcpListener::bind("127.0.0.1:0").unwrap();
        let addresses = vec![
            listener.local_addr().unwrap().to_string(),
            unreachable.local_addr().unwrap().to_string(),
        ];
        drop(unreachable);
        let err = RingCollective::connect(0, listener, &addresses, Duration::from_millis(300), KEY)
            .err()
            .unwrap();
        assert!(
            err.to_string().contains("could not connect to rank 1"),
            "{err}"
        );
        let mut ring = on_ranks(1, Duration::from_secs(1), |ring| ring)
            .pop()
            .unwrap();
        let mut gpu_free = Tensor::zeros([2], (Kind::Float, Device::Cpu));
        ring.all_reduce(&mut gpu_free, ReduceOp::Sum).unwrap();
        let err = ring.broadcast_bytes(&mut [0u8; 4], 5).unwrap_err();
        assert!(err.to_string().contains("root 5"), "{err}");
    }
}
