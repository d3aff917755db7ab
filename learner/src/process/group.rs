//! Forming the learner ranks' collective group and splitting a global batch into shards.

use crate::parallel::collective::{Backend, NcclCollective, RingCollective};
use crate::process::error::RunError;
use crate::train::grad_sync::GradSync;
use crate::train::grpo::{self, LossAggregation};
use crate::train::sample::TrainSample;
use quill_config::job::{CollectiveKind, JobConfig};
use quill_proto::TrainSample as WireSample;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, ToSocketAddrs, UdpSocket};
use tch::Device;

/// The backend a job's learner ranks use on `device` (`auto`: NCCL on CUDA, else the ring).
pub fn backend(job: &JobConfig, device: Device) -> Backend {
    match job.parallel.collective {
        CollectiveKind::Ring => Backend::Ring,
        CollectiveKind::Nccl => Backend::Nccl,
        CollectiveKind::Auto if device.is_cuda() => Backend::Nccl,
        CollectiveKind::Auto => Backend::Ring,
    }
}

/// A listener for this rank's ring connections on `ip` (the address the other ranks
/// reach this rank at, not every interface) and a free port.
pub fn ring_listener(ip: IpAddr) -> Result<TcpListener, RunError> {
    TcpListener::bind(SocketAddr::new(ip, 0))
        .map_err(|e| RunError::Io(format!("<collective listener on {ip}>"), e))
}

/// The local address this host reaches `addr` (`HOST:PORT`) from: where a rank > 0
/// listens for the ring, since rank 0 sees it at that address. Nothing is sent.
pub fn route_to(addr: &str) -> Result<IpAddr, RunError> {
    let io = |e| RunError::Io(format!("<route to {addr}>"), e);
    let target = addr
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| RunError::Startup(format!("{addr} resolves to no address")))?;
    let unspecified: IpAddr = if target.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    let socket = UdpSocket::bind(SocketAddr::new(unspecified, 0)).map_err(io)?;
    socket.connect(target).map_err(io)?;
    Ok(socket.local_addr().map_err(io)?.ip())
}

/// How a rank joins the group: the backend, the ring's addresses (by rank) or NCCL's id,
/// and the job token that ring ranks prove themselves with.
pub struct Membership<'a> {
    /// The backend rank 0 chose.
    pub backend: Backend,
    /// Where every rank's ring listener is, by rank.
    pub addresses: &'a [String],
    /// NCCL's unique id (empty for the ring).
    pub nccl_id: &'a [u8],
    /// The job token.
    pub token: &'a str,
}

/// Joins the group as `rank`: a ring over the membership's addresses, or NCCL.
pub fn connect(
    job: &JobConfig,
    rank: usize,
    membership: Membership<'_>,
    listener: TcpListener,
    device: Device,
) -> Result<GradSync, RunError> {
    let Membership {
        backend,
        addresses,
        nccl_id,
        token,
    } = membership;
    let timeout = job.parallel.timeout();
    let collective: Box<dyn crate::parallel::collective::Collective> = match backend {
        Backend::Ring => Box::new(
            RingCollective::connect(rank, listener, addresses, timeout, token.as_bytes())
                .map_err(crate::LearnerError::from)?,
        ),
        Backend::Nccl => {
            let Device::Cuda(index) = device else {
                return Err(RunError::Startup(format!(
                    "the nccl collective needs a CUDA device, rank {rank} trains on {device:?}"
                )));
            };
            Box::new(
                NcclCollective::new(rank, addresses.len(), nccl_id, index, timeout)
                    .map_err(crate::LearnerError::from)?,
            )
        }
        Backend::Unspecified => {
            return Err(RunError::Startup(
                "rank 0 named no collective backend (a learner of another version?)".into(),
            ))
        }
    };
    Ok(GradSync::new(collective, job.parallel.bucket_bytes()))
}

/// Splits a global batch into `world` shards of about equal token counts (longest samples
/// first, each to the lightest shard), with each sample's weight in the global loss.
pub fn split(
    batch: Vec<TrainSample>,
    aggregation: LossAggregation,
    world: usize,
) -> Vec<(Vec<TrainSample>, Vec<f64>)> {
    let weights = grpo::token_weights(&batch, aggregation);
    let mut order: Vec<usize> = (0..batch.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(batch[i].total_tokens()));
    let mut owner = vec![0; batch.len()];
    let mut load = vec![0usize; world];
    for i in order {
        let lightest = (0..world)
            .min_by_key(|&r| (load[r], r))
            .expect("world >= 1");
        owner[i] = lightest;
        load[lightest] += batch[i].total_tokens();
    }
    let mut shards: Vec<(Vec<TrainSample>, Vec<f64>)> = vec![(Vec::new(), Vec::new()); world];
    for ((sample, weight), rank) in batch.into_iter().zip(weights).zip(owner) {
        shards[rank].0.push(sample);
        shards[rank].1.push(weight);
    }
    shards
}

/// A sample and its weight as they travel to a rank.
pub fn to_wire(sample: TrainSample, weight: f64) -> WireSample {
    WireSample {
        prompt: sample.prompt,
        response: sample.response,
        behaviour_logprobs: sample.behaviour_logprobs,
        advantage: sample.advantage,
        weight,
    }
}

/// A rank's shard back into samples and weights.
pub fn from_wire(samples: Vec<WireSample>) -> (Vec<TrainSample>, Vec<f64>) {
    samples
        .into_iter()
        .map(|s| {
            (
                TrainSample {
                    prompt: s.prompt,
                    response: s.response,
                    behaviour_logprobs: s.behaviour_logprobs,
                    advantage: s.advantage,
                },
                s.weight,
            )
        })
        .unzip()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::batch;

    #[test]
    fn the_ring_listens_where_the_other_ranks_reach_this_rank() {
        let ip = route_to("127.0.0.1:9").unwrap();
        assert_eq!(ip, IpAddr::from(Ipv4Addr::LOCALHOST));
        let listener = ring_listener(ip).unwrap();
        assert_eq!(listener.local_addr().unwrap().ip(), ip);
        assert!(route_to("127.0.0.1").is_err(), "no port");
    }

    #[test]
    fn shards_balance_tokens_and_keep_global_weights() {
        let global = batch();
        let weights = grpo::token_weights(&global, LossAggregation::TokenMean);
        let shards = split(global.clone(), LossAggregation::TokenMean, 3);
        assert_eq!(shards.len(), 3);
        let loads: Vec<usize> = shards
            .iter()
            .map(|(s, _)| s.iter().map(TrainSample::total_tokens).sum())
            .collect();
        assert_eq!(
            loads.iter().sum::<usize>(),
            global.iter().map(TrainSample::total_tokens).sum::<usize>()
        );
        assert!(
            loads.iter().max().unwrap() - loads.iter().min().unwrap() <= 11,
            "{loads:?}"
        );
        for (samples, w) in &shards {
            for (s, w) in samples.iter().zip(w) {
                let i = global.iter().position(|g| g == s).unwrap();
                assert_eq!(*w, weights[i]);
            }
        }
        let (back, w) = from_wire(
            shards[0]
                .0
                .iter()
                .cloned()
                .zip(&shards[0].1)
                .map(|(s, &w)| to_wire(s, w))
                .collect(),
        );
        assert_eq!((back, w), shards[0].clone());
        assert_eq!(split(Vec::new(), LossAggregation::TokenMean, 2).len(), 2);
    }
}
