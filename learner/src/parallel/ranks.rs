//! Rank 0's side of the data-parallel learner: the table of learner ranks. Ranks > 0 join
//! over gRPC (`JoinRank`) with the port of their collective listener; once all have
//! joined, rank 0's trainer fixes the group (every rank's address, the backend, the NCCL
//! id) and answers them. Each step, rank 0 splits the global batch into one shard per
//! rank and ranks fetch theirs (`GetShard`).

use crate::parallel::collective::Backend;
use parking_lot::{Condvar, Mutex};
use quill_proto::{JoinRankReply, TrainSample as WireSample};
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What every rank needs to form the collective group.
#[derive(Debug, Clone)]
pub struct GroupSetup {
    /// Every rank's collective address, by rank.
    pub addresses: Vec<String>,
    /// The collective backend.
    pub backend: Backend,
    /// The NCCL communicator id (empty for the ring).
    pub nccl_id: Vec<u8>,
}

/// What a `GetShard` call gets.
#[derive(Debug)]
pub enum ShardAnswer {
    /// The rank's samples for the step.
    Ready(Vec<WireSample>),
    /// Not formed yet: ask again.
    NotYet,
    /// Training is over.
    Finished,
}

#[derive(Default)]
struct State {
    joined: BTreeMap<usize, (String, String)>,
    sessions: BTreeMap<usize, String>,
    rank0_host: Option<IpAddr>,
    setup: Option<GroupSetup>,
    shards: Option<(u64, Vec<Vec<WireSample>>)>,
    finished: bool,
    failed: Option<String>,
}

/// The learner ranks as rank 0 sees them.
pub struct RankTable {
    world: usize,
    refused: AtomicU64,
    state: Mutex<State>,
    changed: Condvar,
}

