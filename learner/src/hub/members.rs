//! Membership: registration, heartbeats (with the reward workers and relay parents each
//! reply names), eviction of silent members and taking them back, and the members as the
//! status document lists them. One lock guards the member book.

use super::Hub;
use parking_lot::Mutex;
use quill_proto::auth::{new_secret, session_matches};
use quill_proto::status::{MemberStatus, RoleMetrics};
use quill_proto::{
    ActorMetrics, HeartbeatReply, HeartbeatRequest, RegisterReply, RegisterRequest, RewardMetrics,
    Role, WeightSource,
};
use quill_relay::tree;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};
use tonic::Status;

/// Longest name or address a member may register with, in bytes.
pub const MAX_FIELD_BYTES: usize = 256;
/// Most live members a hub takes; a registration beyond is refused.
pub const MAX_MEMBERS: usize = 4096;
/// Most members set aside for silence that the hub remembers (the longest-silent are
/// forgotten first; a forgotten member must register again).
pub const MAX_DEPARTED: usize = 1024;

struct Member {
    session: String,
    name: String,
    address: String,
    relay_address: String,
    joined: u64,
    receiving: u64,
    weight_source: String,
    last_seen: Instant,
    version: u64,
    reported: RoleMetrics,
}

impl Member {
    fn status(&self, id: &str) -> MemberStatus {
        MemberStatus {
            id: id.to_owned(),
            name: self.name.clone(),
            address: self.address.clone(),
            relay_address: self.relay_address.clone(),
            receiving_version: self.receiving,
            weight_source: self.weight_source.clone(),
            version: self.version,
            seconds_since_heartbeat: self.last_seen.elapsed().as_secs_f64(),
            reported: self.reported,
        }
    }
}

#[derive(Default)]
struct Book {
    live: BTreeMap<String, Member>,
    departed: BTreeMap<String, Member>,
    joined: u64,
}

impl Book {
    /// Forgets the longest-silent departed members beyond [`MAX_DEPARTED`].
    fn prune_departed(&mut self) {
        let excess = self.departed.len().saturating_sub(MAX_DEPARTED);
        if excess == 0 {
            return;
        }
        let mut by_silence: Vec<(Instant, String)> = self
            .departed
            .iter()
            .map(|(id, m)| (m.last_seen, id.clone()))
            .collect();
        by_silence.sort_unstable();
        for (_, id) in by_silence.into_iter().take(excess) {
            self.departed.remove(&id);
        }
    }

    /// Checks that `id` registered; a member that was set aside for silence is taken back.
    fn check(&mut self, id: &str) -> Result<&mut Member, Status> {
        if let Some(mut member) = self.departed.remove(id) {
            tracing::warn!(member = %id, "a member set aside for silence is back");
            member.last_seen = Instant::now();
            self.live.insert(id.to_owned(), member);
        }
        self.live
            .get_mut(id)
            .ok_or_else(|| Status::not_found(format!("unknown member `{id}`: register first")))
    }
}

/// What a heartbeat reply tells the member besides the version.
#[derive(Debug, Clone, PartialEq)]
pub struct Peers {
    /// Live reward workers' addresses.
    pub reward_addresses: Vec<String>,
    /// Where to fetch the newest weights: relay parents first, the learner last.
    pub weight_sources: Vec<WeightSource>,
}

/// The member book: live members and those set aside for silence, and the calls refused
/// for bad credentials.
#[derive(Default)]
pub struct Members {
    book: Mutex<Book>,
    refused: Refused,
}

/// Calls refused for bad member credentials, by kind.
#[derive(Default)]
struct Refused {
    unauthenticated: AtomicU64,
    permission_denied: AtomicU64,
}

