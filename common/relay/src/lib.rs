//! Weight relay: one version of the weights held or being received as checksummed chunks,
//! served to other actors while it is still arriving (cut-through), and fetched from an
//! ordered list of sources with resume from the byte reached.
//!
//! Chunks are `bytes::Bytes`: a relay forwards the very buffers it received, and a root
//! serves slices of its blob, so no chunk is copied on its way through a relay.

pub mod tree;

use bytes::Bytes;
use quill_proto::blob::{ManifestEntry, WeightBlob};
use quill_proto::rpc::{endpoint, relay_client, LearnerConn};
use quill_proto::weight_relay_server::WeightRelay;
use quill_proto::{WeightChunk, WeightSource, WeightsRequest};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Code, Request, Response, Status, Streaming};

/// The member id a [`WeightSource`] carries for the learner itself.
pub const LEARNER_SOURCE: &str = "learner";

/// Why a transfer or a chunk was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RelayError {
    /// The source sent another version than the one asked for.
    #[error("the source sent version {got}, version {want} was asked for")]
    WrongVersion {
        /// Asked for.
        want: u64,
        /// Received.
        got: u64,
    },
    /// The chunk's data does not match its CRC32.
    #[error("chunk at byte {offset} fails its CRC32 check")]
    CorruptChunk {
        /// Where the chunk starts.
        offset: u64,
    },
    /// The chunk does not start where the transfer stands.
    #[error("chunk at byte {got}, but {want} bytes are held")]
    WrongOffset {
        /// The byte the transfer reached.
        want: u64,
        /// The chunk's offset.
        got: u64,
    },
    /// The chunk's size, checksum or manifest differ from what earlier chunks said.
    #[error("version {version}: {what} differs from the first source's")]
    Mismatch {
        /// The version.
        version: u64,
        /// Which header field.
        what: &'static str,
    },
    /// The finished blob fails its whole-blob CRC32, or its manifest is unusable.
    #[error("version {version}: {reason}")]
    Corrupt {
        /// The version.
        version: u64,
        /// What is wrong.
        reason: String,
    },
    /// The transfer was given up (a newer version superseded it).
    #[error("version {0} was given up")]
    Abandoned(u64),
    /// No source delivered the whole blob.
    #[error("version {version}: no source delivered it ({last})")]
    Exhausted {
        /// The version.
        version: u64,
        /// The last failure.
        last: String,
    },
}

/// Size, checksum and layout of one version, from its first chunk.
#[derive(Debug, Clone, PartialEq)]
pub struct Header {
    /// Blob size in bytes.
    pub total: u64,
    /// CRC32 of the whole blob.
    pub crc32: u32,
    /// The manifest as JSON.
    pub manifest_json: String,
}

#[derive(Debug, Clone, Copy, Default)]
struct Progress {
    total: Option<u64>,
    received: u64,
    abandoned: bool,
}

#[derive(Debug)]
struct Piece {
    offset: u64,
    data: Bytes,
    crc32: u32,
}

struct Pieces {
    list: Vec<Piece>,
    whole: crc32fast::Hasher,
}

/// One weights version, complete or still arriving: its chunks in order from byte 0.
pub struct Transfer {
    version: u64,
    header: OnceLock<Header>,
    pieces: Mutex<Pieces>,
    progress: watch::Sender<Progress>,
}

impl std::fmt::Debug for Transfer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let p = *self.progress.borrow();
        f.debug_struct("Transfer")
            .field("version", &self.version)
            .field("received", &p.received)
            .field("total", &p.total)
            .finish()
    }
}

/// A blob's bytes as an owner for `Bytes::from_owner` (no copy).
struct BlobBytes(Arc<WeightBlob>);

impl AsRef<[u8]> for BlobBytes {
    fn as_ref(&self) -> &[u8] {
        &self.0.bytes
    }
}

impl Transfer {
    /// An empty transfer of `version`, to be filled by [`Transfer::push`].
    pub fn new(version: u64) -> Arc<Self> {
        Arc::new(Transfer {
            version,
            header: OnceLock::new(),
            pieces: Mutex::new(Pieces {
                list: Vec::new(),
                whole: crc32fast::Hasher::new(),
            }),
            progress: watch::channel(Progress::default()).0,
        })
    }