impl RankTable {
    /// A table for `world` ranks (1: no other ranks).
    pub fn new(world: usize) -> Self {
        RankTable {
            world: world.max(1),
            refused: Default::default(),
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    /// The number of learner ranks.
    pub fn world_size(&self) -> usize {
        self.world
    }

    /// Records rank `rank`'s join: `peer` is the address it connected from, `local` the
    /// address of rank 0 it reached. Refuses bad or repeated ranks. The rank gets a session
    /// secret (with the group, [`RankTable::wait_for_setup`]) that its `GetShard` calls
    /// must carry.
    pub fn join(
        &self,
        rank: usize,
        world: usize,
        ring_port: u16,
        name: String,
        peer: IpAddr,
        local: IpAddr,
    ) -> Result<(), String> {
        if world != self.world {
            return Err(format!(
                "rank {rank} was started with --world-size {world}, rank 0 with {}",
                self.world
            ));
        }
        if rank == 0 || rank >= self.world {
            return Err(format!(
                "rank {rank} is not a rank > 0 of a world of {}",
                self.world
            ));
        }
        if ring_port == 0 {
            return Err(format!("rank {rank} sent no collective port"));
        }
        let mut state = self.state.lock();
        if state.setup.is_some() || state.joined.contains_key(&rank) {
            return Err(format!(
                "rank {rank} has already joined (a restarted rank needs the whole learner restarted with --resume)"
            ));
        }
        state.joined.insert(
            rank,
            (
                format!("{}", std::net::SocketAddr::new(peer, ring_port)),
                name,
            ),
        );
        state.rank0_host.get_or_insert(local);
        state.sessions.insert(rank, quill_proto::auth::new_secret());
        self.changed.notify_all();
        Ok(())
    }

    /// Checks that a `GetShard` call for `rank` carries the session secret the rank was
    /// given when it joined: no one else gets a rank's shard.
    pub fn check_session(&self, rank: usize, session: &str) -> Result<(), String> {
        let state = self.state.lock();
        match state.sessions.get(&rank) {
            Some(expected) if quill_proto::auth::session_matches(session, expected) => Ok(()),
            _ => {
                self.refused.fetch_add(1, Ordering::Relaxed);
                Err(format!(
                    "rank {rank}: missing or wrong session secret (only the rank that joined as \
                 {rank} gets its shard)"
                ))
            }
        }
    }

    /// `GetShard` calls refused for a missing or wrong session secret.
    pub fn refused_sessions(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    /// Waits until every rank has joined; returns rank 0's host as the others reach it
    /// and every other rank's address (by rank, rank 0's slot empty).
    pub fn wait_for_ranks(&self, timeout: Duration) -> Result<(IpAddr, Vec<String>), String> {
        self.wait(
            timeout,
            |state| {
                (state.joined.len() + 1 >= self.world).then(|| {
                    let mut addresses = vec![String::new()];
                    addresses.extend(state.joined.values().map(|(a, _)| a.clone()));
                    Ok((state.rank0_host.expect("set by the first join"), addresses))
                })
            },
            |state| {
                let missing: Vec<usize> = (1..self.world)
                    .filter(|r| !state.joined.contains_key(r))
                    .collect();
                Err(format!(
                    "learner ranks {missing:?} did not join within {:.0} s (parallel.timeout_seconds)",
                    timeout.as_secs_f64()
                ))
            },
        )
    }

    /// Fixes the group; joined ranks get their answer.
    pub fn set_setup(&self, setup: GroupSetup) {
        self.state.lock().setup = Some(setup);
        self.changed.notify_all();
    }

    /// Makes every waiting and future call fail with `reason` (rank 0 could not form the
    /// group).
    pub fn fail(&self, reason: String) {
        self.state.lock().failed = Some(reason);
        self.changed.notify_all();
    }

    /// Waits (blocking; call from a blocking task) up to `timeout` for the group; the
    /// answer to rank `rank` carries its session secret.
    pub fn wait_for_setup(
        &self,
        rank: usize,
        timeout: Duration,
        job_json: &str,
    ) -> Result<JoinRankReply, String> {
        self.wait(
            timeout,
            |state| {
                if let Some(reason) = &state.failed {
                    return Some(Err(reason.clone()));
                }
                let setup = state.setup.as_ref()?;
                Some(Ok(JoinRankReply {
                    ring_addresses: setup.addresses.clone(),
                    backend: setup.backend as i32,
                    nccl_id: setup.nccl_id.clone(),
                    job_json: job_json.to_owned(),
                    session: state.sessions.get(&rank).cloned().unwrap_or_default(),
                }))
            },
            |_| Err("rank 0 did not form the group in time (parallel.timeout_seconds)".into()),
        )
    }

    /// Hands out the shards of `step` (one per rank; rank 0's slot is not served).
    pub fn publish(&self, step: u64, shards: Vec<Vec<WireSample>>) {
        self.state.lock().shards = Some((step, shards));
        self.changed.notify_all();
    }

    /// Training is over: ranks asking for shards are told to exit.
    pub fn finish(&self) {
        self.state.lock().finished = true;
        self.changed.notify_all();
    }

    /// Rank `rank`'s shard of `step`, waiting up to `wait` for it.
    pub fn shard(&self, rank: usize, step: u64, wait: Duration) -> Result<ShardAnswer, String> {
        if rank == 0 || rank >= self.world {
            return Err(format!(
                "rank {rank} is not a rank > 0 of a world of {}",
                self.world
            ));
        }
        self.wait(
            wait,
            |state| {
                if let Some((at, shards)) = &mut state.shards {
                    if *at == step {
                        return Some(Ok(ShardAnswer::Ready(std::mem::take(&mut shards[rank]))));
                    }
                    if *at > step {
                        return Some(Err(format!(
                            "rank {rank} asked for step {step}, rank 0 is at step {at}: the ranks are out of step"
                        )));
                    }
                }
                state.finished.then_some(Ok(ShardAnswer::Finished))
            },
            |_| Ok(ShardAnswer::NotYet),
        )
    }

    /// Waits (blocking) until `decide` gives an answer from the table's state, each time it
    /// changes, or `timeout` passes; then the answer is `expired`'s.
    fn wait<R>(
        &self,
        timeout: Duration,
        mut decide: impl FnMut(&mut State) -> Option<R>,
        expired: impl FnOnce(&State) -> R,
    ) -> R {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock();
        loop {
            if let Some(answer) = decide(&mut state) {
                return answer;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return expired(&state);
            }
            self.changed.wait_for(&mut state, left);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    const HOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

    #[test]
    fn ranks_join_get_the_group_then_their_shards() {
        let table = RankTable::new(3);
        table.join(2, 3, 7002, "b".into(), HOST, HOST).unwrap();
        assert!(table
            .wait_for_ranks(Duration::from_millis(50))
            .unwrap_err()
            .contains("[1]"));
        table.join(1, 3, 7001, "a".into(), HOST, HOST).unwrap();
        let (host, addresses) = table.wait_for_ranks(Duration::from_secs(1)).unwrap();
        assert_eq!(host, HOST);
        assert_eq!(addresses, vec!["", "127.0.0.1:7001", "127.0.0.1:7002"]);
        table.set_setup(GroupSetup {
            addresses: addresses.clone(),
            backend: Backend::Ring,
            nccl_id: Vec::new(),
        });
        let reply = table
            .wait_for_setup(1, Duration::from_secs(1), "{}")
            .unwrap();
        assert_eq!(reply.ring_addresses, addresses);
        let other = table
            .wait_for_setup(2, Duration::from_secs(1), "{}")
            .unwrap();
        assert_eq!(reply.session.len(), 64);
        assert_ne!(reply.session, other.session);
        table.check_session(1, &reply.session).unwrap();
        for wrong in ["", other.session.as_str()] {
            assert!(table
                .check_session(1, wrong)
                .unwrap_err()
                .contains("wrong session secret"));
        }
        assert!(table.check_session(0, &reply.session).is_err());
        assert_eq!(table.refused_sessions(), 3);
        let wait = Duration::from_millis(20);
        assert!(matches!(table.shard(1, 1, wait), Ok(ShardAnswer::NotYet)));
        let sample = |advantage| WireSample {
            advantage,
            ..WireSample::default()
        };
        table.publish(
            1,
            vec![vec![], vec![sample(1.0)], vec![sample(2.0), sample(3.0)]],
        );
        match table.shard(2, 1, wait).unwrap() {
            ShardAnswer::Ready(s) => assert_eq!(s.len(), 2),
            other => panic!("{other:?}"),
        }
        table.publish(2, vec![vec![], vec![], vec![]]);
        assert!(table.shard(1, 1, wait).unwrap_err().contains("out of step"));
        table.finish();
        assert!(matches!(table.shard(1, 3, wait), Ok(ShardAnswer::Finished)));
    }

    #[test]
    fn bad_joins_are_refused_with_the_reason() {
        let table = RankTable::new(2);
        let join = |rank, world, port| table.join(rank, world, port, "x".into(), HOST, HOST);
        assert!(join(1, 3, 7000)
            .unwrap_err()
            .contains("--world-size 3, rank 0 with 2"));
        assert!(join(0, 2, 7000).unwrap_err().contains("not a rank > 0"));
        assert!(join(2, 2, 7000).unwrap_err().contains("not a rank > 0"));
        assert!(join(1, 2, 0).unwrap_err().contains("no collective port"));
        join(1, 2, 7000).unwrap();
        assert!(join(1, 2, 7000).unwrap_err().contains("already joined"));
        assert!(table.shard(5, 1, Duration::ZERO).is_err());
        table.fail("no NCCL".into());
        assert_eq!(
            table
                .wait_for_setup(1, Duration::from_secs(1), "")
                .unwrap_err(),
            "no NCCL"
        );
    }
}
