//! One weights version as checksummed chunks: received (in order, each CRC-checked)
//! or cut from a complete blob, and served from any byte while it is still arriving.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use quill_proto::blob::{ManifestEntry, WeightBlob};
use quill_proto::WeightChunk;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::Status;

use crate::RelayError;

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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

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
}