    /// A complete transfer over `blob`, cut into `chunk`-byte pieces (slices, no copy).
    pub fn complete(blob: Arc<WeightBlob>, chunk: usize) -> Arc<Self> {
        let total = blob.bytes.len();
        let header = Header {
            total: total as u64,
            crc32: blob.crc32,
            manifest_json: serde_json::to_string(&blob.manifest).expect("manifest serialises"),
        };
        let version = blob.version;
        let all = Bytes::from_owner(BlobBytes(blob));
        let list = (0..total)
            .step_by(chunk.max(1))
            .map(|start| {
                let data = all.slice(start..(start + chunk.max(1)).min(total));
                Piece {
                    offset: start as u64,
                    crc32: crc32fast::hash(&data),
                    data,
                }
            })
            .collect();
        let transfer = Transfer::new(version);
        transfer.header.set(header).expect("fresh");
        transfer.pieces.lock().expect("poisoned").list = list;
        transfer.progress.send_replace(Progress {
            total: Some(total as u64),
            received: total as u64,
            abandoned: false,
        });
        transfer
    }

    /// The version this transfer carries.
    pub fn version(&self) -> u64 {
        self.version
    }

    /// Bytes held so far.
    pub fn received(&self) -> u64 {
        self.progress.borrow().received
    }

    /// Size, checksum and manifest, once the first chunk arrived.
    pub fn header(&self) -> Option<&Header> {
        self.header.get()
    }

    /// Whether every byte is held.
    pub fn is_complete(&self) -> bool {
        let p = *self.progress.borrow();
        p.total == Some(p.received)
    }

    /// Whether it was given up.
    pub fn is_abandoned(&self) -> bool {
        self.progress.borrow().abandoned
    }

    /// Gives the transfer up: relays waiting on it end their streams.
    pub fn abandon(&self) {
        self.progress.send_modify(|p| p.abandoned = true);
    }

    /// Appends a received chunk after checking its version, offset, header and CRC32.
    pub fn push(&self, chunk: WeightChunk) -> Result<(), RelayError> {
        if chunk.version != self.version {
            return Err(RelayError::WrongVersion {
                want: self.version,
                got: chunk.version,
            });
        }
        if crc32fast::hash(&chunk.data) != chunk.chunk_crc32 {
            return Err(RelayError::CorruptChunk {
                offset: chunk.offset,
            });
        }
        let mismatch = |what| RelayError::Mismatch {
            version: self.version,
            what,
        };
        match self.header.get() {
            Some(h) if h.total != chunk.total_bytes => return Err(mismatch("total_bytes")),
            Some(h) if h.crc32 != chunk.crc32 => return Err(mismatch("crc32")),
            Some(h)
                if !chunk.manifest_json.is_empty() && h.manifest_json != chunk.manifest_json =>
            {
                return Err(mismatch("manifest"))
            }
            Some(_) => {}
            None if chunk.manifest_json.is_empty() => {
                return Err(RelayError::Corrupt {
                    version: self.version,
                    reason: "the first chunk has no manifest".into(),
                })
            }
            None => {
                let _ = self.header.set(Header {
                    total: chunk.total_bytes,
                    crc32: chunk.crc32,
                    manifest_json: chunk.manifest_json.clone(),
                });
            }
        }
        let len = chunk.data.len() as u64;
        let mut pieces = self.pieces.lock().expect("poisoned");
        let held = self.received();
        if chunk.offset != held {
            return Err(RelayError::WrongOffset {
                want: held,
                got: chunk.offset,
            });
        }
        if held + len > chunk.total_bytes {
            return Err(mismatch("total_bytes"));
        }
        pieces
            .whole
            .combine(&crc32fast::Hasher::new_with_initial_len(
                chunk.chunk_crc32,
                len,
            ));
        if len > 0 {
            pieces.list.push(Piece {
                offset: held,
                data: chunk.data,
                crc32: chunk.chunk_crc32,
            });
        }
        drop(pieces);
        self.progress.send_modify(|p| {
            p.total = Some(chunk.total_bytes);
            p.received = held + len;
        });
        Ok(())
    }