impl Members {
    /// Registers a member and returns its id (`actor-N`, `reward-N`) and its session
    /// secret.
    pub fn register(&self, req: RegisterRequest) -> Result<(String, String), Status> {
        let role = Role::try_from(req.role).unwrap_or(Role::Unspecified);
        let Some(reported) = RoleMetrics::new(role) else {
            return Err(Status::invalid_argument(
                "register: role must be actor or reward",
            ));
        };
        for (field, value) in [
            ("name", &req.name),
            ("address", &req.address),
            ("relay_address", &req.relay_address),
        ] {
            if value.len() > MAX_FIELD_BYTES {
                return Err(Status::invalid_argument(format!(
                    "register: {field} is {} bytes, at most {MAX_FIELD_BYTES} are allowed",
                    value.len()
                )));
            }
        }
        if !req.relay_address.is_empty() && req.relay_address.parse::<SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "register: relay_address `{}` is not HOST:PORT",
                req.relay_address
            )));
        }
        if role == Role::Reward && req.address.parse::<SocketAddr>().is_err() {
            return Err(Status::invalid_argument(format!(
                "register: reward address `{}` is not HOST:PORT",
                req.address
            )));
        }
        let prefix = if role == Role::Actor {
            "actor"
        } else {
            "reward"
        };
        let mut book = self.book.lock();
        if book.live.len() >= MAX_MEMBERS {
            return Err(Status::resource_exhausted(format!(
                "register: the job already has {MAX_MEMBERS} live members"
            )));
        }
        book.joined += 1;
        let joined = book.joined;
        let id = format!("{prefix}-{joined}");
        let session = new_secret();
        book.live.insert(
            id.clone(),
            Member {
                session: session.clone(),
                name: req.name,
                address: req.address,
                relay_address: req.relay_address,
                joined,
                receiving: 0,
                weight_source: String::new(),
                last_seen: Instant::now(),
                version: 0,
                reported,
            },
        );
        Ok((id, session))
    }

    /// Checks that a call claiming to come from member `id` carries that member's
    /// `session` secret (else `UNAUTHENTICATED`) and, when `role` is given, that the
    /// member registered in it (else `PERMISSION_DENIED`); refusals are counted.
    pub fn authenticate(&self, id: &str, session: &str, role: Option<Role>) -> Result<(), Status> {
        let mut book = self.book.lock();
        let matches = book
            .live
            .get(id)
            .or_else(|| book.departed.get(id))
            .map(|m| session_matches(session, &m.session));
        if matches == Some(false) {
            self.refused.unauthenticated.fetch_add(1, Ordering::Relaxed);
            return Err(Status::unauthenticated(format!(
                "member `{id}`: missing or wrong session secret (a member acts only as itself)"
            )));
        }
        let has = book.check(id)?.reported.role();
        match role {
            Some(role) if role != has => {
                self.refused
                    .permission_denied
                    .fetch_add(1, Ordering::Relaxed);
                Err(Status::permission_denied(format!(
                    "member `{id}` registered as {}, and only {}s may do this",
                    role_name(has),
                    role_name(role)
                )))
            }
            _ => Ok(()),
        }
    }

    /// Calls refused so far for a wrong session secret, and for a member acting outside
    /// its role.
    pub fn refused_calls(&self) -> (u64, u64) {
        (
            self.refused.unauthenticated.load(Ordering::Relaxed),
            self.refused.permission_denied.load(Ordering::Relaxed),
        )
    }

    /// Checks that `id` registered (taking a member set aside for silence back).
    pub fn check(&self, id: &str) -> Result<(), Status> {
        self.book.lock().check(id).map(|_| ())
    }

    /// Checks that `id` registered in `role` (else `PERMISSION_DENIED`, naming both).
    pub fn check_role(&self, id: &str, role: Role) -> Result<(), Status> {
        let mut book = self.book.lock();
        let has = book.check(id)?.reported.role();
        if has != role {
            return Err(Status::permission_denied(format!(
                "member `{id}` registered as {}, and only {}s may do this",
                role_name(has),
                role_name(role)
            )));
        }
        Ok(())
    }

    /// Records a heartbeat and answers with the live reward workers and, for an actor,
    /// where to fetch version `latest` (members silent for longer than `live` are skipped).
    pub fn heartbeat(
        &self,
        req: HeartbeatRequest,
        latest: u64,
        live: Duration,
        fanout: usize,
    ) -> Result<Peers, Status> {
        let mut book = self.book.lock();
        let member = book.check(&req.member_id)?;
        member.last_seen = Instant::now();
        member.version = req.version;
        member.receiving = req.receiving_version;
        member.weight_source = req.weight_source;
        if let Some(metrics) = req.metrics {
            member.reported.report(metrics);
        }
        let now = Instant::now();
        let alive = |m: &&Member| now.duration_since(m.last_seen) <= live;
        let reward_addresses = book
            .live
            .values()
            .filter(|m| m.reported.role() == Role::Reward)
            .filter(alive)
            .map(|m| m.address.clone())
            .collect();
        let mut actors: Vec<(u64, tree::Node)> = book
            .live
            .iter()
            .filter(|(_, m)| m.reported.role() == Role::Actor && alive(m))
            .map(|(id, m)| {
                let node = tree::Node {
                    id: id.clone(),
                    address: m.relay_address.clone(),
                    holds: m.version >= latest && !m.weight_source.is_empty(),
                    receiving: m.receiving == latest,
                };
                (m.joined, node)
            })
            .collect();
        drop(book);
        actors.sort_by_key(|(joined, _)| *joined);
        let nodes: Vec<tree::Node> = actors.into_iter().map(|(_, n)| n).collect();
        Ok(Peers {
            reward_addresses,
            weight_sources: tree::sources(&nodes, &req.member_id, fanout),
        })
    }

    /// Sets members silent for longer than `timeout` aside and returns their ids.
    pub fn evict_silent(&self, timeout: Duration) -> Vec<String> {
        let now = Instant::now();
        let mut book = self.book.lock();
        let gone: Vec<String> = book
            .live
            .iter()
            .filter(|(_, m)| now.duration_since(m.last_seen) > timeout)
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            let member = book.live.remove(id).expect("listed above");
            book.departed.insert(id.clone(), member);
        }
        book.prune_departed();
        gone
    }

    /// Every live member, in id order.
    pub fn statuses(&self) -> Vec<MemberStatus> {
        let book = self.book.lock();
        book.live.iter().map(|(id, m)| m.status(id)).collect()
    }

    /// Live actors.
    pub fn live_actors(&self) -> usize {
        let book = self.book.lock();
        book.live
            .values()
            .filter(|m| matches!(m.reported, RoleMetrics::Actor(_)))
            .count()
    }

    /// The latest heartbeat metrics of every live actor that reported, in member order.
    pub fn actor_metrics(&self) -> Vec<ActorMetrics> {
        let book = self.book.lock();
        book.live
            .values()
            .filter_map(|m| m.reported.actor().copied())
            .collect()
    }

    /// The latest heartbeat metrics of every live reward worker that reported.
    pub fn reward_metrics(&self) -> Vec<RewardMetrics> {
        let book = self.book.lock();
        book.live
            .values()
            .filter_map(|m| m.reported.reward().copied())
            .collect()
    }

    /// Holds the book's lock and panics, as a failing handler would.
    #[cfg(test)]
    pub(super) fn hold_and_panic(&self) {
        let _held = self.book.lock();
        panic!("a handler panicked while holding the member book");
    }
}

