//! The published weights: the current version and the one before it as one value behind
//! one lock, swapped whole by [`Weights::publish`] (a reader sees the old pair or the new
//! one, never a mix), the bytes `GetWeights` sent per version, and which version a
//! `GetWeights` call gets.

use parking_lot::{Mutex, RwLock};
use quill_proto::blob::WeightBlob;
use quill_proto::status::WeightsStatus;
use quill_proto::WeightsRequest;
use quill_relay::{ChunkStream, Transfer};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tonic::Status;

/// The versions being served.
#[derive(Clone)]
struct Published {
    /// The current blob as checksummed chunks.
    current: Arc<Transfer>,
    /// The current blob's SHA-256 ([`WeightBlob::sha256`]), which heartbeats announce.
    sha256: [u8; 32],
    /// The version before it, still served to transfers that asked for it (so an actor
    /// whose transfer outlasts a training step can finish it instead of starting over).
    previous: Option<Arc<Transfer>>,
}

/// The weights the hub serves.
pub struct Weights {
    published: RwLock<Published>,
    /// Bytes `GetWeights` sent, by version.
    served: Mutex<BTreeMap<u64, Arc<AtomicU64>>>,
    chunk_bytes: usize,
}

impl Weights {
    /// Serves `blob` as the current version, cut into `chunk_bytes` chunks.
    pub fn new(blob: Arc<WeightBlob>, chunk_bytes: usize) -> Self {
        Weights {
            published: RwLock::new(Published {
                sha256: blob.sha256(),
                current: Transfer::complete(blob, chunk_bytes),
                previous: None,
            }),
            served: Mutex::new(BTreeMap::new()),
            chunk_bytes,
        }
    }

    /// The current version.
    pub fn version(&self) -> u64 {
        self.published.read().current.version()
    }

    /// The current version and its SHA-256, read together.
    pub fn latest(&self) -> (u64, [u8; 32]) {
        let published = self.published.read();
        (published.current.version(), published.sha256)
    }

    /// Makes `blob` the current version and the current one the previous, in one step
    /// (the chunks are cut and checksummed, and the digest computed, before the lock is
    /// taken).
    pub fn publish(&self, blob: Arc<WeightBlob>) {
        let sha256 = blob.sha256();
        let current = Transfer::complete(blob, self.chunk_bytes);
        let mut published = self.published.write();
        let previous = std::mem::replace(&mut published.current, current);
        published.previous = Some(previous);
        published.sha256 = sha256;
    }

    /// The stream a `GetWeights` call gets (see [`choose_transfer`]), counting its bytes.
    pub fn serve(&self, req: &WeightsRequest, stall: Duration) -> Result<ChunkStream, Status> {
        let Published {
            current, previous, ..
        } = self.published.read().clone();
        let root = choose_transfer(current, previous, req)?;
        let served = Arc::clone(self.served.lock().entry(root.version()).or_default());
        Ok(root.serve(req.offset, stall, served))
    }

    /// Bytes of weights the learner itself sent, by version.
    pub fn served(&self) -> BTreeMap<u64, u64> {
        self.served
            .lock()
            .iter()
            .map(|(v, n)| (*v, n.load(Ordering::Relaxed)))
            .collect()
    }

    /// The weights as the status document shows them.
    pub fn status(&self, relay_fanout: usize) -> WeightsStatus {
        WeightsStatus {
            blob_bytes: self.published.read().current.received(),
            relay_fanout,
            served_bytes_by_version: self.served(),
        }
    }

    /// Holds the published versions' lock and panics, as a failing handler would.
    #[cfg(test)]
    pub(super) fn hold_and_panic(&self) {
        let _held = self.published.write();
        panic!("a handler panicked while holding the published weights");
    }
}

/// The transfer a `GetWeights` call gets: the version it asks for when that is the
/// current or the previous one, else the current one from byte 0 (a resumed transfer of
/// an older version must start over).
fn choose_transfer(
    current: Arc<Transfer>,
    previous: Option<Arc<Transfer>>,
    req: &WeightsRequest,
) -> Result<Arc<Transfer>, Status> {
    let root = match previous {
        Some(p) if req.version == p.version() && req.version != current.version() => p,
        _ => current,
    };
    if req.offset > 0 && req.version != root.version() {
        return Err(Status::failed_precondition(format!(
            "version {} is no longer served (now {}): restart from offset 0",
            req.version,
            root.version()
        )));
    }
    if req.offset > root.received() {
        return Err(Status::out_of_range(format!(
            "offset {} is past the end ({} bytes)",
            req.offset,
            root.received()
        )));
    }
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    fn transfer(version: u64) -> Arc<Transfer> {
        Transfer::complete(testing::blob(version), 16)
    }

    #[test]
    fn the_previous_version_stays_servable_for_transfers_that_asked_for_it() {
        let ask = |version, offset| WeightsRequest { version, offset };
        let pick = |previous: Option<u64>, req: WeightsRequest| {
            choose_transfer(transfer(5), previous.map(transfer), &req).map(|t| t.version())
        };
        assert_eq!(pick(Some(4), ask(4, 0)).unwrap(), 4);
        assert_eq!(pick(Some(4), ask(4, 32)).unwrap(), 4);
        assert_eq!(pick(Some(4), ask(5, 32)).unwrap(), 5);
        assert_eq!(pick(Some(4), ask(3, 0)).unwrap(), 5);
        assert_eq!(pick(None, ask(4, 0)).unwrap(), 5);
        let err = pick(Some(4), ask(3, 16)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::FailedPrecondition);
        assert!(err
            .message()
            .contains("version 3 is no longer served (now 5)"));
        let err = pick(Some(4), ask(4, 65)).unwrap_err();
        assert_eq!(err.code(), tonic::Code::OutOfRange);
    }

    #[test]
    fn publishing_swaps_current_and_previous_together() {
        let weights = Weights::new(testing::blob(0), 16);
        let versions = |w: &Weights| {
            let p = w.published.read();
            (
                p.current.version(),
                p.previous.as_ref().map(|t| t.version()),
            )
        };
        assert_eq!(versions(&weights), (0, None));
        weights.publish(testing::blob(1));
        assert_eq!(versions(&weights), (1, Some(0)));
        weights.publish(testing::blob(2));
        assert_eq!(versions(&weights), (2, Some(1)));
        assert_eq!(weights.version(), 2);
    }

    #[test]
    fn readers_never_see_a_half_published_pair() {
        let weights = Arc::new(Weights::new(testing::blob(0), 16));
        let writer = {
            let weights = Arc::clone(&weights);
            std::thread::spawn(move || {
                for v in 1..=200 {
                    weights.publish(testing::blob(v));
                }
            })
        };
        while !writer.is_finished() {
            let p = weights.published.read().clone();
            if let Some(previous) = p.previous {
                assert_eq!(previous.version() + 1, p.current.version());
            }
        }
        writer.join().unwrap();
        assert_eq!(weights.version(), 200);
    }

    #[tokio::test]
    async fn serving_counts_the_bytes_sent_per_version() {
        use tokio_stream::StreamExt;
        let weights = Weights::new(testing::blob(3), 16);
        let stream = weights
            .serve(
                &WeightsRequest {
                    version: 3,
                    offset: 0,
                },
                Duration::from_secs(1),
            )
            .unwrap();
        let chunks: Vec<_> = stream.collect().await;
        assert_eq!(chunks.len(), 4);
        assert!(chunks.iter().all(Result::is_ok));
        assert_eq!(weights.served(), [(3, 64)].into());
        let status = weights.status(2);
        assert_eq!((status.blob_bytes, status.relay_fanout), (64, 2));
    }
}