    /// Checks a complete transfer against its whole-blob CRC32 (combined from the chunks').
    pub fn finish(&self) -> Result<(), RelayError> {
        let corrupt = |reason: String| RelayError::Corrupt {
            version: self.version,
            reason,
        };
        if !self.is_complete() {
            return Err(corrupt(format!("only {} bytes arrived", self.received())));
        }
        let header = self.header.get().expect("complete transfers have a header");
        let crc = self
            .pieces
            .lock()
            .expect("poisoned")
            .whole
            .clone()
            .finalize();
        if crc != header.crc32 {
            return Err(corrupt(format!(
                "whole-blob CRC32 {crc:08x}, expected {:08x}",
                header.crc32
            )));
        }
        Ok(())
    }

    /// The finished, checked blob (one copy of the bytes, into one buffer).
    pub fn to_blob(&self) -> Result<WeightBlob, RelayError> {
        self.finish()?;
        let header = self.header.get().expect("finished");
        let manifest: Vec<ManifestEntry> =
            serde_json::from_str(&header.manifest_json).map_err(|e| RelayError::Corrupt {
                version: self.version,
                reason: format!("manifest: {e}"),
            })?;
        let mut bytes = Vec::with_capacity(header.total as usize);
        for piece in &self.pieces.lock().expect("poisoned").list {
            bytes.extend_from_slice(&piece.data);
        }
        let blob = WeightBlob {
            version: self.version,
            manifest,
            bytes,
            crc32: header.crc32,
        };
        blob.verify().map_err(|e| RelayError::Corrupt {
            version: self.version,
            reason: e.to_string(),
        })?;
        Ok(blob)
    }

    /// The held pieces from `offset` up to `upto` (cheap clones of the buffers).
    fn pieces_from(&self, offset: u64, upto: u64) -> Vec<(u64, Bytes, Option<u32>)> {
        let pieces = self.pieces.lock().expect("poisoned");
        let first = pieces
            .list
            .partition_point(|p| p.offset + p.data.len() as u64 <= offset);
        pieces.list[first..]
            .iter()
            .take_while(|p| p.offset < upto)
            .map(|p| {
                if p.offset >= offset {
                    (p.offset, p.data.clone(), Some(p.crc32))
                } else {
                    let skip = (offset - p.offset) as usize;
                    (offset, p.data.slice(skip..), None)
                }
            })
            .collect()
    }

    /// Streams this version from `offset`, forwarding chunks as they arrive; a relay that
    /// receives nothing new for `stall` ends the stream with UNAVAILABLE. Bytes sent are
    /// added to `served`.
    pub fn serve(
        self: Arc<Self>,
        offset: u64,
        stall: Duration,
        served: Arc<AtomicU64>,
    ) -> ChunkStream {
        let (tx, rx) = mpsc::channel(2);
        tokio::spawn(async move {
            let mut progress = self.progress.subscribe();
            let mut offset = offset;
            let mut first = true;
            loop {
                let waited = tokio::time::timeout(
                    stall,
                    progress.wait_for(|p| {
                        p.abandoned || p.total.is_some_and(|t| p.received > offset || offset >= t)
                    }),
                )
                .await
                .map(|r| r.map(|p| *p));
                let p = match waited {
                    Ok(Ok(p)) => p,
                    Ok(Err(_)) | Err(_) => {
                        let _ = tx
                            .send(Err(Status::unavailable(format!(
                                "relay stalled on version {} at byte {offset}",
                                self.version
                            ))))
                            .await;
                        return;
                    }
                };
                if p.abandoned {
                    let _ = tx
                        .send(Err(Status::unavailable(format!(
                            "the relay gave up version {}",
                            self.version
                        ))))
                        .await;
                    return;
                }
                let total = p.total.expect("waited for it");
                let header = self.header.get().expect("set before progress");
                if offset > total {
                    let _ = tx
                        .send(Err(Status::out_of_range(format!(
                            "offset {offset} is past the end ({total} bytes)"
                        ))))
                        .await;
                    return;
                }
                let mut pieces = self.pieces_from(offset, p.received);
                if offset == total && first {
                    pieces.push((offset, Bytes::new(), Some(0)));
                }
                for (at, data, crc) in pieces {
                    let len = data.len() as u64;
                    let chunk = WeightChunk {
                        version: self.version,
                        offset: at,
                        chunk_crc32: crc.unwrap_or_else(|| crc32fast::hash(&data)),
                        data,
                        total_bytes: total,
                        manifest_json: if first {
                            header.manifest_json.clone()
                        } else {
                            String::new()
                        },
                        crc32: header.crc32,
                    };
                    first = false;
                    if tx.send(Ok(chunk)).await.is_err() {
                        return;
                    }
                    served.fetch_add(len, Ordering::Relaxed);
                    offset = at + len;
                }
                if offset >= total {
                    return;
                }
            }
        });
        Box::pin(ReceiverStream::new(rx))
    }
}

