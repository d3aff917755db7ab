//! gRPC plumbing shared by every role: message limits, HTTP/2 windows sized for weight
//! streams, client endpoints, servers, and clients that carry the job token.

use crate::auth::{attach_token, AttachToken};
use crate::learner_client::LearnerClient;
use crate::reward_client::RewardClient;
use crate::weight_relay_client::WeightRelayClient;
use std::time::Duration;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Channel, Endpoint, Server};

/// Heartbeat periods without an answer after which a member decides the learner is gone.
pub const LEARNER_SILENCE_HEARTBEATS: u32 = 10;

/// Largest gRPC message any role sends or accepts (a scored group of long samples).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;
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

/// A client endpoint for `HOST:PORT` with connect and call timeouts and wide windows.
pub fn endpoint(addr: &str, timeout: Duration) -> Result<Endpoint, String> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| format!("bad address `{addr}`: {e}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME)))
}

/// A server builder with the same windows.
pub fn server() -> Server {
    Server::builder()
        .initial_stream_window_size(Some(STREAM_WINDOW))
        .initial_connection_window_size(Some(CONNECTION_WINDOW))
        .max_frame_size(Some(MAX_FRAME))
}

/// A learner client over `channel` with the job token and the message limits.
pub fn learner_client(channel: Channel, token: &str) -> LearnerConn {
    LearnerClient::with_interceptor(channel, attach_token(token))
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
