//! An actor's relay: the versions it holds (the one it runs, the one it receives) and
//! the `WeightRelay` service that serves them to other actors.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use quill_proto::weight_relay_server::WeightRelay;
use quill_proto::WeightsRequest;
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::{ChunkStream, Transfer};

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
            if t.version() == version && !t.is_abandoned() {
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
        if held
            .incoming
            .as_ref()
            .is_some_and(|t| t.version() == version)
        {
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
            .find(|t| t.version() == version && !t.is_abandoned())
    }

    fn describe(&self) -> String {
        let held = self.held.lock().expect("poisoned");
        let v = |t: &Option<Arc<Transfer>>| t.as_ref().map(|t| t.version().to_string());
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
                held.current.as_ref().is_some_and(|t| t.version() > version)
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;

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