/// A server stream of weight chunks.
pub type ChunkStream = Pin<Box<dyn Stream<Item = Result<WeightChunk, Status>> + Send>>;

struct Held {
    current: Option<Arc<Transfer>>,
    incoming: Option<Arc<Transfer>>,
}

/// What an actor's relay holds: the version it runs and the one it is receiving (at most
/// two versions in memory), plus its counters.
pub struct RelayNode {
    held: Mutex<Held>,
    changed: watch::Sender<u64>,
    stall: Duration,
    /// Bytes this node sent to other actors.
    pub bytes_served: Arc<AtomicU64>,
}

impl RelayNode {
    /// A node that holds nothing yet; `stall` bounds how long a child waits for bytes.
    pub fn new(stall: Duration) -> Arc<Self> {
        Arc::new(RelayNode {
            held: Mutex::new(Held {
                current: None,
                incoming: None,
            }),
            changed: watch::channel(0).0,
            stall,
            bytes_served: Arc::new(AtomicU64::new(0)),
        })
    }

    /// Records that `version` is published, so children asking for it may wait for it.
    pub fn set_latest(&self, version: u64) {
        self.changed.send_if_modified(|v| {
            let newer = version > *v;
            *v = (*v).max(version);
            newer
        });
    }

    /// The transfer of `version` to fill: the one under way for it (resume), or a new one
    /// that replaces (and abandons) any other incoming version.
    pub fn begin(&self, version: u64) -> Arc<Transfer> {
        self.set_latest(version);
        let mut held = self.held.lock().expect("poisoned");
        if let Some(t) = &held.incoming {
            if t.version == version && !t.is_abandoned() {
                return Arc::clone(t);
            }
            t.abandon();
        }
        let transfer = Transfer::new(version);
        held.incoming = Some(Arc::clone(&transfer));
        drop(held);
        self.changed.send_modify(|_| {});
        transfer
    }

    /// Makes a finished transfer the held version; the previous one is dropped.
    pub fn promote(&self, transfer: &Arc<Transfer>) {
        let mut held = self.held.lock().expect("poisoned");
        if held
            .incoming
            .as_ref()
            .is_some_and(|t| Arc::ptr_eq(t, transfer))
        {
            held.incoming = None;
        }
        held.current = Some(Arc::clone(transfer));
    }

    /// Gives up the incoming transfer, if it is `version`.
    pub fn give_up(&self, version: u64) {
        let mut held = self.held.lock().expect("poisoned");
        if held.incoming.as_ref().is_some_and(|t| t.version == version) {
            if let Some(t) = held.incoming.take() {
                t.abandon();
            }
        }
    }

    fn find(&self, version: u64) -> Option<Arc<Transfer>> {
        let held = self.held.lock().expect("poisoned");
        let candidates = [held.incoming.clone(), held.current.clone()];
        drop(held);
        candidates
            .into_iter()
            .flatten()
            .find(|t| t.version == version && !t.is_abandoned())
    }

    fn describe(&self) -> String {
        let held = self.held.lock().expect("poisoned");
        let v = |t: &Option<Arc<Transfer>>| t.as_ref().map(|t| t.version.to_string());
        format!(
            "holding {}, receiving {}",
            v(&held.current).unwrap_or_else(|| "none".into()),
            v(&held.incoming).unwrap_or_else(|| "none".into())
        )
    }

    /// The transfer of `version`. A version newer than the one held is waited for (up to
    /// the stall time: the node may not have heard of it yet); older ones are NOT_FOUND.
    pub async fn lookup(&self, version: u64) -> Result<Arc<Transfer>, Status> {
        let mut changed = self.changed.subscribe();
        let deadline = tokio::time::Instant::now() + self.stall;
        loop {
            if let Some(t) = self.find(version) {
                return Ok(t);
            }
            let latest = *changed.borrow_and_update();
            let newer_held = {
                let held = self.held.lock().expect("poisoned");
                held.current.as_ref().is_some_and(|t| t.version > version)
            };
            let waited_out = tokio::time::Instant::now() >= deadline;
            if version == 0 || newer_held || waited_out {
                return Err(Status::not_found(format!(
                    "weights version {version} is not held by this relay ({}; newest published {latest})",
                    self.describe()
                )));
            }
            let _ = tokio::time::timeout_at(deadline, changed.changed()).await;
        }
    }
}