/// A role as the job file and the logs name it.
fn role_name(role: Role) -> &'static str {
    match role {
        Role::Actor => "actor",
        Role::Reward => "reward",
        Role::Unspecified => "unspecified",
    }
}

impl Hub {
    /// Answers a `Register` call: the member's id and what it needs to run the job.
    pub fn register(&self, req: RegisterRequest) -> Result<RegisterReply, Status> {
        let (id, session) = self.members.register(req)?;
        tracing::info!(member = %id, "registered");
        let (version, sha256) = self.weights.latest();
        Ok(RegisterReply {
            member_id: id,
            job_json: self.info.job_json.clone(),
            model_config_json: self.info.model_config_json.clone(),
            tokenizer_json: self.info.tokenizer_json.clone(),
            version,
            session,
            sha256: sha256.to_vec(),
        })
    }

    /// Answers a `Heartbeat` call: the newest version and its digest, the live reward
    /// workers, where to fetch weights, whether to stop; the actor's leases still being
    /// generated are renewed for `cluster.lease_seconds`, and those it lost are named.
    pub fn heartbeat(&self, mut req: HeartbeatRequest) -> Result<HeartbeatReply, Status> {
        let live = Duration::from_secs_f64(self.job.cluster.heartbeat_seconds * 3.0);
        let (latest, sha256) = self.weights.latest();
        let member = req.member_id.clone();
        let held = std::mem::take(&mut req.held_leases);
        let peers = self
            .members
            .heartbeat(req, latest, live, self.job.cluster.relay_fanout)?;
        let ttl = Duration::from_secs(self.job.cluster.lease_seconds);
        let (lost_leases, lease_deadline_unix_ms) = if held.is_empty() {
            (Vec::new(), 0)
        } else {
            let lost = self.leases.renew(&member, &held, ttl);
            (lost, super::leases::unix_ms(SystemTime::now() + ttl))
        };
        Ok(HeartbeatReply {
            latest_version: latest,
            reward_addresses: peers.reward_addresses,
            shutdown: self.is_finished(),
            weight_sources: peers.weight_sources,
            latest_sha256: sha256.to_vec(),
            lost_leases,
            lease_deadline_unix_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quill_proto::metrics::MemberMetrics;

    fn register(members: &Members, role: Role, address: &str) -> String {
        members
            .register(RegisterRequest {
                role: role as i32,
                name: "n".into(),
                address: address.into(),
                relay_address: String::new(),
            })
            .unwrap()
            .0
    }

    #[test]
    fn registration_checks_role_and_addresses() {
        let members = Members::default();
        let refused = |role: Role, address: &str, relay: &str| {
            members
                .register(RegisterRequest {
                    role: role as i32,
                    name: "n".into(),
                    address: address.into(),
                    relay_address: relay.into(),
                })
                .unwrap_err()
                .message()
                .to_owned()
        };
        assert!(refused(Role::Unspecified, "", "").contains("role must be actor or reward"));
        assert!(refused(Role::Reward, "nowhere", "").contains("reward address `nowhere`"));
        assert!(refused(Role::Actor, "", "x:y").contains("relay_address `x:y`"));
        assert_eq!(register(&members, Role::Actor, ""), "actor-1");
        assert_eq!(register(&members, Role::Reward, "127.0.0.1:5"), "reward-2");
        let err = members.check("actor-9").unwrap_err();
        assert_eq!(err.code(), tonic::Code::NotFound);
    }

    #[test]
    fn heartbeats_keep_metrics_and_name_live_reward_workers() {
        let members = Members::default();
        let actor = register(&members, Role::Actor, "");
        register(&members, Role::Reward, "127.0.0.1:5");
        let beat = HeartbeatRequest {
            member_id: actor.clone(),
            version: 2,
            metrics: Some(MemberMetrics::Actor(ActorMetrics {
                tokens_per_s: 7.0,
                ..ActorMetrics::default()
            })),
            ..HeartbeatRequest::default()
        };
        let peers = members
            .heartbeat(beat, 2, Duration::from_secs(60), 2)
            .unwrap();
        assert_eq!(peers.reward_addresses, vec!["127.0.0.1:5".to_owned()]);
        assert_eq!(
            peers.weight_sources.last().map(|s| s.member_id.as_str()),
            Some("learner")
        );
        assert_eq!(members.actor_metrics()[0].tokens_per_s, 7.0);
        assert!(members.reward_metrics().is_empty());
        let statuses = members.statuses();
        assert_eq!(statuses[0].version, 2);
        assert_eq!(statuses[1].reported, RoleMetrics::Reward(None));
    }

    #[test]
    fn registration_is_bounded_and_roles_are_checked() {
        let members = Members::default();
        let long = "x".repeat(MAX_FIELD_BYTES + 1);
        let err = members
            .register(RegisterRequest {
                role: Role::Actor as i32,
                name: long,
                address: String::new(),
                relay_address: String::new(),
            })
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::InvalidArgument);
        assert!(err.message().contains("name is 257 bytes"), "{err:?}");
        let reward = register(&members, Role::Reward, "127.0.0.1:5");
        let actor = register(&members, Role::Actor, "");
        members.check_role(&actor, Role::Actor).unwrap();
        let err = members.check_role(&reward, Role::Actor).unwrap_err();
        assert_eq!(err.code(), tonic::Code::PermissionDenied);
        assert!(
            err.message()
                .contains("registered as reward, and only actors"),
            "{err:?}"
        );
        for _ in 2..MAX_MEMBERS {
            register(&members, Role::Actor, "");
        }
        let err = members
            .register(RegisterRequest {
                role: Role::Actor as i32,
                ..RegisterRequest::default()
            })
            .unwrap_err();
        assert_eq!(err.code(), tonic::Code::ResourceExhausted);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(members.evict_silent(Duration::ZERO).len(), MAX_MEMBERS);
        assert_eq!(members.book.lock().departed.len(), MAX_DEPARTED);
        register(&members, Role::Actor, "");
    }

    #[test]
    fn a_silent_member_is_set_aside_and_taken_back_when_it_calls() {
        let members = Members::default();
        let actor = register(&members, Role::Actor, "");
        assert!(members.evict_silent(Duration::from_secs(60)).is_empty());
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(members.evict_silent(Duration::ZERO), vec![actor.clone()]);
        assert!(members.statuses().is_empty());
        members.check(&actor).unwrap();
        assert_eq!(members.statuses().len(), 1);
    }

    #[test]
    fn sessions_bind_members_to_themselves_and_their_roles() {
        let members = Members::default();
        let new = |role: Role, address: &str| {
            members
                .register(RegisterRequest {
                    role: role as i32,
                    address: address.into(),
                    ..RegisterRequest::default()
                })
                .unwrap()
        };
        let (actor, actor_session) = new(Role::Actor, "");
        let (reward, reward_session) = new(Role::Reward, "127.0.0.1:5");
        assert_ne!(actor_session, reward_session);
        members
            .authenticate(&actor, &actor_session, Some(Role::Actor))
            .unwrap();
        members
            .authenticate(&reward, &reward_session, None)
            .unwrap();
        // Another member's secret, none, or a member acting outside its role.
        let code = |id: &str, session: &str, role| {
            members.authenticate(id, session, role).unwrap_err().code()
        };
        assert_eq!(
            code(&actor, &reward_session, None),
            tonic::Code::Unauthenticated
        );
        assert_eq!(code(&actor, "", None), tonic::Code::Unauthenticated);
        assert_eq!(
            code(&reward, &reward_session, Some(Role::Actor)),
            tonic::Code::PermissionDenied
        );
        assert_eq!(code("actor-9", &actor_session, None), tonic::Code::NotFound);
        assert_eq!(members.refused_calls(), (2, 1));
        // A member set aside for silence comes back only with its own secret.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(members.evict_silent(Duration::ZERO).len(), 2);
        assert_eq!(
            code(&actor, &reward_session, None),
            tonic::Code::Unauthenticated
        );
        assert!(members.statuses().is_empty());
        members.authenticate(&actor, &actor_session, None).unwrap();
        assert_eq!(members.statuses().len(), 1);
    }
}
