//! Fetching one version from an ordered list of sources (the learner or other actors'
//! relays), switching source on failure, stall or corruption and resuming from the byte
//! reached.

use std::time::Duration;

use quill_proto::rpc::{endpoint, relay_client, LearnerConn};
use quill_proto::{WeightChunk, WeightSource, WeightsRequest};
use tonic::{Code, Streaming};

use crate::{RelayError, Transfer, LEARNER_SOURCE};

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