/// The `WeightRelay` service over a [`RelayNode`].
#[derive(Clone)]
pub struct RelayService(pub Arc<RelayNode>);

#[tonic::async_trait]
impl WeightRelay for RelayService {
    type GetWeightsStream = ChunkStream;

    async fn get_weights(
        &self,
        request: Request<WeightsRequest>,
    ) -> Result<Response<ChunkStream>, Status> {
        let req = request.into_inner();
        let transfer = self.0.lookup(req.version).await?;
        if let Some(h) = transfer.header() {
            if req.offset > h.total {
                return Err(Status::out_of_range(format!(
                    "offset {} is past the end of version {} ({} bytes)",
                    req.offset, req.version, h.total
                )));
            }
        }
        Ok(Response::new(transfer.serve(
            req.offset,
            self.0.stall,
            Arc::clone(&self.0.bytes_served),
        )))
    }
}

/// What one fetch did: where the bytes came from.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FetchReport {
    /// The member id of the source that delivered the last byte.
    pub source: String,
    /// Bytes received from the learner.
    pub from_learner: u64,
    /// Bytes received from other actors' relays.
    pub from_relays: u64,
    /// Chunks refused for a bad CRC32 (and fetched again).
    pub corrupt_chunks: u64,
}

/// How to reach the sources of a fetch.
#[derive(Clone)]
pub struct Fetcher {
    /// A client of the learner, for the source named [`LEARNER_SOURCE`].
    pub learner: Option<LearnerConn>,
    /// The job token, for relays.
    pub token: String,
    /// Connect timeout, and the longest wait for the next chunk before switching source.
    pub stall: Duration,
}

impl Fetcher {
    async fn open(
        &self,
        source: &WeightSource,
        request: WeightsRequest,
    ) -> Result<Streaming<WeightChunk>, String> {
        let reply = if source.member_id == LEARNER_SOURCE && source.address.is_empty() {
            let mut learner = self.learner.clone().ok_or("no learner client")?;
            learner.get_weights(request).await
        } else {
            let channel = endpoint(&source.address, self.stall)?
                .connect()
                .await
                .map_err(|e| format!("cannot connect: {e}"))?;
            relay_client(channel, &self.token)
                .get_weights(request)
                .await
        };
        reply.map(|r| r.into_inner()).map_err(|s| {
            let code = s.code();
            if code == Code::FailedPrecondition {
                format!("superseded: {}", s.message())
            } else {
                format!("{code:?}: {}", s.message())
            }
        })
    }

    /// Fills `transfer` from `sources` in order, each resuming from the byte the transfer
    /// reached; a source that fails, stalls or sends a corrupt chunk is left for the next
    /// (cycling through the list up to `rounds` times). Verifies the whole-blob CRC32.
    pub async fn fetch(
        &self,
        transfer: &Transfer,
        sources: &[WeightSource],
        rounds: usize,
    ) -> Result<FetchReport, RelayError> {
        let version = transfer.version();
        let mut report = FetchReport::default();
        let mut last = "no sources".to_owned();
        for source in sources.iter().cycle().take(sources.len() * rounds.max(1)) {
            if transfer.is_complete() {
                break;
            }
            if transfer.is_abandoned() {
                return Err(RelayError::Abandoned(version));
            }
            let from_learner = source.member_id == LEARNER_SOURCE;
            let request = WeightsRequest {
                version,
                offset: transfer.received(),
            };
            let mut stream = match self.open(source, request).await {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(version, source = %source.member_id, "weight source failed: {e}");
                    last = format!("{}: {e}", source.member_id);
                    continue;
                }
            };
            loop {
                let chunk = match tokio::time::timeout(self.stall, stream.message()).await {
                    Ok(Ok(Some(chunk))) => chunk,
                    Ok(Ok(None)) => break,
                    Ok(Err(s)) => {
                        last = format!("{}: {}", source.member_id, s.message());
                        break;
                    }
                    Err(_) => {
                        last = format!("{}: no data for {:?}", source.member_id, self.stall);
                        break;
                    }
                };
                let len = chunk.data.len() as u64;
                match transfer.push(chunk) {
                    Ok(()) if from_learner => report.from_learner += len,
                    Ok(()) => report.from_relays += len,
                    Err(RelayError::WrongVersion { got, .. }) if from_learner && got > version => {
                        return Err(RelayError::Abandoned(version));
                    }
                    Err(e) => {
                        if matches!(e, RelayError::CorruptChunk { .. }) {
                            report.corrupt_chunks += 1;
                        }
                        last = format!("{}: {e}", source.member_id);
                        break;
                    }
                }
                report.source = source.member_id.clone();
            }
            if !transfer.is_complete() {
                tracing::warn!(version, source = %source.member_id, at = transfer.received(), "weight transfer broke: {last}; resuming from the next source");
                if from_learner && last.contains("superseded") {
                    return Err(RelayError::Abandoned(version));
                }
            }
        }
        if !transfer.is_complete() {
            return Err(RelayError::Exhausted { version, last });
        }
        transfer.finish()?;
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(version: u64, len: usize) -> Arc<WeightBlob> {
        let bytes: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        Arc::new(WeightBlob {
            version,
            manifest: vec![ManifestEntry {
                name: "w".into(),
                dtype: "f32".into(),
                shape: vec![(len / 4) as i64],
                offset: 0,
                len: len as u64,
            }],
            crc32: crc32fast::hash(&bytes),
            bytes,
        })
    }

