//! A relay that forges weights: two clients register as actors whose relays hold the newest
//! version, so the tree makes them a real actor's weight sources, and serve a copy of the
//! learner's weights with one byte changed and every CRC32 recomputed to match. The actor
//! finds that the blob's SHA-256 is not the one the learner announced, drops it, fetches
//! the version from the learner itself and trains.

mod support;

use quill_proto::rpc::{learner_client, learner_client_in_session};
use quill_proto::weight_relay_server::{WeightRelay, WeightRelayServer};
use quill_proto::{HeartbeatRequest, RegisterRequest, Role, WeightChunk, WeightsRequest};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use support::job::{grpc_channel, set, wait_until, TestJob};
use tonic::{Request, Response, Status};

const TOKEN: &str = "test-token-123";

/// Serves one forged version in chunks whose CRC32s all match the forged bytes.
struct Forger {
    chunks: Vec<WeightChunk>,
    served: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl WeightRelay for Forger {
    type GetWeightsStream = quill_relay::ChunkStream;

    async fn get_weights(
        &self,
        request: Request<WeightsRequest>,
    ) -> Result<Response<Self::GetWeightsStream>, Status> {
        let offset = request.into_inner().offset;
        self.served.fetch_add(1, Ordering::SeqCst);
        let chunks: Vec<Result<WeightChunk, Status>> = self
            .chunks
            .iter()
            .filter(|c| c.offset >= offset)
            .cloned()
            .map(Ok)
            .collect();
        Ok(Response::new(Box::pin(tokio_stream::iter(chunks))))
    }
}

/// Fetches version `version` from the learner as member `member` and forges it: one byte
/// of the tensors flipped, the blob's and every chunk's CRC32 recomputed.
async fn forged_chunks(
    client: &mut quill_proto::rpc::LearnerConn,
    version: u64,
) -> Vec<WeightChunk> {
    let mut stream = client
        .get_weights(WeightsRequest { version, offset: 0 })
        .await
        .unwrap()
        .into_inner();
    let mut bytes = Vec::new();
    let mut manifest = String::new();
    while let Some(chunk) = stream.message().await.unwrap() {
        if !chunk.manifest_json.is_empty() {
            manifest = chunk.manifest_json.clone();
        }
        bytes.extend_from_slice(&chunk.data);
    }
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    let crc32 = crc32fast::hash(&bytes);
    let total = bytes.len() as u64;
    bytes
        .chunks(64 * 1024)
        .enumerate()
        .map(|(i, data)| WeightChunk {
            version,
            offset: (i * 64 * 1024) as u64,
            data: data.to_vec().into(),
            total_bytes: total,
            manifest_json: if i == 0 {
                manifest.clone()
            } else {
                String::new()
            },
            crc32,
            chunk_crc32: crc32fast::hash(data),
        })
        .collect()
}

/// Registers a fake actor that relays, forges the newest version, serves it, and claims
/// in its heartbeats to hold it. Returns how many fetches it served, counted as they come.
async fn fake_relay(addr: &str, name: &str) -> Arc<AtomicU64> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay_addr = listener.local_addr().unwrap().to_string();
    let channel = grpc_channel(addr).await;
    let joined = learner_client(channel.clone(), TOKEN)
        .register(RegisterRequest {
            role: Role::Actor as i32,
            name: name.into(),
            address: String::new(),
            relay_address: relay_addr.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    let mut client = learner_client_in_session(channel, TOKEN, &joined.session);
    let chunks = forged_chunks(&mut client, joined.version).await;
    let served = Arc::new(AtomicU64::new(0));
    let forger = Forger {
        chunks,
        served: Arc::clone(&served),
    };
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(WeightRelayServer::new(forger))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    let version = joined.version;
    tokio::spawn(async move {
        loop {
            let beat = HeartbeatRequest {
                member_id: joined.member_id.clone(),
                version,
                weight_source: relay_addr.clone(),
                ..HeartbeatRequest::default()
            };
            if client.heartbeat(beat).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    });
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_weights_from_a_relay_are_refused_and_fetched_from_the_learner() {
    let job = TestJob::new(|t| {
        set(t, "grpo", "steps", 2);
        set(t, "grpo", "prompts_per_step", 1);
        set(t, "sampling", "max_new_tokens", 16);
        set(t, "cluster", "relay_fanout", 2);
    });
    let mut learner = job.start_learner(&[]);
    let addr = job.learner_addr(&mut learner);
    let first = fake_relay(&addr, "forger-a").await;
    let second = fake_relay(&addr, "forger-b").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let _reward = job.start("reward", &["reward", "--learner", &addr]);
    let mut actor = job.start(
        "actor",
        &[
            "actor",
            "--learner",
            &addr,
            "--threads",
            "1",
            "--name",
            "honest",
        ],
    );
    let ended = tokio::task::spawn_blocking(move || {
        let started = std::time::Instant::now();
        while started.elapsed() < Duration::from_secs(300) {
            if let Some(status) = learner.child.try_wait().unwrap() {
                return (Some(status), learner.log());
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        (None, learner.log())
    });
    let (status, log) = ended.await.unwrap();
    assert!(
        status.is_some_and(|s| s.success()),
        "{log}\n--- actor ---\n{}",
        actor.log()
    );
    let actor_log = actor.log();
    assert!(
        first.load(Ordering::SeqCst) + second.load(Ordering::SeqCst) >= 1,
        "the tree sent the honest actor to a forger: {actor_log}"
    );
    assert!(
        actor_log.contains("SHA-256") && actor_log.contains("fetching it again from the learner"),
        "the actor refused the forged bytes: {actor_log}"
    );
    assert_eq!(
        job.steps().len(),
        2,
        "the honest actor's groups trained the job"
    );
    wait_until("the actor's end", Duration::from_secs(30), &mut [], || {
        actor.child.try_wait().unwrap()
    });
}