    async fn drain(stream: ChunkStream) -> Vec<Result<WeightChunk, Status>> {
        use tokio_stream::StreamExt;
        stream.collect().await
    }

    #[tokio::test]
    async fn forwards_chunks_while_they_arrive_and_checks_them() {
        let root = Transfer::complete(blob(3, 1000), 300);
        let relay = Transfer::new(3);
        let served = Arc::new(AtomicU64::new(0));
        let child = tokio::spawn(drain(Arc::clone(&relay).serve(
            0,
            Duration::from_secs(5),
            Arc::clone(&served),
        )));
        let from_root =
            drain(Arc::clone(&root).serve(0, Duration::from_secs(1), Default::default())).await;
        assert_eq!(from_root.len(), 4);
        for chunk in from_root {
            relay.push(chunk.unwrap()).unwrap();
        }
        relay.finish().unwrap();
        let got = child.await.unwrap();
        assert_eq!(got.len(), 4);
        assert_eq!(served.load(Ordering::Relaxed), 1000);
        assert_eq!(relay.to_blob().unwrap().bytes, blob(3, 1000).bytes);

        let mid =
            drain(Arc::clone(&root).serve(450, Duration::from_secs(1), Default::default())).await;
        let first = mid[0].as_ref().unwrap();
        assert_eq!((first.offset, first.data.len()), (450, 150));
        assert_eq!(first.chunk_crc32, crc32fast::hash(&first.data));

        let mut bad = mid[1].as_ref().unwrap().clone();
        let fresh = Transfer::new(3);
        bad.offset = 0;
        bad.manifest_json = "[]".into();
        bad.chunk_crc32 ^= 1;
        assert_eq!(
            fresh.push(bad.clone()).unwrap_err(),
            RelayError::CorruptChunk { offset: 0 }
        );
        bad.version = 4;
        assert!(matches!(
            fresh.push(bad).unwrap_err(),
            RelayError::WrongVersion { want: 3, got: 4 }
        ));
        let past = drain(root.serve(1001, Duration::from_secs(1), Default::default())).await;
        assert_eq!(past[0].as_ref().unwrap_err().code(), Code::OutOfRange);
    }

    #[tokio::test]
    async fn nodes_wait_for_published_versions_and_refuse_others() {
        let node = RelayNode::new(Duration::from_millis(300));
        node.set_latest(2);
        let err = node.lookup(7).await.unwrap_err();
        assert_eq!(err.code(), Code::NotFound);
        assert!(
            err.message().contains("version 7 is not held"),
            "{}",
            err.message()
        );
        let waiting = {
            let node = Arc::clone(&node);
            tokio::spawn(async move { node.lookup(2).await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        let t = node.begin(2);
        assert!(Arc::ptr_eq(&waiting.await.unwrap().unwrap(), &t));
        assert_eq!(node.lookup(2).await.unwrap().version(), 2);
        node.promote(&t);
        let old = node.lookup(1).await.unwrap_err();
        assert!(old.message().contains("holding 2"), "{}", old.message());
    }
}
